"""RepConv / Conv API, the model-wide entry point, state_dict forms, errors and the article's examples."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from repablate.nn import (
    Conv,
    CrossRepConv,
    RepAttention,
    RepConv,
    RepConvN,
    RepCrossModal,
    RepMobileBlock,
    equivalence_error,
    is_deployed,
    load_state_dict,
    reparameterize,
)
from tests.test_nn_fusion import randomize_batch_norms


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a forward pass runs (by overload packet name)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(model: nn.Module, *inputs) -> Counter:
    with torch.no_grad(), OpCounter() as counter:
        model(*inputs)
    return counter.ops


class Custom(nn.Module):
    """Blocks nested in every container kind, plus a plain layer that must be left alone."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(RepConv(3, 8, s=2), Conv(8, 8, 3))
        self.blocks = nn.ModuleList([RepConv(8, 8), RepConvN(8, 8, g=2)])
        self.heads = nn.ModuleDict({"a": nn.Sequential(RepConv(8, 8, k=1), nn.Conv2d(8, 4, 1))})

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.heads["a"](x)


@pytest.fixture
def trained_custom() -> nn.Module:
    torch.manual_seed(0)
    model = Custom()
    randomize_batch_norms(model, seed=0)
    return model


def test_yolov7_names_and_state_dict_keys():
    block = RepConv(8, 8)
    assert isinstance(block.rbr_dense, nn.Sequential) and isinstance(block.rbr_dense[1], nn.BatchNorm2d)
    assert {"rbr_dense.0.weight", "rbr_1x1.0.weight", "rbr_1x1.1.running_var", "rbr_identity.running_mean"} <= set(
        block.state_dict()
    )
    assert block.deploy is False and isinstance(block.act, nn.SiLU)
    block.fuse_repvgg_block()
    assert block.deploy is True and set(block.state_dict()) == {"rbr_reparam.weight", "rbr_reparam.bias"}
    assert not hasattr(block, "rbr_dense") and not hasattr(block, "rbr_identity")


@pytest.mark.parametrize(
    "kwargs, branches",
    [
        (dict(c1=8, c2=8), ["dense", "1x1", "identity"]),
        (dict(c1=8, c2=16), ["dense", "1x1"]),
        (dict(c1=8, c2=8, s=2), ["dense", "1x1"]),
        (dict(c1=8, c2=8, use_identity=False), ["dense", "1x1"]),
        (dict(c1=8, c2=8, use_1x1=False), ["dense", "identity"]),
        (dict(c1=8, c2=8, k=1), ["dense", "identity"]),
        (dict(c1=8, c2=8, k=5, d=2, g=8), ["dense", "1x1", "identity"]),
    ],
)
def test_branches_present(kwargs, branches):
    assert list(RepConv(**kwargs).branches()) == branches


def test_repconv_n_has_no_identity():
    assert RepConvN(8, 8).rbr_identity is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(c1=8, c2=8, s=2, use_identity=True), "s=2"),
        (dict(c1=8, c2=16, use_identity=True), "c1 == c2"),
        (dict(c1=8, c2=8, p=3, use_identity=True), "p=3"),
        (dict(c1=8, c2=8, k=4), "k=4"),
        (dict(c1=8, c2=8, g=3), "g=3"),
        (dict(c1=0, c2=8), "c1=0"),
        (dict(c1=8, c2=8, p=0), "p=0"),
        (dict(c1=8, c2=8, act="relu"), "act='relu'"),
    ],
)
def test_bad_arguments_raise_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        RepConv(**kwargs)


@pytest.mark.parametrize("act, expected", [(True, nn.SiLU), (False, nn.Identity), (None, nn.Identity)])
def test_activation_convention(act, expected):
    assert isinstance(RepConv(4, 4, act=act).act, expected)
    relu = nn.ReLU()
    assert RepConv(4, 4, act=relu).act is relu


def test_deployed_repconv_runs_exactly_one_convolution():
    block = RepConv(8, 8, act=False)
    train_ops = count_ops(block.eval(), torch.randn(1, 8, 8, 8))
    assert train_ops["convolution"] == 2 and train_ops["native_batch_norm"] == 3 and train_ops["add"] == 2
    deployed = reparameterize(block)
    ops = count_ops(deployed, torch.randn(1, 8, 8, 8))
    assert dict(ops) == {"convolution": 1}


def test_reparameterize_reaches_every_nested_block(trained_custom):
    x = torch.randn(2, 3, 16, 16)
    deployed = reparameterize(trained_custom)
    assert not is_deployed(trained_custom) and is_deployed(deployed)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    ops = count_ops(deployed, x)
    assert ops["convolution"] == 6 and "add" not in ops
    error = equivalence_error(trained_custom, deployed, x)
    assert error.max_abs < 1e-4 and error.max_rel < 1e-5
    assert not deployed.training


def test_reparameterize_inplace_and_idempotent(trained_custom):
    x = torch.randn(1, 3, 16, 16)
    reference = trained_custom.eval()(x)
    same = reparameterize(trained_custom, inplace=True)
    assert same is trained_custom and is_deployed(trained_custom)
    state = {k: v.clone() for k, v in trained_custom.state_dict().items()}
    again = reparameterize(trained_custom, inplace=True)
    assert all(torch.equal(state[k], v) for k, v in again.state_dict().items()) and set(state) == set(
        again.state_dict()
    )
    torch.testing.assert_close(again(x), reference, atol=1e-4, rtol=1e-4)


def test_fused_weights_carry_no_grad(trained_custom):
    trained_custom.train()
    trained_custom(torch.randn(2, 3, 16, 16)).sum().backward()
    deployed = reparameterize(trained_custom)
    for parameter in deployed.parameters():
        assert parameter.grad is None and parameter.grad_fn is None and parameter.is_leaf


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_models_fuse(dtype, tolerance):
    """Half models: the fused model runs in the same dtype; compared with a float64 reference of the same
    weights, its normwise error stays within the dtype's precision (fp16 2e-2, bf16 5e-2 relative)."""
    torch.manual_seed(0)
    block = RepConv(8, 8, act=False)
    randomize_batch_norms(block, seed=3)
    x = torch.randn(1, 8, 8, 8)
    reference = block.double().eval()(x.double())
    deployed = reparameterize(block.to(dtype))
    assert deployed.rbr_reparam.weight.dtype == dtype
    out = deployed(x.to(dtype)).double()
    assert ((out - reference).abs().max() / reference.abs().max()).item() < tolerance


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fuses_on_cuda(trained_custom):
    model = trained_custom.cuda()
    deployed = reparameterize(model)
    assert deployed.stem[0].rbr_reparam.weight.is_cuda
    assert equivalence_error(model, deployed, torch.randn(1, 3, 16, 16, device="cuda")).max_rel < 1e-5


def test_equivalence_error_restores_modes_and_takes_tuples():
    model = RepCrossModal(4, 8).train()
    deployed = reparameterize(model)
    error = equivalence_error(model, deployed, (torch.randn(2, 4, 8, 8), torch.randn(2, 8)))
    assert model.training and all(m.training for m in model.modules())
    assert error.max_rel < 1e-5


def test_deploy_state_dict_loads_into_deploy_model(trained_custom):
    deployed = reparameterize(trained_custom)

    class DeployCustom(Custom):
        def __init__(self):
            nn.Module.__init__(self)
            self.stem = nn.Sequential(RepConv(3, 8, s=2, deploy=True), Conv(8, 8, 3, deploy=True))
            self.blocks = nn.ModuleList([RepConv(8, 8, deploy=True), RepConvN(8, 8, g=2, deploy=True)])
            self.heads = nn.ModuleDict({"a": nn.Sequential(RepConv(8, 8, k=1, deploy=True), nn.Conv2d(8, 4, 1))})

    fresh = DeployCustom()
    load_state_dict(fresh, deployed.state_dict())
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(fresh.eval()(x), deployed(x))


@pytest.mark.parametrize("strict", [True, False])
def test_train_form_state_dict_into_deploy_model_fails_naming_the_block(strict):
    source = RepConv(8, 8)
    target = RepConv(8, 8, deploy=True)
    with pytest.raises(RuntimeError, match="deployed .* training form"):
        target.load_state_dict(source.state_dict(), strict=strict)
    with pytest.raises(RuntimeError, match="training form but the state_dict holds its deploy"):
        RepConv(8, 8).load_state_dict(target.state_dict(), strict=strict)
    with pytest.raises(RuntimeError, match="Conv at"):
        Conv(8, 8, deploy=True).load_state_dict(Conv(8, 8).state_dict(), strict=strict)


def test_load_state_dict_is_all_or_nothing(trained_custom):
    target = Custom()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match="differ in form"):
        load_state_dict(target, reparameterize(trained_custom).state_dict())
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_conv_folds_its_batch_norm():
    torch.manual_seed(0)
    conv = Conv(6, 12, 3, 2, g=3, act=nn.LeakyReLU(0.1))
    randomize_batch_norms(conv, seed=4)
    x = torch.randn(2, 6, 11, 11)
    folded = reparameterize(conv)
    assert folded.deploy and not hasattr(folded, "bn") and folded.conv.bias is not None
    assert equivalence_error(conv, folded, x).max_rel < 1e-6
    assert dict(count_ops(folded, x)) == {"convolution": 1, "leaky_relu": 1}


def test_bn_without_running_stats_cannot_fold():
    block = RepConv(4, 4)
    block.rbr_dense[1] = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        reparameterize(block)


def test_article_minimal_block():
    """The article's minimal three-branch block: 3 -> 3 channels, 1x3x32x32 input, no activation. It reports a
    max abs difference of 1.19e-7 after fusion; we require float32 noise (< 1e-5 abs)."""
    torch.manual_seed(0)
    block = RepConv(3, 3, act=False)
    randomize_batch_norms(block, seed=5)
    assert list(block.branches()) == ["dense", "1x1", "identity"]
    error = equivalence_error(block, reparameterize(block), torch.randn(1, 3, 32, 32))
    assert error.max_abs < 1e-5


@pytest.mark.parametrize(
    "factory, inputs",
    [
        (lambda: RepMobileBlock(8, 16, s=2), (torch.randn(2, 8, 16, 16),)),
        (lambda: RepAttention(16), (torch.randn(2, 16, 6, 6),)),
        (lambda: RepCrossModal(8, 16), (torch.randn(2, 8, 8, 8), torch.randn(2, 16))),
        (lambda: CrossRepConv(8, 8), (torch.randn(2, 8, 8, 8), "depth")),
    ],
    ids=["RepMobileBlock", "RepAttention", "RepCrossModal", "CrossRepConv"],
)
def test_extension_blocks_fuse(factory, inputs):
    torch.manual_seed(0)
    model = factory()
    randomize_batch_norms(model, seed=6)
    deployed = reparameterize(model)
    assert is_deployed(deployed) and not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert equivalence_error(model, deployed, inputs).max_rel < 1e-5


def test_cross_rep_conv_runs_one_conv_per_modality():
    model = CrossRepConv(4, 6, modalities=("rgb", "depth", "thermal"))
    randomize_batch_norms(model, seed=7)
    deployed = reparameterize(model)
    assert sorted(deployed.fused) == ["depth", "rgb", "thermal"]
    x = torch.randn(1, 4, 8, 8)
    for modality in ("rgb", "depth", "thermal"):
        assert count_ops(deployed, x, modality)["convolution"] == 1
        assert equivalence_error(model, deployed, (x, modality)).max_rel < 1e-5
    with pytest.raises(ValueError, match="modality='ir'"):
        deployed(x, "ir")


def test_rep_attention_needs_eight_channels():
    with pytest.raises(ValueError, match="c=4"):
        RepAttention(4)

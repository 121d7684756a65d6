"""Property and mutation tests for the quantization-friendly blocks.

QARepConv (QARepVGG's block): every block a user can build fuses into one conv computing the same function, with
the tolerances of tests/test_nn_fusion.py (float32 atol 1e-5 / rtol 1e-4; float64 atol = rtol = 1e-10), random BN
statistics and affine parameters (eval mode) and random 1x1 biases; each wrong fusion below fails that suite.

QuantRepConv (RepConv trained for its int8 deployed conv): in eval mode its training form *is* the deployed conv
(bitwise); the deployed weights are int8 per output channel (weight / scale integral within 1e-4 in float32 and
1e-9 in float64, |q| <= 127, 127 reached in every non-zero channel); the integers are those ONNX Runtime's symmetric
per-channel quantization finds; a conv with the dequantized int8 weights reproduces the block's eval output within
1e-6 normwise relative error in float32; gradients are RepConv's (straight-through estimator), in train mode with
batch statistics and in eval mode through the fused kernel; each wrong quantization below fails the suite.
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from repablate.models.yolov7_tiny import YOLOv7Tiny
from repablate.nn import (
    QARepConv,
    QuantRepConv,
    RepConv,
    equivalence_error,
    fusion,
    is_deployed,
    load_state_dict,
    reparameterize,
)
from tests.test_nn_fusion import TOLERANCES, randomize_batch_norms, yolov7_identity_kernel

# How far weight / scale of a deployed QuantRepConv may be from an integer: the rounding of q * scale in the dtype.
INTEGRALITY = {torch.float32: 1e-4, torch.float64: 1e-9}


def randomize(block: nn.Module, seed: int) -> nn.Module:
    """Random BN statistics, affine parameters and eps (as test_nn_fusion), and random conv biases."""
    randomize_batch_norms(block, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, nn.Conv2d) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    return block


@st.composite
def block_configs(draw, qarep: bool = False):
    """Any valid block: k in {1, 3, 5}, stride 1/2, dilation 1/2, groups from 1 to depthwise, branches on/off."""
    groups = draw(st.integers(1, 4))
    depthwise = draw(st.booleans())
    c1 = groups * (1 if depthwise else draw(st.integers(1, 3)))
    c2 = c1 if draw(st.booleans()) else groups * draw(st.integers(1, 3))
    s = draw(st.sampled_from([1, 2]))
    identity_possible = c1 == c2 and s == 1
    config = dict(
        c1=c1,
        c2=c2,
        k=draw(st.sampled_from([1, 3, 5])),
        s=s,
        g=groups,
        d=draw(st.sampled_from([1, 2])),
        use_identity=draw(st.booleans()) if identity_possible else draw(st.sampled_from([None, False])),
        use_1x1=draw(st.booleans()),
        act=draw(st.sampled_from([True, False])),
    )
    if qarep:
        config["use_1x1_bias"] = draw(st.booleans())
    return config


def _input(config: dict, dtype: torch.dtype, seed: int, size: int = 9) -> torch.Tensor:
    return torch.randn(2, config["c1"], size, size + 1, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# --- QARepConv: exact fusion ---------------------------------------------------------------------------------------


def qarep_pair(config: dict, dtype: torch.dtype, seed: int) -> tuple[QARepConv, QARepConv]:
    torch.manual_seed(seed)
    block = randomize(QARepConv(**config).to(dtype), seed).eval()
    return block, reparameterize(block)


def assert_fused_equal(block: nn.Module, deployed: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), block(x), **TOLERANCES[x.dtype])


@settings(max_examples=60, deadline=None)
@given(
    config=block_configs(qarep=True),
    seed=st.integers(0, 2**16),
    size=st.integers(5, 13),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_fused_qarepconv_equals_branches(config, seed, size, dtype):
    block, deployed = qarep_pair(config, dtype, seed)
    assert_fused_equal(block, deployed, _input(config, dtype, seed, size))
    assert deployed.rbr_reparam.weight.shape == (config["c2"], config["c1"] // config["g"], config["k"], config["k"])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert set(deployed.state_dict()) == {"rbr_reparam.weight", "rbr_reparam.bias"}


def test_qarepconv_has_the_structure_of_qarepvgg():
    block = QARepConv(8, 8)
    assert isinstance(block.rbr_dense[1], nn.BatchNorm2d)  # 3x3 conv + BN
    assert isinstance(block.rbr_1x1, nn.Conv2d) and block.rbr_1x1.bias is not None  # 1x1 with bias, no BN
    assert isinstance(block.rbr_identity, nn.Identity)  # identity, no BN
    assert isinstance(block.bn, nn.BatchNorm2d) and isinstance(block.act, nn.SiLU)
    assert list(block.branches()) == ["dense", "1x1"]  # the identity has no parameters to monitor
    assert QARepConv(8, 16).rbr_identity is None and QARepConv(8, 8, s=2).rbr_identity is None
    assert QARepConv(8, 8, use_1x1_bias=False).rbr_1x1.bias is None
    assert QARepConv(8, 8, k=1).rbr_1x1 is None
    block.reparameterize()
    assert block.branches() == {} and block.deploy


def test_qarepconv_normalizes_the_sum_with_batch_statistics_in_training():
    """One BN after the sum: with gamma 1, beta 0 every output channel has mean 0 and variance ~1 in train mode."""
    torch.manual_seed(0)
    block = QARepConv(4, 4, act=False).train()
    out = block(torch.randn(8, 4, 10, 10) * 3 + 2)
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var((0, 2, 3), unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


@pytest.mark.parametrize("block_type", [QARepConv, QuantRepConv])
def test_deploy_form_builds_loads_and_is_idempotent(block_type):
    torch.manual_seed(0)
    block = randomize(block_type(6, 6, g=3, bn_eps=1e-3, bn_momentum=0.03), 0).eval()
    deployed = reparameterize(block)
    fused = deployed.rbr_reparam.weight.clone()
    deployed.reparameterize()  # a no-op once deployed
    assert torch.equal(deployed.rbr_reparam.weight, fused) and is_deployed(deployed)
    rebuilt = block_type(6, 6, g=3, deploy=True)
    load_state_dict(rebuilt, deployed.state_dict())
    x = torch.randn(2, 6, 7, 7)
    assert equivalence_error(deployed, rebuilt, x).max_abs == 0
    with pytest.raises(RuntimeError, match="deployed"):
        rebuilt.load_state_dict(block.state_dict(), strict=False)
    with pytest.raises(RuntimeError, match="training form"):
        block_type(6, 6, g=3).load_state_dict(deployed.state_dict(), strict=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(c1=4, c2=4, k=2), "odd kernel"),
        (dict(c1=4, c2=6, g=4), "must divide"),
        (dict(c1=4, c2=6, use_identity=True), "impossible"),
        (dict(c1=4, c2=4, p=0), "p >= d"),
    ],
)
def test_qarepconv_refuses_what_cannot_fuse(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QARepConv(**kwargs)


# Mutation tests: each is a plausible wrong fusion; the property check above must reject it.
QAREP_MUTATIONS = [
    "forgets the 1x1 bias",
    "forgets the post-sum BN",
    "adds the branch bias after folding the post-sum BN",
    "builds the identity kernel ungrouped (YOLOv7's fill_diagonal_)",
    "folds the post-sum BN with gamma only",
]


@torch.no_grad()
def qarep_fusion(block: QARepConv, mutation: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """QARepConv's fusion written out once more, with ``mutation`` (one of QAREP_MUTATIONS) or none."""
    dtype = torch.float64
    kernel, bias = fusion.fold_batch_norm(block.rbr_dense[0].weight.to(dtype), block.rbr_dense[1])
    kernel = kernel + fusion.pad_to_kernel(block.rbr_1x1.weight.to(dtype), block.k)
    if mutation != "forgets the 1x1 bias":
        bias = bias + block.rbr_1x1.bias.to(dtype)
    ungrouped = mutation == "builds the identity kernel ungrouped (YOLOv7's fill_diagonal_)"
    identity = yolov7_identity_kernel if ungrouped else fusion.identity_kernel
    kernel = kernel + identity(block.c1, block.g, block.k, dtype)
    if mutation == "forgets the post-sum BN":
        return kernel, bias
    if mutation == "adds the branch bias after folding the post-sum BN":
        folded, shift = fusion.fold_batch_norm(kernel, block.bn)
        return folded, shift + bias
    if mutation == "folds the post-sum BN with gamma only":
        return kernel * block.bn.weight.to(dtype).reshape(-1, 1, 1, 1), bias
    return fusion.fold_batch_norm(kernel, block.bn, conv_bias=bias)


@pytest.mark.parametrize("mutation", [None, *QAREP_MUTATIONS])
def test_suite_catches_a_wrong_qarepconv_fusion(mutation, monkeypatch):
    config = dict(c1=8, c2=8, k=3, g=2)
    x = _input(config, torch.float64, seed=0)
    block, _ = qarep_pair(config, torch.float64, seed=0)
    monkeypatch.setattr(QARepConv, "get_equivalent_kernel_bias", lambda self: qarep_fusion(self, mutation))
    wrong = reparameterize(block)
    if mutation is None:  # the written-out fusion is right: the mutants differ from it by their mutation alone
        assert_fused_equal(block, wrong, x)
        return
    with pytest.raises(AssertionError):
        assert_fused_equal(block, wrong, x)


# --- QuantRepConv: quantization-aware training of the deployed conv -------------------------------------------------


def quant_pair(config: dict, dtype: torch.dtype, seed: int, bits: int = 8) -> tuple[QuantRepConv, QuantRepConv]:
    torch.manual_seed(seed)
    block = randomize(QuantRepConv(**config, bits=bits).to(dtype), seed).eval()
    return block, reparameterize(block)


def repconv_twin(block: QuantRepConv, config: dict) -> RepConv:
    """A RepConv with ``block``'s parameters, statistics, BN eps (not in the state_dict), dtype and mode."""
    twin = RepConv(**config).to(block.rbr_dense[0].weight.dtype).train(block.training)
    twin.load_state_dict(block.state_dict())
    for mine, theirs in zip(block.modules(), twin.modules(), strict=True):
        if isinstance(mine, nn.BatchNorm2d):
            theirs.eps = mine.eps
    return twin


def integer_weights(weight: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(q, scale, integrality error) of a deployed weight, scale re-derived from it as an exporter does:
    scale = max |w| / (2^(bits-1) - 1) per output channel, q = round(w / scale)."""
    w = weight.detach().double()
    scale = fusion.symmetric_scale(w, bits)
    ratio = w / scale.reshape(-1, 1, 1, 1)
    q = ratio.round()
    return q, scale, (ratio - q).abs().max().item()


@settings(max_examples=60, deadline=None)
@given(
    config=block_configs(),
    seed=st.integers(0, 2**16),
    bits=st.sampled_from([4, 8]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_quantrepconv_eval_form_is_the_deployed_int_conv(config, seed, bits, dtype):
    block, deployed = quant_pair(config, dtype, seed, bits)
    x = _input(config, dtype, seed)
    with torch.no_grad():
        assert torch.equal(deployed(x), block(x))  # eval mode computes the deployed conv itself
    q_max = 2 ** (bits - 1) - 1
    q, scale, off = integer_weights(deployed.rbr_reparam.weight, bits)
    assert off < INTEGRALITY[dtype] and q.abs().max() <= q_max
    nonzero = deployed.rbr_reparam.weight.detach().flatten(1).abs().amax(1) > 0
    assert torch.all(q.flatten(1).abs().amax(1)[nonzero] == q_max)  # the channel's range is used in full
    # The integers are those of the float fused kernel (RepConv's fusion), not of anything else.
    reference = repconv_twin(block, config)
    float_kernel, float_bias = reference.get_equivalent_kernel_bias()
    expected = float_kernel / fusion.symmetric_scale(float_kernel, bits).reshape(-1, 1, 1, 1)
    assert torch.equal(q, expected.round())
    torch.testing.assert_close(deployed.rbr_reparam.bias, float_bias.to(dtype), rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(config=block_configs(), seed=st.integers(0, 2**16))
def test_a_conv_with_the_dequantized_int8_weights_reproduces_the_eval_output(config, seed):
    """What an INT8 export computes: int8 weights, float32 scales, w = q * scale in float32."""
    block, deployed = quant_pair(config, torch.float32, seed)
    q, scale, _ = integer_weights(deployed.rbr_reparam.weight)
    int8 = q.to(torch.int8)
    weight = int8.float() * scale.float().reshape(-1, 1, 1, 1)
    x = _input(config, torch.float32, seed, size=12)
    with torch.no_grad():
        expected = block(x)
        pre_activation = F.conv2d(x, weight, deployed.rbr_reparam.bias, block.s, block.p, block.d, block.g)
        actual = block.act(pre_activation)
    error = (actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)
    assert error < 1e-6, error


def test_onnxruntime_finds_the_same_int8_weights():
    """ONNX Runtime's symmetric int8 weight quantization (per_channel=True quantizes each output channel alone)."""
    quant_utils = pytest.importorskip("onnxruntime.quantization.quant_utils")
    from onnx import TensorProto

    _, deployed = quant_pair(dict(c1=16, c2=16, k=3, g=2), torch.float32, seed=3)
    weight = deployed.rbr_reparam.weight.detach()
    q, scale, _ = integer_weights(weight)
    for channel in range(weight.shape[0]):
        row = weight[channel].numpy().ravel()
        zero_point, ort_scale, ort_q = quant_utils.quantize_data(row, TensorProto.INT8, symmetric=True)
        assert int(zero_point) == 0
        assert torch.equal(torch.as_tensor(ort_q).long(), q[channel].flatten().long())
        assert float(ort_scale) == pytest.approx(scale[channel].item(), rel=1e-6)


def _loss_weights(out: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("config", [dict(c1=6, c2=6, g=3), dict(c1=4, c2=6, s=2), dict(c1=5, c2=5, k=5, d=2)])
def test_gradients_are_repconvs_straight_through(config, training):
    """A linear loss isolates the block: its parameter gradients are exactly RepConv's, in train mode (batch
    statistics, the quantization error carries no gradient) and in eval mode (through Q(W_R), dQ/dW = 1), and
    every branch parameter gets one."""
    torch.manual_seed(0)
    config = {**config, "act": False}
    block = randomize(QuantRepConv(**config).double(), 0).train(training)
    reference = repconv_twin(block, config)
    x = _input(config, torch.float64, seed=1)
    out, expected = block(x), reference(x)
    weights = _loss_weights(out, 2)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for (name, parameter), (_, other) in zip(block.named_parameters(), reference.named_parameters(), strict=True):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0
        torch.testing.assert_close(parameter.grad, other.grad, **TOLERANCES[torch.float64], msg=name)
    branches = {name.split(".")[0] for name, _ in block.named_parameters()}
    assert branches == {"rbr_dense", "rbr_1x1"} | ({"rbr_identity"} if block.rbr_identity is not None else set())


@settings(max_examples=30, deadline=None)
@given(config=block_configs(), seed=st.integers(0, 2**16))
def test_train_mode_adds_the_quantization_error_of_the_deployed_kernel(config, seed):
    """y_train = RepConv_train(x) + conv(x, Q(W_R) - W_R), W_R folded with the running statistics as they stand."""
    config = {**config, "act": False}
    torch.manual_seed(seed)
    block = randomize(QuantRepConv(**config).double(), seed).train()
    reference = repconv_twin(block, config)
    x = _input(config, torch.float64, seed)
    with torch.no_grad():
        out, float_out = block(x), reference(x)
        kernel, _ = reference.get_equivalent_kernel_bias()  # after the forward: both updated the same statistics
        error = fusion.fake_quantize_per_channel(kernel) - kernel
        expected = float_out + F.conv2d(x, error, None, block.s, block.p, block.d, block.g)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float64])
    torch.testing.assert_close(block.state_dict(), reference.state_dict(), rtol=0, atol=0)  # same running stats


def test_quantrepconv_is_a_repconv_with_its_switches_and_keys():
    block = QuantRepConv(8, 8, use_identity=False, use_1x1=False, bits=4)
    assert isinstance(block, RepConv) and list(block.branches()) == ["dense"] and "bits=4" in repr(block)
    assert set(block.state_dict()) == set(RepConv(8, 8, use_identity=False, use_1x1=False).state_dict())
    for bits in (1, 17, 8.0, True):
        with pytest.raises(ValueError, match="bits"):
            QuantRepConv(8, 8, bits=bits)
    torch.manual_seed(0)
    block = randomize(QuantRepConv(4, 4), 0).eval()
    by_yolov7_name = deepcopy(block)
    by_yolov7_name.fuse_repvgg_block()  # YOLOv7's name fuses to the quantized conv too
    assert torch.equal(by_yolov7_name.rbr_reparam.weight, reparameterize(block).rbr_reparam.weight)


# Mutation tests: each is a plausible wrong QuantRepConv; the checks above must reject it.
@torch.no_grad()
def fake_quantize_each_branch(block: QuantRepConv) -> tuple[torch.Tensor, torch.Tensor]:
    """The article's sketch: each branch's folded kernel fake-quantized on its own, then summed."""
    dtype = torch.float64
    kernel, bias = fusion.fold_batch_norm(block.rbr_dense[0].weight.to(dtype), block.rbr_dense[1])
    k1, b1 = fusion.fold_batch_norm(block.rbr_1x1[0].weight.to(dtype), block.rbr_1x1[1])
    eye = fusion.identity_kernel(block.c1, block.g, block.k, dtype)
    ki, bi = fusion.fold_batch_norm(eye, block.rbr_identity)
    quantized = [fusion.fake_quantize_per_channel(k) for k in (kernel, fusion.pad_to_kernel(k1, block.k), ki)]
    return sum(quantized), bias + b1 + bi


@torch.no_grad()
def fake_quantize_per_tensor(block: QuantRepConv) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole kernel (ONNX Runtime's per_channel=False) instead of one per output channel."""
    kernel, bias = block._folded_kernel_bias()
    scale = kernel.abs().max() / 127
    return (kernel / scale).round() * scale, bias


@pytest.mark.parametrize("mutant", [fake_quantize_each_branch, fake_quantize_per_tensor, "no quantization"])
def test_suite_catches_a_wrong_quantization(mutant, monkeypatch):
    if mutant == "no quantization":
        monkeypatch.setattr(fusion, "fake_quantize_per_channel", lambda weight, bits=8: weight)
    else:
        monkeypatch.setattr(QuantRepConv, "get_equivalent_kernel_bias", mutant)
    _, deployed = quant_pair(dict(c1=8, c2=8, k=3, g=2), torch.float32, seed=0)
    _, _, off = integer_weights(deployed.rbr_reparam.weight)
    assert off > 1e-2  # not int8 per channel: the export would quantize it again, to other weights


def test_suite_catches_a_train_mode_that_ignores_the_quantization(monkeypatch):
    """A QuantRepConv whose train mode is plain RepConv's trains a different function than it deploys."""
    torch.manual_seed(0)
    config = dict(c1=4, c2=4, act=False)
    block = randomize(QuantRepConv(**config).double(), 0).train()
    x = _input(config, torch.float64, seed=0)
    reference = repconv_twin(block, config)
    with torch.no_grad():
        assert (block(x) - reference(x)).abs().max() > 1e-4  # the quantization error is there, and it is not small


# --- fake quantization itself ---------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    channels=st.integers(1, 8),
    per_channel=st.integers(1, 30),
    bits=st.sampled_from([2, 4, 8, 16]),
    seed=st.integers(0, 2**16),
    zero_channel=st.booleans(),
)
def test_fake_quantization_is_symmetric_per_channel_with_a_straight_through_gradient(
    channels, per_channel, bits, seed, zero_channel
):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, per_channel, 1, 1, dtype=torch.float64, generator=generator)
    weight = weight * torch.rand(channels, 1, 1, 1, dtype=torch.float64, generator=generator) * 10
    if zero_channel:
        weight[0] = 0
    weight.requires_grad_(True)
    quantized = fusion.fake_quantize_per_channel(weight, bits)
    scale = fusion.symmetric_scale(weight, bits).reshape(-1, 1, 1, 1)
    q_max = 2 ** (bits - 1) - 1
    q = quantized.detach() / scale
    assert (q - q.round()).abs().max() < INTEGRALITY[torch.float64] and q.round().abs().max() <= q_max
    assert ((quantized - weight).abs() <= scale / 2 * (1 + 1e-12)).all()  # round to nearest
    if zero_channel:
        assert scale[0].item() == 1 and torch.all(quantized[0] == 0)
    quantized.backward(torch.ones_like(quantized))
    assert torch.equal(weight.grad, torch.ones_like(weight))  # straight through, the clamp never binds
    # PyTorch's per-channel fake quantization agrees (it multiplies by 1/scale in float32: ties may round apart).
    torch_q = torch.fake_quantize_per_channel_affine(
        weight.detach().float(), scale.flatten().float(), torch.zeros(channels, dtype=torch.int32), 0, -q_max, q_max
    )
    apart = (torch_q.double() / scale).round() != q.round()
    ratio = (weight.detach() / scale).abs()
    # A "tie" within float32's resolution of the ratio: 2 ulp of q_max (16 bits: 0.008), at least 1e-4.
    tie = max(1e-4, 2 * q_max * torch.finfo(torch.float32).eps)
    assert ((ratio - ratio.floor() - 0.5).abs()[apart] < tie).all()


# --- the blocks in the harness: YOLOv7-tiny and the configs --------------------------------------------------------


@pytest.mark.parametrize(("conv3x3", "block_type"), [("qarepconv", QARepConv), ("quantrepconv", QuantRepConv)])
def test_yolov7_tiny_swaps_in_the_block_with_tinys_settings(conv3x3, block_type):
    from tests.test_yolo_model import randomize_batch_norms as mild_batch_norms

    torch.manual_seed(1)
    model = YOLOv7Tiny(nc=4, conv3x3=conv3x3)
    blocks = [m for m in model.modules() if isinstance(m, block_type)]
    assert len(blocks) == 19 and sum(m.rbr_identity is not None for m in blocks) == 16
    assert all(isinstance(m.act, nn.LeakyReLU) and m.act.negative_slope == 0.1 for m in blocks)
    norms = [bn for m in blocks for bn in m.modules() if isinstance(bn, nn.BatchNorm2d)]
    assert norms and all(bn.eps == 1e-3 and bn.momentum == 0.03 for bn in norms)
    mild_batch_norms(model)
    deployed = reparameterize(model)
    x = torch.rand(1, 3, 64, 64)
    error = equivalence_error(model, deployed, x)
    assert error.max_rel < (1e-5 if conv3x3 == "qarepconv" else 1e-6), error  # quantrepconv: the same convs
    rebuilt = YOLOv7Tiny(nc=4, conv3x3=conv3x3, deploy=True)
    load_state_dict(rebuilt, deployed.state_dict())
    assert equivalence_error(deployed, rebuilt, x).max_abs == 0


@pytest.mark.parametrize(("name", "block_type"), [("qarepconv", QARepConv), ("quantrepconv", QuantRepConv)])
def test_block_and_variant_configs_build_the_block(name, block_type, compose_config):
    from hydra.utils import instantiate

    for override in (f"+variant={name}", f"block={name}"):
        cfg = compose_config(override)
        model = instantiate(cfg.model)
        blocks = [m for m in model.modules() if isinstance(m, (RepConv, QARepConv))]
        assert blocks and all(type(m) is block_type for m in blocks)
    assert cfg.block._target_ == f"repablate.nn.{block_type.__name__}"
    assert compose_config(f"+variant={name}").variant == name
    block = instantiate(compose_config(f"block={name}").block)(4, 4, s=1)
    assert isinstance(block, block_type)

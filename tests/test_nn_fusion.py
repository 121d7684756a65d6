"""Property tests: every RepConv a user can build fuses into one conv computing the same function.

Tolerances: float32 atol 1e-5 / rtol 1e-4; float64 atol = rtol = 1e-10. BN statistics are random and
far from the defaults (mean != 0, var != 1, gamma of either sign, beta != 0, eps up to 0.1), so a fusion that
ignores any of them fails. ``equivalence_error`` is exact where it must be: 0 for identical finite models, inf
wherever either output holds a NaN or an infinity.
"""

from __future__ import annotations

from copy import deepcopy as copy_module

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from repablate.nn import RepConv, equivalence_error, fusion, reparameterize

TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def randomize_batch_norms(model: nn.Module, seed: int) -> None:
    """Non-trivial running statistics, affine parameters and eps for every BN in ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator))
                module.running_var.copy_(torch.rand(n, generator=generator) * 3 + 0.1)
                module.weight.copy_(torch.rand(n, generator=generator) * 4 - 2)
                module.bias.copy_(torch.randn(n, generator=generator))
                module.eps = float(torch.tensor([1e-5, 1e-3, 0.1])[torch.randint(3, (1,), generator=generator)])


@st.composite
def repconv_configs(draw):
    """Any valid RepConv: k in {1, 3, 5}, stride 1/2, dilation 1/2, groups from 1 to depthwise, branches on/off."""
    groups = draw(st.integers(1, 4))
    depthwise = draw(st.booleans())
    c1 = groups * (1 if depthwise else draw(st.integers(1, 3)))
    same_channels = draw(st.booleans())
    c2 = c1 if same_channels else groups * draw(st.integers(1, 3))
    k = draw(st.sampled_from([1, 3, 5]))
    s = draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([1, 2]))
    identity_possible = c1 == c2 and s == 1
    use_identity = draw(st.booleans()) if identity_possible else draw(st.sampled_from([None, False]))
    return dict(
        c1=c1,
        c2=c2,
        k=k,
        s=s,
        g=groups,
        d=d,
        use_identity=use_identity,
        use_1x1=draw(st.booleans()),
        act=draw(st.sampled_from([True, False])),
    )


def fused_pair(config: dict, dtype: torch.dtype, seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    block = RepConv(**config).to(dtype)
    randomize_batch_norms(block, seed)
    return block.eval(), reparameterize(block)


@settings(max_examples=80, deadline=None)
@given(
    config=repconv_configs(),
    seed=st.integers(0, 2**16),
    size=st.integers(5, 13),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_fused_repconv_equals_branches(config, seed, size, dtype):
    block, deployed = fused_pair(config, dtype, seed)
    x = torch.randn(2, config["c1"], size, size + 1, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), block(x), **TOLERANCES[dtype])
    assert deployed.rbr_reparam.weight.shape == (config["c2"], config["c1"] // config["g"], config["k"], config["k"])


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 6), per_group=st.integers(1, 4), k=st.sampled_from([1, 3, 5]), seed=st.integers(0, 999))
def test_identity_kernel_is_the_identity(groups, per_group, k, seed):
    channels = groups * per_group
    x = torch.randn(1, channels, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    kernel = fusion.identity_kernel(channels, groups, k, torch.float64)
    assert torch.equal(F.conv2d(x, kernel, padding=k // 2, groups=groups), x)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 999), k=st.sampled_from([1, 3, 5]))
def test_padded_kernel_computes_the_same_conv(seed, k):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64, generator=generator)
    w = torch.randn(4, 3, 1, 1, dtype=torch.float64, generator=generator)
    padded = fusion.pad_to_kernel(w, k)
    torch.testing.assert_close(F.conv2d(x, padded, padding=k // 2), F.conv2d(x, w), atol=1e-12, rtol=0)


def yolov7_identity_kernel(channels, groups, k, dtype=torch.float32, device=None):
    """YOLOv7's construction: a (C, C/g) matrix with fill_diagonal_ -- wrong as soon as groups > 1."""
    matrix = torch.zeros(channels, channels // groups, dtype=dtype, device=device)
    matrix.fill_diagonal_(1.0)
    return fusion.pad_to_kernel(matrix[:, :, None, None], k)


def test_suite_catches_a_wrong_identity_kernel(monkeypatch):
    config = dict(c1=8, c2=8, k=3, g=2)
    block, deployed = fused_pair(config, torch.float64, seed=0)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    assert equivalence_error(block, deployed, x).max_abs < 1e-10
    monkeypatch.setattr(fusion, "identity_kernel", yolov7_identity_kernel)
    _, wrong = fused_pair(config, torch.float64, seed=0)
    with pytest.raises(AssertionError):
        with torch.no_grad():
            torch.testing.assert_close(wrong(x), block(x), **TOLERANCES[torch.float64])


def test_suite_catches_an_identity_bn_folded_with_gamma_only(monkeypatch):
    """The article's sample scales the identity kernel by gamma and ignores mean, variance and beta."""
    block, deployed = fused_pair(dict(c1=4, c2=4), torch.float64, seed=1)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    real_fold = fusion.fold_batch_norm
    copy = copy_module(block)

    def fold_ignoring_identity_stats(weight, bn, conv_bias=None):
        if bn is copy.rbr_identity:
            return weight * bn.weight.reshape(-1, 1, 1, 1), torch.zeros_like(bn.bias)
        return real_fold(weight, bn, conv_bias)

    monkeypatch.setattr(fusion, "fold_batch_norm", fold_ignoring_identity_stats)
    wrong = reparameterize(copy, inplace=True)
    assert equivalence_error(block, wrong, x).max_abs > 1e-3
    assert equivalence_error(block, deployed, x).max_abs < 1e-10


class _Fixed(nn.Module):
    """Returns a fixed tensor (plus 0 * x, so the input still flows through): an output chosen by the test."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.register_buffer("output", output)

    def forward(self, x):
        return self.output + 0 * x.sum()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    numel=st.integers(1, 40),
    bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    where=st.sampled_from(["train", "deploy", "both"]),
    position=st.floats(0, 1, exclude_max=True),
)
def test_a_non_finite_output_is_never_equivalent(seed, numel, bad, where, position):
    """NaN or +-inf anywhere in either output gives max_abs = max_rel = inf (exactly), so `not err <= tol` holds
    for every tolerance -- also when both models put the same NaN or inf at the same place."""
    finite = torch.randn(numel, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    broken = finite.clone()
    broken[int(position * numel)] = bad
    train, deploy = (
        (broken if where in ("train", "both") else finite),
        (broken if where in ("deploy", "both") else finite),
    )
    error = equivalence_error(_Fixed(train), _Fixed(deploy), torch.zeros(1))
    assert error.max_abs == float("inf") and error.max_rel == float("inf")
    assert not error.max_rel <= 1e30 and not error.max_abs < 1e30


def test_a_nan_weight_makes_a_model_differ_from_its_own_copy():
    torch.manual_seed(0)
    block = RepConv(4, 4).eval()
    with torch.no_grad():
        block.rbr_dense[0].weight[0, 0, 1, 1] = float("nan")
    error = equivalence_error(block, copy_module(block), torch.randn(1, 4, 6, 6))
    assert error == (float("inf"), float("inf"))


def test_a_nan_only_in_a_nested_output_is_found():
    class Pair(nn.Module):
        def __init__(self, second: float):
            super().__init__()
            self.second = second

        def forward(self, x):
            return {"a": x * 2, "b": (x, x + self.second)}

    error = equivalence_error(Pair(1.0), Pair(float("nan")), torch.randn(3, 2))
    assert error.max_abs == error.max_rel == float("inf")


@settings(max_examples=30, deadline=None)
@given(config=repconv_configs(), seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_identical_finite_models_are_exactly_equivalent(config, seed, dtype):
    block, _ = fused_pair(config, dtype, seed)
    x = torch.randn(2, config["c1"], 7, 7, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    assert equivalence_error(block, copy_module(block), x) == (0.0, 0.0)  # same weights, same ops: exactly 0

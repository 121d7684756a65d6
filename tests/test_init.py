"""repablate.models.init: the article's RepConv initialization, checked by its statistics."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from repablate.models import article_init, default_init, small
from repablate.nn import Conv, RepConv, reparameterize


def sample_std_tolerance(n: int) -> float:
    # The sample std of n normal draws has relative standard error ~ 1 / sqrt(2n); 6 of those is a ~1e-9 miss.
    return 6 / math.sqrt(2 * n)


@settings(max_examples=15, deadline=None)
@given(c1=st.integers(8, 96), c2=st.integers(8, 96), k=st.sampled_from([3, 5]), seed=st.integers(0, 2**16))
def test_dense_kernel_is_kaiming_normal_fan_out(c1, c2, k, seed):
    torch.manual_seed(seed)
    block = article_init(RepConv(c1, c2, k=k))
    weight = block.rbr_dense[0].weight
    expected_std = math.sqrt(2.0) / math.sqrt(c2 * k * k)  # gain for ReLU over sqrt(fan_out)
    n = weight.numel()
    assert abs(weight.std().item() / expected_std - 1) < sample_std_tolerance(n)
    assert abs(weight.mean().item()) < 6 * expected_std / math.sqrt(n)


def test_dense_fan_out_on_a_large_conv_is_not_fan_in():
    # 64 -> 512 channels: fan_in and fan_out differ by 8x, so the two modes' stds differ by sqrt(8).
    torch.manual_seed(0)
    weight = article_init(RepConv(64, 512)).rbr_dense[0].weight
    assert weight.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.01)


@settings(max_examples=10, deadline=None)
@given(c=st.integers(16, 128), seed=st.integers(0, 2**16))
def test_1x1_is_normal_std_0_001_and_identity_gamma_is_zero(c, seed):
    torch.manual_seed(seed)
    block = article_init(RepConv(c, c))
    weight = block.rbr_1x1[0].weight
    assert abs(weight.std().item() / 0.001 - 1) < sample_std_tolerance(weight.numel())
    assert torch.count_nonzero(block.rbr_identity.weight) == 0
    assert torch.equal(block.rbr_identity.bias, torch.zeros(c))  # beta untouched (PyTorch's 0)
    assert torch.equal(block.rbr_dense[1].weight, torch.ones(c))  # other BNs untouched


def test_identity_branch_contributes_only_beta_at_init():
    torch.manual_seed(0)
    block = article_init(RepConv(8, 8)).eval()
    x = torch.randn(2, 8, 5, 5)
    assert torch.count_nonzero(block.rbr_identity(x)) == 0


def test_blocks_without_1x1_or_identity_are_fine():
    torch.manual_seed(0)
    block = article_init(RepConv(8, 16, s=2, use_1x1=False))
    assert block.rbr_1x1 is None and block.rbr_identity is None
    assert block.rbr_dense[0].weight.std().item() == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.1)


def test_deployed_blocks_plain_convs_and_head_are_left_alone():
    torch.manual_seed(0)
    plain = small(block=functools.partial(Conv, k=3))
    fused = reparameterize(small())
    for model in (plain, fused):
        before = copy.deepcopy(model.state_dict())
        article_init(model)
        after = model.state_dict()
        assert all(torch.equal(before[key], after[key]) for key in before)


def test_whole_model_is_initialized_in_place():
    torch.manual_seed(0)
    model = small()
    assert article_init(model) is model
    blocks = [m for m in model.modules() if isinstance(m, RepConv)]
    assert all(torch.count_nonzero(b.rbr_identity.weight) == 0 for b in blocks if b.rbr_identity is not None)
    assert sum(b.rbr_identity is not None for b in blocks) == 2
    assert all(b.rbr_1x1[0].weight.abs().max() < 0.01 for b in blocks)


def test_default_init_changes_nothing():
    torch.manual_seed(0)
    model = small()
    before = copy.deepcopy(model.state_dict())
    assert default_init(model) is model
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_bad_std_is_refused():
    with pytest.raises(ValueError, match="std_1x1=-1"):
        article_init(nn.Sequential(RepConv(4, 4)), std_1x1=-1)

"""YOLOv7-tiny: the official figures, the swappable 3x3 convs, and exact fusion of the whole detector."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from repablate.models.yolov7_tiny import IDetect, YOLOv7Tiny
from repablate.nn import Conv, RepConv, equivalence_error, is_deployed, load_state_dict, reparameterize

VARIANTS = ("plain", "repconv", "repconv_n")


def _flops(model: torch.nn.Module, size: int) -> int:
    """FLOPs (2 per multiply-add) of one forward at size x size, counted on the meta device (nothing computed)."""
    model = model.to("meta").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    return counter.get_total_flops()


def randomize_batch_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial statistics and affine parameters, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


@pytest.fixture(scope="module")
def official_640():
    """One real forward of the official model at 640x640 (slow on CPU: once per session)."""
    torch.manual_seed(0)
    model = YOLOv7Tiny(nc=80).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        decoded, raw = model(torch.randn(1, 3, 640, 640))
    return model, decoded, raw, counter.get_total_flops()


def test_official_figures_at_640(official_640):
    model, _, _, flops = official_640
    params = sum(p.numel() for p in model.parameters())
    assert params == 6_228_762  # the official (and the article's) 6.23M
    assert round(flops / 1e9, 2) == 13.70, flops  # 2 FLOPs per multiply-add, as YOLOv7 reports


def test_output_shapes_and_strides_at_640(official_640):
    model, decoded, raw, _ = official_640
    assert model.stride.tolist() == [8, 16, 32]
    assert [tuple(x.shape) for x in raw] == [(1, 3, 80, 80, 85), (1, 3, 40, 40, 85), (1, 3, 20, 20, 85)]
    assert decoded.shape == (1, 3 * (80 * 80 + 40 * 40 + 20 * 20), 85)
    scores = decoded[..., 4:]
    assert scores.min() >= 0 and scores.max() <= 1  # sigmoids
    assert decoded[..., 2:4].min() >= 0  # widths and heights


def test_training_mode_returns_raw_maps_for_non_square_input():
    model = YOLOv7Tiny(nc=3).train()
    raw = model(torch.randn(2, 3, 64, 96))
    assert [tuple(x.shape) for x in raw] == [(2, 3, 8, 12, 8), (2, 3, 4, 6, 8), (2, 3, 2, 3, 8)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_stride1_3x3_convs_are_swapped(variant):
    model = YOLOv7Tiny(nc=80, conv3x3=variant)
    repconvs = [m for m in model.modules() if isinstance(m, RepConv)]
    three_by_three_convs = [m for m in model.modules() if isinstance(m, Conv) and m.conv.kernel_size == (3, 3)]
    if variant == "plain":
        assert not repconvs
        assert len(three_by_three_convs) == 19 + 4  # 19 swappable, plus 4 stride-2 convs
    else:
        assert len(repconvs) == 19 and len(three_by_three_convs) == 4
        assert all(m.conv.stride == (2, 2) for m in three_by_three_convs)
        with_identity = sum(m.rbr_identity is not None for m in repconvs)
        assert with_identity == (16 if variant == "repconv" else 0)  # ELAN convs are C->C, head convs are not
        assert all(isinstance(m.act, torch.nn.LeakyReLU) and m.act.negative_slope == 0.1 for m in repconvs)


@pytest.mark.parametrize("variant", ("repconv", "repconv_n"))
def test_deployed_variant_has_the_shape_params_and_flops_of_deployed_plain(variant):
    plain = reparameterize(YOLOv7Tiny(nc=80, conv3x3="plain"))
    swapped = reparameterize(YOLOv7Tiny(nc=80, conv3x3=variant))
    assert is_deployed(plain) and is_deployed(swapped)
    shapes = [tuple(p.shape) for p in plain.parameters()]
    assert [tuple(p.shape) for p in swapped.parameters()] == shapes
    assert sum(p.numel() for p in swapped.parameters()) == sum(p.numel() for p in plain.parameters())
    assert _flops(swapped, 640) == _flops(plain, 640)


@pytest.mark.parametrize("variant", VARIANTS)
def test_deploy_form_detections_equal_training_form(variant):
    torch.manual_seed(1)
    model = YOLOv7Tiny(nc=4, conv3x3=variant)
    randomize_batch_norms(model)
    deployed = reparameterize(model)
    x = torch.rand(2, 3, 64, 64)
    error = equivalence_error(model, deployed, x)
    # Fusion is computed in float64 and cast once; ~40 float32 layers deep, outputs (pixels and sigmoids, up to
    # ~100) agree to a relative 1e-5.
    assert error.max_rel < 1e-5, error
    # A state_dict of the deployed model loads into the model built deployed, and gives the same outputs.
    rebuilt = YOLOv7Tiny(nc=4, conv3x3=variant, deploy=True)
    load_state_dict(rebuilt, deployed.state_dict())
    assert equivalence_error(deployed, rebuilt, x).max_abs == 0


def test_training_state_dict_is_refused_by_a_deployed_model():
    with pytest.raises(RuntimeError, match="differ in form"):
        load_state_dict(YOLOv7Tiny(nc=2, deploy=True), YOLOv7Tiny(nc=2).state_dict())


@settings(max_examples=25, deadline=None)
@given(
    channels=st.lists(st.integers(1, 16), min_size=1, max_size=3),
    nc=st.integers(1, 6),
    implicit_scale=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_idetect_fusion_folds_implicit_layers_exactly(channels, nc, implicit_scale, seed):
    torch.manual_seed(seed)
    levels = len(channels)
    head = IDetect(nc, channels, anchors=[(10, 10, 20, 20, 30, 30)] * levels, strides=[8 * 2**i for i in range(levels)])
    for add, mul in zip(head.ia, head.im, strict=True):
        add.implicit.data.normal_(0, implicit_scale)
        mul.implicit.data.normal_(1, implicit_scale)
    features = [torch.randn(2, c, 8 >> i, 8 >> i) for i, c in enumerate(channels)]
    deployed = reparameterize(head)
    assert deployed.deploy and not hasattr(deployed, "ia")
    # float64 folding, one float32 rounding: relative 1e-5 of the largest output.
    assert equivalence_error(head, deployed, (features,)).max_rel < 1e-5


@pytest.mark.parametrize("bad", ["Plain", "RepConv", 3])
def test_unknown_conv3x3_is_refused_with_the_allowed_values(bad):
    with pytest.raises(ValueError, match=r"conv3x3=.*plain.*repconv.*repconv_n"):
        YOLOv7Tiny(nc=2, conv3x3=bad)


def test_the_old_name_original_is_refused_naming_plain():
    with pytest.raises(ValueError, match=r'conv3x3="original" is now called "plain"'):
        YOLOv7Tiny(nc=2, conv3x3="original")
    assert YOLOv7Tiny(nc=2).conv3x3 == "plain"  # the default: the official conv


def test_block_factory_gets_tiny_settings():
    # As the harness's block configs arrive: partials of RepConv / Conv with k=3 and their defaults (SiLU).
    model = YOLOv7Tiny(nc=2, conv3x3=partial(RepConv, k=3, use_1x1=False))
    repconvs = [m for m in model.modules() if isinstance(m, RepConv)]
    assert len(repconvs) == 19 and all(m.rbr_1x1 is None for m in repconvs)
    assert all(isinstance(m.act, torch.nn.LeakyReLU) and m.rbr_dense[1].eps == 1e-3 for m in repconvs)
    plain = YOLOv7Tiny(nc=2, conv3x3=partial(Conv, k=3))
    assert str(plain) == str(YOLOv7Tiny(nc=2, conv3x3="plain"))

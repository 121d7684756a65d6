"""repablate.models.classifier: structure, knobs, deploy-form loading, and the RepVGG papers' parameter counts."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from repablate.models import RepVGGClassifier, repconv_relu, repvgg_a0, repvgg_a1, repvgg_b0, small
from repablate.nn import Conv, RepConv, equivalence_error, is_deployed, load_state_dict, reparameterize


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


PRESETS = {"repvgg_a0": (repvgg_a0, 8.30), "repvgg_a1": (repvgg_a1, 12.78), "repvgg_b0": (repvgg_b0, 14.33)}


@pytest.fixture(scope="session")
def big_presets() -> dict[str, tuple[nn.Module, nn.Module]]:
    """Each RepVGG preset once per session, in training and deploy form (they are big)."""
    torch.manual_seed(0)
    return {name: (build(), build(deploy=True)) for name, (build, _) in PRESETS.items()}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_repvgg_deploy_params_match_paper(big_presets, name):
    # The paper prints millions truncated to two decimals (A0: 8,309,384 -> 8.30; rounding would give 8.31).
    _, paper_millions = PRESETS[name]
    _, deployed = big_presets[name]
    assert math.floor(n_params(deployed) / 1e4) / 100 == paper_millions
    assert deployed.head.out_features == 1000


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_repvgg_fused_training_form_loads_into_deploy_form(big_presets, name):
    trained, deployed = big_presets[name]
    fused = reparameterize(trained)
    assert n_params(fused) == n_params(deployed) < n_params(trained)
    load_state_dict(deployed, fused.state_dict())
    x = torch.randn(1, 3, 32, 32)  # any size works (global pooling); 224 would only cost time
    assert torch.equal(deployed.eval()(x), fused(x))


def test_repvgg_stage_layout():
    model = repvgg_a0(num_classes=10)
    assert model.widths == [48, 48, 96, 192, 1280]
    assert model.depths == [1, 2, 4, 14, 1]
    assert model.strides == [2, 2, 2, 2, 2]
    assert all(isinstance(m.act, nn.ReLU) for m in model.modules() if isinstance(m, RepConv))
    assert repvgg_b0(num_classes=10).depths == [1, 4, 6, 16, 1]


def _activations(model: nn.Module) -> list[type]:
    return [type(m.act) for m in model.modules() if isinstance(m, (Conv, RepConv))]


@pytest.mark.parametrize("preset", ["repvgg_a0", "repvgg_a1", "repvgg_b0"])
def test_repvgg_preset_from_config_is_the_python_preset_with_relu(compose_config, preset):
    from hydra.utils import instantiate

    configured = instantiate(compose_config(f"model={preset}", "data=cifar10").model)
    built = PRESETS[preset][0](num_classes=10, in_channels=3)
    assert set(_activations(configured)) == set(_activations(built)) == {nn.ReLU}
    assert str(configured) == str(built)


@pytest.mark.parametrize("block", ["plain", "repconv_n"])
def test_repvgg_preset_puts_relu_after_any_block_and_small_keeps_the_blocks_own(compose_config, block):
    from hydra.utils import instantiate

    preset = instantiate(compose_config("model=repvgg_a0", f"block={block}").model)
    assert set(_activations(preset)) == {nn.ReLU}
    assert set(_activations(instantiate(compose_config("model=small", f"block={block}").model))) == {nn.SiLU}


def test_act_is_built_once_per_block_and_passed_to_it():
    model = small(block=functools.partial(Conv, k=3), act=nn.GELU)
    acts = [m.act for m in model.modules() if isinstance(m, Conv)]
    assert len(acts) == 5 and all(type(a) is nn.GELU for a in acts) and len({id(a) for a in acts}) == 5
    assert set(_activations(repvgg_a0(num_classes=10, block=functools.partial(Conv, k=3)))) == {nn.ReLU}
    assert set(_activations(repvgg_a0(num_classes=10, act=None, block=functools.partial(Conv, k=3)))) == {nn.SiLU}
    assert set(_activations(RepVGGClassifier(3, 1, widths=(4,), depths=(2,), act=nn.Hardswish))) == {nn.Hardswish}


def test_small_is_small_and_keeps_8x8_spatial():
    model = small()
    assert 3_000 <= n_params(model) <= 60_000
    features = model.stages(torch.randn(2, 1, 8, 8))
    assert features.shape == (2, 32, 2, 2)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_block_factory_is_used_and_called_with_deploy():
    calls = []

    def block(c_in, c_out, s=1, deploy=False):
        calls.append((c_in, c_out, s, deploy))
        return Conv(c_in, c_out, k=3, s=s, deploy=deploy)

    RepVGGClassifier(5, 3, widths=(4, 8), depths=(1, 2), strides=(2, 1), block=block)
    assert calls == [(3, 4, 2, False), (4, 8, 1, False), (8, 8, 1, False)]
    calls.clear()
    model = RepVGGClassifier(5, 3, widths=(4, 8), depths=(1, 2), block=block, deploy=True)
    assert [c[3] for c in calls] == [True, True, True] and is_deployed(model)


def test_plain_conv_block_from_a_partial():
    plain = small(block=functools.partial(Conv, k=3, act=nn.ReLU()))
    assert not any(isinstance(m, RepConv) for m in plain.modules())
    assert sum(isinstance(m, Conv) for m in plain.modules()) == 5
    assert n_params(plain) < n_params(small())


def test_knobs_scale_widths_and_depths():
    model = small(width_multiplier=0.5, depth_multiplier=2)
    assert model.widths == [8, 16, 16] and model.depths == [2, 4, 4]
    assert len(model.stages[1]) == 4


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"widths": (8, 8), "depths": (1,)}, "one entry per stage"),
        ({"widths": (8, 0), "depths": (1, 1)}, "widths=[8, 0]"),
        ({"widths": (8,), "depths": (1,), "width_multiplier": -1.0}, "width_multiplier=-1.0"),
        ({"widths": (8,), "depths": (1,), "depth_multiplier": 0}, "depth_multiplier=0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, bad):
    with pytest.raises(ValueError, match=bad.replace("[", r"\[").replace("]", r"\]")):
        RepVGGClassifier(10, 1, **kwargs)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes=0"):
        small(num_classes=0)


@settings(max_examples=12, deadline=None)
@given(
    stages=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 3), st.integers(1, 2)), min_size=1, max_size=3),
    in_channels=st.integers(1, 3),
    num_classes=st.integers(1, 7),
    size=st.integers(3, 12),
)
def test_any_layout_fuses_equivalently(stages, in_channels, num_classes, size):
    # Tolerance: float32 fusion of a few stacked blocks, relative to the output scale: 1e-4.
    widths, depths, strides = (list(column) for column in zip(*stages, strict=True))
    torch.manual_seed(0)
    model = RepVGGClassifier(num_classes, in_channels, widths, depths, strides=strides, block=repconv_relu)
    model.train()(torch.randn(4, in_channels, size, size))  # gives BN non-trivial running statistics
    x = torch.randn(2, in_channels, size, size)
    assert model(x).shape == (2, num_classes)
    fused = reparameterize(model)
    assert equivalence_error(model, fused, x).max_rel < 1e-4
    target = RepVGGClassifier(num_classes, in_channels, widths, depths, strides=strides, deploy=True)
    load_state_dict(target, fused.state_dict())

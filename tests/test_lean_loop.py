"""What the harness skips per training step to stay close to a bare PyTorch loop, and that skipping changes nothing
it computes: the do-nothing profiler is a cheaper one, and gradient clipping still clips when it is asked to."""

from __future__ import annotations

import copy

import pytest
from lightning.pytorch.profilers import SimpleProfiler

from repablate.train.main import assemble
from repablate.train.profiler import NoProfiler

QUICK = ("+variant=repconv", "logger=csv", "~callbacks.deploy_check", "~callbacks.progress_bar")


def test_the_default_profiler_is_the_cheap_no_op_and_a_configured_one_is_kept(compose_config):
    assert isinstance(assemble(compose_config(*QUICK)).trainer.profiler, NoProfiler)
    assert isinstance(assemble(compose_config(*QUICK, "+trainer.profiler=simple")).trainer.profiler, SimpleProfiler)
    profiler = NoProfiler()
    with profiler.profile("a"), profiler.profile("b"):  # re-entrant: one shared context for every action
        pass


def _weight_change(compose_config, *overrides: str) -> float:
    """How far one SGD step (no momentum, no weight decay) moves the weights."""
    common = (*QUICK, "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=0")
    parts = assemble(
        compose_config(
            *common, "optimizer.momentum=0", "optimizer.nesterov=false", "optimizer.weight_decay=0", *overrides
        )
    )
    before = copy.deepcopy(dict(parts.module.model.named_parameters()))
    parts.trainer.fit(parts.module, datamodule=parts.datamodule)
    after = dict(parts.module.model.named_parameters())
    return max((after[name] - before[name]).abs().max().item() for name in before)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_still_clips_when_a_clip_value_is_set(algorithm, compose_config):
    free = _weight_change(compose_config)
    clipped = _weight_change(
        compose_config, "trainer.gradient_clip_val=1e-6", f"trainer.gradient_clip_algorithm={algorithm}"
    )
    # lr 0.1 (conf/optimizer/sgd.yaml): a clipped step moves a weight by at most 1e-7, about float32's rounding of
    # a weight near 1 (1.2e-7); an unclipped first step moves some weight by ~1e-2.
    assert free > 1e-3 and clipped < 5e-7

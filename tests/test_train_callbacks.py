"""BranchGradientMonitor, DeployCheck and the schedule, on hand-made models and gradients."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from repablate.nn import Conv, RepConv
from repablate.train.callbacks import BranchGradientMonitor, DeployCheck, DeployMismatchError
from repablate.train.schedules import warmup_schedule


def _monitor_step(monitor, model, step, scales):
    """Give every branch gradient entries of magnitude scales[branch], then run the monitor at ``step``."""
    for layer in model:
        for name, branch in (layer.branches() if isinstance(layer, RepConv) else {}).items():
            for p in branch.parameters():
                p.grad = torch.full_like(p, scales[name])
    trainer = SimpleNamespace(global_step=step, loggers=[])
    monitor.on_before_optimizer_step(trainer, SimpleNamespace(model=model, device=torch.device("cpu")), None)


def _model():
    return nn.Sequential(RepConv(4, 4), RepConv(4, 4, use_identity=False), Conv(4, 4, 3))


def test_starved_branch_is_warned_once_per_streak(tmp_path):
    model = _model()
    monitor = BranchGradientMonitor(every_n_steps=2, threshold=0.01, patience=3, csv_path=tmp_path / "g.csv")
    monitor.on_fit_start(None, SimpleNamespace(model=model))
    healthy, starved = {"dense": 1.0, "1x1": 1.0, "identity": 1.0}, {"dense": 1.0, "1x1": 1e-6, "identity": 1.0}
    for step, scales in enumerate([starved] * 5 + [healthy] + [starved] * 3):
        _monitor_step(monitor, model, 2 * step, scales)
        _monitor_step(monitor, model, 2 * step + 1, healthy)  # off-step: ignored
    # two layers have a 1x1 branch; each starved for 5 checks (one warning), recovered, starved for 3 (another)
    assert monitor.warnings == 4
    monitor.on_fit_end(None, None)
    with open(tmp_path / "g.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {int(r["step"]) for r in rows} == set(range(0, 18, 2))
    assert {r["layer"] for r in rows} == {"0", "1"}  # the plain Conv has no branches to compare
    summary = monitor.summary()
    assert summary["grad/warnings"] == 4 and summary["grad/share_min/1x1"] < 1e-5


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(1e-6, 1e3), min_size=3, max_size=3))
def test_branch_shares_of_a_layer_sum_to_one(magnitudes):
    model = nn.Sequential(RepConv(3, 3))
    monitor = BranchGradientMonitor(every_n_steps=1)
    monitor.on_fit_start(None, SimpleNamespace(model=model))
    _monitor_step(monitor, model, 0, dict(zip(["dense", "1x1", "identity"], magnitudes, strict=True)))
    shares = [row[4] for row in monitor._rows]
    assert sum(shares) == pytest.approx(1.0, abs=1e-9) and all(0 <= s <= 1 for s in shares)


class _BrokenRepConv(RepConv):
    """Fuses into the wrong kernel: the bug DeployCheck exists to catch."""

    def reparameterize(self):
        super().reparameterize()
        with torch.no_grad():
            self.rbr_reparam.bias.add_(0.5)


def test_deploy_check_fails_loudly_on_a_wrong_fusion(tmp_path):
    model = nn.Sequential(_BrokenRepConv(2, 2), nn.Flatten())
    batches = [(torch.randn(4, 2, 5, 5), torch.zeros(4, dtype=torch.long))]
    datamodule = SimpleNamespace(val_dataloader=lambda: batches, test_dataloader=lambda: batches)
    check = DeployCheck(tmp_path / "deploy.pt")
    with pytest.raises(DeployMismatchError, match="max_rel_error"):
        check.on_fit_end(SimpleNamespace(datamodule=datamodule), SimpleNamespace(model=model, device="cpu"))
    assert not (tmp_path / "deploy.pt").exists()


@pytest.mark.parametrize("decay", ["cosine", "constant"])
def test_warmup_schedule_rises_linearly_then_decays(decay):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_schedule(optimizer, total_steps=20, steps_per_epoch=5, decay=decay, warmup_epochs=1,
                               warmup_start_factor=0.2)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:6] == pytest.approx([0.2, 0.36, 0.52, 0.68, 0.84, 1.0])
    assert lrs[-1] == pytest.approx(1.0) if decay == "constant" else lrs[-1] < 0.02


def test_warmup_schedule_rejects_an_unknown_decay():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="decay='step' is not allowed"):
        warmup_schedule(optimizer, total_steps=10, steps_per_epoch=5, decay="step")

"""BranchGradientMonitor, DivergenceGuard, DeployCheck, TrainingThroughput, RunConfigInCheckpoints and the
schedule, on hand-made models and gradients."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from repablate.nn import Conv, RepConv
from repablate.train.callbacks import (
    BranchGradientMonitor,
    DeployCheck,
    DeployMismatchError,
    DivergenceGuard,
    RunConfigInCheckpoints,
    TrainingDiverged,
    TrainingThroughput,
)
from repablate.train.checkpoints import CheckpointError, build_model
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
    results = monitor.run_results()
    assert results["grad/warnings"] == 4 and results["grad/share_min/1x1"] < 1e-5


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
        check.on_fit_end(
            SimpleNamespace(datamodule=datamodule, global_step=1), SimpleNamespace(model=model, device="cpu")
        )
    assert not (tmp_path / "deploy.pt").exists()


def test_deploy_check_refuses_a_diverged_model_as_divergence(tmp_path):
    model = nn.Sequential(RepConv(2, 2), nn.Flatten())
    with torch.no_grad():
        model[0].rbr_1x1[1].running_var[0] = float("inf")  # a buffer is enough to make every output NaN
    batches = [(torch.randn(4, 2, 5, 5), torch.zeros(4, dtype=torch.long))]
    datamodule = SimpleNamespace(val_dataloader=lambda: batches, test_dataloader=lambda: batches)
    with pytest.raises(TrainingDiverged, match=r"1 tensors \(0.rbr_1x1.1.running_var\)") as error:
        DeployCheck(tmp_path / "deploy.pt").on_fit_end(
            SimpleNamespace(datamodule=datamodule, global_step=7), SimpleNamespace(model=model, device="cpu")
        )
    assert error.value.step == 6 and not (tmp_path / "deploy.pt").exists()


def _guard_steps(guard: DivergenceGuard, losses: list[float], first_step: int = 0) -> None:
    """Feed ``losses`` to ``guard`` as the losses of optimizer steps first_step, first_step + 1, ..., as Lightning
    calls it."""
    module = SimpleNamespace(model=nn.Linear(2, 2))
    for step, loss in enumerate(losses, start=first_step):
        guard.on_before_backward(SimpleNamespace(global_step=step), module, torch.tensor(loss, requires_grad=True))
        guard.on_train_batch_end(SimpleNamespace(global_step=step + 1), module, None, None, step)


def test_divergence_guard_stops_at_the_first_non_finite_loss_on_the_cpu():
    guard = DivergenceGuard(check_every_n_steps=10)
    with pytest.raises(TrainingDiverged, match="the training loss is inf at optimizer step 3:") as error:
        _guard_steps(guard, [2.3, 1e30, 5.0, float("inf"), float("nan")])
    assert error.value.step == 3


def test_divergence_guard_without_a_sync_per_step_still_names_the_first_bad_step():
    guard = DivergenceGuard(check_every_n_steps=5, sync_every_step=False)  # as on a GPU
    _guard_steps(guard, [2.3, 2.2, float("nan"), 2.0])  # steps 0-3, no check yet: the flag stays on the device
    with pytest.raises(TrainingDiverged, match="the training loss is nan at optimizer step 2:") as error:
        _guard_steps(guard, [float("inf")], first_step=4)  # the check after the 5th step reads the flag
    assert error.value.step == 2


def test_divergence_guard_checks_the_weights_at_each_epoch_end():
    guard, model = DivergenceGuard(), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    trainer = SimpleNamespace(current_epoch=4, global_step=50)
    guard.on_train_epoch_end(trainer, SimpleNamespace(model=model))  # finite: nothing happens
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    message = r"after epoch 4 the model holds NaN or infinity in 1 tensors \(0.weight\)"
    with pytest.raises(TrainingDiverged, match=message):
        guard.on_train_epoch_end(trainer, SimpleNamespace(model=model))


def test_branch_gradients_are_written_when_the_fit_ends_in_an_exception(tmp_path):
    model = _model()
    monitor = BranchGradientMonitor(every_n_steps=1, csv_path=tmp_path / "g.csv")
    monitor.on_fit_start(None, SimpleNamespace(model=model))
    _monitor_step(monitor, model, 0, {"dense": 1.0, "1x1": 1.0, "identity": 1.0})
    monitor.on_exception(None, None, TrainingDiverged("nan", 1))
    with open(tmp_path / "g.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 5  # 3 branches of the RepConv + 2 of the RepConvN


@pytest.mark.parametrize("decay", ["cosine", "constant"])
def test_warmup_schedule_rises_linearly_then_decays(decay):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_schedule(
        optimizer, total_steps=20, steps_per_epoch=5, decay=decay, warmup_epochs=1, warmup_start_factor=0.2
    )
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


def test_training_throughput_counts_images_over_train_epochs_only():
    throughput = TrainingThroughput()
    assert throughput.run_results() == {"train/images_per_s": None}  # no epoch yet
    for _ in range(2):
        throughput.on_train_epoch_start(None, None)
        for _ in range(3):
            throughput.on_train_batch_end(None, None, None, (torch.zeros(4, 1), torch.zeros(4)), 0)
        throughput.on_train_epoch_end(None, None)
    assert throughput.images == 24 and throughput.seconds > 0
    assert throughput.run_results() == {"train/images_per_s": 24 / throughput.seconds}


def test_run_config_goes_into_every_checkpoint():
    checkpoint = {}
    RunConfigInCheckpoints({"variant": "repconv"}).on_save_checkpoint(None, None, checkpoint)
    assert checkpoint["repablate_config"] == {"variant": "repconv"}


class UserBlockNet(nn.Module):
    """A user's own model, outside repablate's allow-list, following the deploy protocol."""

    def __init__(self, deploy: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_deploy_check_builds_a_users_own_model_from_the_run_config_and_warns_about_inspect(tmp_path, caplog):
    # The config is the run's own, in memory: trusted like the run. Only configs read from files face the allow-list.
    check = DeployCheck(tmp_path / "deploy.pt")
    check.run_config = {"model": {"_target_": f"{__name__}.UserBlockNet"}}
    deployed = UserBlockNet(deploy=True)
    with caplog.at_level("WARNING"):
        check._save_deploy_checkpoint(deployed, torch.randn(1, 1, 2, 2))
    assert (tmp_path / "deploy.pt").is_file()
    assert "UserBlockNet" in caplog.text and "inspect" in caplog.text
    with pytest.raises(CheckpointError, match="UserBlockNet"):
        build_model(check.run_config["model"], deploy=True)

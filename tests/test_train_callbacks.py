"""BranchGradientMonitor, DivergenceGuard, DeployCheck, TrainingThroughput, RunConfigInCheckpoints and the
schedule, on hand-made models and gradients."""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path
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
    trainer = SimpleNamespace(global_step=step, loggers=[], is_global_zero=True, world_size=1)
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
            SimpleNamespace(
                datamodule=datamodule,
                global_step=1,
                is_global_zero=True,
                strategy=SimpleNamespace(root_device=torch.device("cpu")),
            ),
            SimpleNamespace(model=model, device="cpu", to=lambda device: None, cpu=lambda: None),
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
            SimpleNamespace(datamodule=datamodule, global_step=7, is_global_zero=True),
            SimpleNamespace(model=model, device="cpu"),
        )
    assert error.value.step == 6 and not (tmp_path / "deploy.pt").exists()


def _guard_steps(guard: DivergenceGuard, losses: list[float], first_step: int = 0) -> None:
    """Feed ``losses`` to ``guard`` as the losses of optimizer steps first_step, first_step + 1, ..., as Lightning
    calls it."""
    module = SimpleNamespace(model=nn.Linear(2, 2))
    for step, loss in enumerate(losses, start=first_step):
        guard.on_before_backward(
            SimpleNamespace(global_step=step, world_size=1), module, torch.tensor(loss, requires_grad=True)
        )
        guard.on_train_batch_end(SimpleNamespace(global_step=step + 1, world_size=1), module, None, None, step)


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
    trainer = SimpleNamespace(current_epoch=4, global_step=50, world_size=1)
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
    trainer = SimpleNamespace(world_size=1)
    for _ in range(2):
        throughput.on_train_epoch_start(trainer, None)
        for _ in range(3):
            throughput.on_train_batch_end(trainer, None, None, (torch.zeros(4, 1), torch.zeros(4)), 0)
        throughput.on_train_epoch_end(trainer, None)
    assert throughput.images == 24 and throughput.seconds > 0
    assert throughput.run_results() == {"train/images_per_s": 24 / throughput.seconds}


def test_training_throughput_counts_every_ddp_process_images():
    throughput, trainer = TrainingThroughput(), SimpleNamespace(world_size=2)
    throughput.on_train_epoch_start(trainer, None)
    throughput.on_train_batch_end(trainer, None, None, (torch.zeros(4, 1), torch.zeros(4)), 0)  # this process's part
    throughput.on_train_epoch_end(trainer, None)
    assert throughput.images == 8


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


# --- the deploy check's ONNX export and INT8 quantization ----------------------------------------------------------

EXPORT_QUICK = [
    "trainer=debug",
    "logger=csv",
    "callbacks.progress_bar.refresh_rate=0",
    "+callbacks.deploy_check.bench.latency=false",
    "callbacks.deploy_check.measure_batch_size=8",
    "callbacks.deploy_check.calibration_batches=2",
    "callbacks.deploy_check.export_options.rounds=2",
    "callbacks.deploy_check.export_options.min_run_time=0.01",
    "callbacks.deploy_check.export_options.warmup=1",
]
EXPORT_FIELDS = ("onnx/max_rel_error", "onnx/latency_ms", "onnx/val/acc", "onnx/test/acc")
INT8_FIELDS = ("int8/val/acc", "int8/test/acc", "int8/drop", "int8/latency_ms")


def _export_run(compose_config, tmp_path, *overrides: str) -> tuple[dict, Path]:
    from repablate.train.main import run

    run_dir = tmp_path / "run"
    record = run(compose_config("+variant=repconv", *EXPORT_QUICK, *overrides, run_dir=run_dir), run_dir)
    assert record["status"] == "completed", record["error"]
    return record, run_dir / "checkpoints"


def test_deploy_check_exports_the_fused_model_to_onnx_and_int8(compose_config, tmp_path):
    record, checkpoints = _export_run(compose_config, tmp_path)
    for field in (*EXPORT_FIELDS, *INT8_FIELDS):
        assert isinstance(record[field], float) and math.isfinite(record[field]), field
    assert (checkpoints / "model.onnx").is_file() and (checkpoints / "model.int8.onnx").is_file()
    assert record["onnx/ok"] and record["onnx/max_rel_error"] <= 1e-4 and record["onnx/fused_blocks"] > 0
    assert record["onnx/test/acc"] == pytest.approx(record["deploy_form/test/acc"], abs=0.005)
    assert record["int8/drop"] == record["deploy_form/test/acc"] - record["int8/test/acc"]
    assert record["int8/drop_metric"] == "acc" and record["int8/calibration_batches"] == 2
    assert record["onnx/latency_ms"] > 0 and record["int8/latency_ms"] > 0


def test_deploy_check_without_export_writes_no_graph_and_no_fields(compose_config, tmp_path):
    record, checkpoints = _export_run(compose_config, tmp_path, "callbacks.deploy_check.export=false")
    assert not [key for key in record if key.startswith(("onnx/", "int8/"))]
    assert not list(checkpoints.glob("*.onnx")) and (checkpoints / "deploy.pt").is_file()


def test_deploy_check_without_int8_exports_fp32_only(compose_config, tmp_path):
    record, checkpoints = _export_run(compose_config, tmp_path, "callbacks.deploy_check.int8=false")
    assert all(math.isfinite(record[field]) for field in EXPORT_FIELDS)
    assert not [key for key in record if key.startswith("int8/")]
    assert (checkpoints / "model.onnx").is_file() and not (checkpoints / "model.int8.onnx").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"onnx/ok": False, "onnx/audit_problems": "block 'b' exports 3 Conv nodes"}, "3 Conv nodes"),
        ({"onnx/ok": False, "onnx/max_rel_error": 0.5}, "max_rel_error 5.000e-01"),
        ({"onnx/test/acc": 0.5}, "test acc of the exported ONNX graph is 0.500000"),
    ],
)
def test_deploy_check_fails_when_the_onnx_graph_is_not_the_fused_model(tmp_path, monkeypatch, changes, message):
    import repablate.export

    passing = {
        "onnx/ok": True,
        "onnx/audit_problems": "",
        "onnx/max_rel_error": 0.0,
        "onnx/file": "model.onnx",
        "onnx/val/acc": 1.0,
        "onnx/test/acc": 1.0,
    }
    monkeypatch.setattr(repablate.export, "export_and_check", lambda *args, **kwargs: {**passing, **changes})
    check = DeployCheck(tmp_path / "deploy.pt", int8=False)
    check.results = {"deploy_form/val/acc": 1.0, "deploy_form/test/acc": 1.0}
    module = SimpleNamespace(example_input=lambda batch_size: torch.zeros(batch_size, 1))
    with pytest.raises(DeployMismatchError, match=re.escape(message)):
        check._export(nn.Identity(), module, SimpleNamespace())


def test_deploy_check_turns_int8_off_with_export_and_refuses_no_calibration(tmp_path):
    assert DeployCheck(tmp_path / "deploy.pt", export=False, int8=True).int8 is False
    with pytest.raises(ValueError, match="calibration_batches=0"):
        DeployCheck(tmp_path / "deploy.pt", calibration_batches=0)


@pytest.mark.slow  # YOLOv7-tiny's export, INT8 calibration and four ONNX evaluations: about 40 s on 2 loaded cores
def test_deploy_check_exports_and_quantizes_a_detector(compose_config, tmp_path, monkeypatch):
    monkeypatch.setenv("REPABLATE_CACHE", str(tmp_path / "cache"))
    detect = ["task=detect", "model=yolov7_tiny", "data=shapes_detect", "data.num_train=8", "data.num_val=4"]
    record, checkpoints = _export_run(compose_config, tmp_path, *detect, "data.batch_size=4")
    assert record["task"] == "detect" and record["onnx/ok"] and record["onnx/max_rel_error"] <= 1e-4
    assert record["onnx/test/map50"] == pytest.approx(record["deploy_form/test/map50"], abs=0.005)
    assert record["int8/drop_metric"] == "map50" and math.isfinite(record["int8/test/map"])
    assert record["int8/drop"] == record["deploy_form/test/map50"] - record["int8/test/map50"]
    assert (checkpoints / "model.onnx").is_file() and (checkpoints / "model.int8.onnx").is_file()


def test_the_exporters_info_logs_are_kept_off_the_console_and_levels_restored(caplog):
    from repablate.train.callbacks import EXPORTER_LOGGERS, _quiet

    levels = [logging.getLogger(name).level for name in EXPORTER_LOGGERS]
    with caplog.at_level(logging.INFO), _quiet(EXPORTER_LOGGERS):
        logging.getLogger("onnxscript.optimizer").info("Skipping constant folding for node 'x'")
        logging.getLogger("onnx_ir.passes").warning("a warning still shows")
    assert [record.getMessage() for record in caplog.records] == ["a warning still shows"]
    assert [logging.getLogger(name).level for name in EXPORTER_LOGGERS] == levels

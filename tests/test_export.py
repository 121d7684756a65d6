"""repablate.export: the deployed model as ONNX -- audited (no BatchNormalization, one Conv per fused block), equal to
PyTorch in ONNX Runtime at any batch size, quantized to INT8 within a stated accuracy bound -- and its command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from repablate import export
from repablate import inspect as inspect_cli
from repablate.models import YOLOv7Tiny, small
from repablate.nn import RepConv, reparameterizable_modules, reparameterize

ROOT = Path(__file__).resolve().parent.parent


def with_bn_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, as after training, so that fusion has work to do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1, generator=generator)
                module.running_var.uniform_(0.5, 2, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.5, 0.5, generator=generator)
    return model.eval()


def fused_blocks(model: nn.Module) -> int:
    """Deployed blocks owning exactly one convolution, counted independently of repablate.export."""
    return sum(
        bool(module.deploy) and sum(isinstance(m, nn.Conv2d) for m in module.modules()) == 1
        for _, module in reparameterizable_modules(model)
    )


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.fixture(scope="module")
def small_deployed():
    torch.manual_seed(0)
    return reparameterize(with_bn_statistics(small()))


@pytest.fixture(scope="module")
def small_graph(small_deployed):
    return export.export_onnx(small_deployed, torch.randn(4, 1, 8, 8))


@pytest.fixture(scope="module")
def yolo_deployed():
    torch.manual_seed(0)
    return reparameterize(with_bn_statistics(YOLOv7Tiny(nc=3, conv3x3="repconv")))


@pytest.fixture(scope="module")
def yolo_graph(yolo_deployed):
    return export.export_onnx(yolo_deployed, torch.randn(2, 3, 64, 64))


# --- export and audit ----------------------------------------------------------------------------------------------


def test_small_deployed_graph_has_no_batch_norm_and_one_conv_per_fused_block(small_deployed, small_graph):
    counts = op_counts(small_graph)
    assert "BatchNormalization" not in counts and "Add" not in counts
    assert fused_blocks(small_deployed) == 5 and counts["Conv"] == 5
    assert small_graph.opset_import[0].version >= 17
    audit = export.audit_graph(small_graph, small_deployed, torch.randn(1, 1, 8, 8))
    assert audit.ok, audit.problems
    assert audit.scoped and audit.fused_blocks == 5
    assert all(block.ops["Conv"] == 1 for block in audit.blocks)  # attributed per block from the module scopes
    record = audit.as_dict()
    assert record["onnx/conv_nodes"] == 5 and record["onnx/batch_norm_nodes"] == 0 and record["onnx/audit_ok"]
    assert json.loads(record["onnx/op_counts"]) == counts


def test_yolov7_tiny_deployed_graph_passes_the_audit(yolo_deployed, yolo_graph):
    counts = op_counts(yolo_graph)
    assert "BatchNormalization" not in counts
    # 55 single-conv blocks (every Conv and RepConv) plus the detection head's three fused per-level convs
    assert fused_blocks(yolo_deployed) == 55 and counts["Conv"] == 55 + 3
    audit = export.audit_graph(yolo_graph, yolo_deployed, torch.randn(1, 3, 64, 64))
    assert audit.ok, audit.problems
    assert audit.fused_blocks == 55
    head = next(block for block in audit.blocks if block.name == "detect")
    assert not head.fused and head.ops["Conv"] == 3


def test_dynamic_batch_axis_on_inputs_and_outputs(small_graph, yolo_graph):
    for graph in (small_graph, yolo_graph):
        for value in (*graph.graph.input, *graph.graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    assert len(yolo_graph.graph.output) == 4  # decoded boxes, then the three raw maps


@pytest.mark.parametrize("batch", [1, 5])
def test_small_graph_equals_pytorch_at_any_batch(small_deployed, small_graph, batch):
    torch.manual_seed(batch)
    error = export.onnx_max_rel_error(small_deployed, small_graph, [torch.randn(batch, 1, 8, 8)])
    assert error <= export.TOLERANCE


@pytest.mark.parametrize("batch", [1, 5])
def test_yolov7_tiny_graph_equals_pytorch_on_every_output(yolo_deployed, yolo_graph, batch):
    torch.manual_seed(batch)
    x = torch.randn(batch, 3, 64, 64)
    module = export.OnnxModule(yolo_graph, yolo_deployed(x))
    decoded, raw = module(x)  # rebuilt in the eager model's structure: (decoded, [P3, P4, P5])
    expected_decoded, expected_raw = yolo_deployed(x)
    assert isinstance(raw, list) and len(raw) == 3
    for ours, theirs in zip([decoded, *raw], [expected_decoded, *expected_raw], strict=True):
        assert ours.shape == theirs.shape and ours.shape[0] == batch
        assert (ours - theirs).abs().max() <= export.TOLERANCE * theirs.abs().max()
    assert export.onnx_max_rel_error(yolo_deployed, module, [x]) <= export.TOLERANCE


def test_quantizing_yolov7_tiny_leaves_nothing_in_the_working_directory(
    yolo_deployed, yolo_graph, tmp_path, monkeypatch
):
    """ONNX Runtime's symbolic shape inference, which fails on this graph, would leave sym_shape_infer_temp.onnx and
    its external data in the working directory: quantize_int8 does not run it."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    torch.manual_seed(0)
    int8 = export.quantize_int8(yolo_graph, [torch.randn(2, 3, 64, 64)], num_batches=1)
    assert list((tmp_path / "cwd").iterdir()) == []
    x = torch.randn(1, 3, 64, 64)
    assert 0 < export.onnx_max_rel_error(yolo_deployed, int8, [x]) < 0.2  # four outputs, finite, close


def test_unfused_model_fails_the_audit_naming_its_blocks():
    torch.manual_seed(0)
    model = with_bn_statistics(small())
    x = torch.randn(2, 1, 8, 8)
    audit = export.audit_graph(export.export_onnx(model, x), model, x)
    assert not audit.ok
    text = "; ".join(audit.problems)
    assert "5 block(s) left unfused" in text and "stages.0.0: 2 Conv node(s) in 1 call(s)" in text
    # the exporter folds a BN into its conv, but the identity branches keep theirs
    assert "BatchNormalization node(s) in a graph meant to be deployed" in text


def test_a_batch_norm_outside_any_block_fails_the_audit():
    torch.manual_seed(0)
    model = nn.Sequential(reparameterize(with_bn_statistics(RepConv(3, 8))), nn.ReLU(), nn.BatchNorm2d(8))
    x = torch.randn(2, 3, 8, 8)
    audit = export.audit_graph(export.export_onnx(with_bn_statistics(model), x), model, x)
    assert audit.problems == ["1 BatchNormalization node(s) in a graph meant to be deployed"]


def test_a_fused_block_that_runs_two_convolutions_fails_the_audit():
    class Doubled(nn.Module):  # deployed by its flag, but runs its conv twice: not what fusion produces
        def __init__(self):
            super().__init__()
            self.block = reparameterize(RepConv(4, 4))
            self.deploy = True

        def reparameterize(self):
            pass

        def forward(self, x):
            return self.block.rbr_reparam(self.block.rbr_reparam(x))

    model = nn.Sequential(Doubled()).eval()
    x = torch.randn(2, 4, 8, 8)
    audit = export.audit_graph(export.export_onnx(model, x), model, x)
    assert "0: 2 Conv node(s) for 1 call(s), expected one" in "; ".join(audit.problems)


def test_export_leaves_the_model_untouched_and_refuses_old_opsets(small_deployed):
    small_deployed.train()
    before = {key: value.clone() for key, value in small_deployed.state_dict().items()}
    try:
        with pytest.raises(ValueError, match="opset 17 or later"):
            export.export_onnx(small_deployed, torch.randn(2, 1, 8, 8), opset=13)
        export.export_onnx(small_deployed, torch.randn(1, 1, 8, 8))
        assert small_deployed.training
        assert all(torch.equal(before[key], value) for key, value in small_deployed.state_dict().items())
    finally:
        small_deployed.eval()


def test_a_model_the_exporter_cannot_take_raises_export_error():
    class Branchy(nn.Module):  # data-dependent control flow: torch.export cannot trace it
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x - 1

    with pytest.raises(export.ExportError, match="torch.onnx.export failed"):
        export.export_onnx(Branchy(), torch.randn(2, 3))


# --- export_and_check, the deploy check's call ---------------------------------------------------------------------


def test_export_and_check_writes_both_graphs_and_returns_flat_results(tmp_path, small_deployed):
    torch.manual_seed(0)
    calls = []

    def evaluate(module):
        calls.append(module)
        return {"acc": 0.5}

    results = export.export_and_check(
        small_deployed,
        torch.randn(8, 1, 8, 8),
        tmp_path / "out",
        calibration_batches=[(torch.randn(8, 1, 8, 8), torch.zeros(8)) for _ in range(3)],
        evaluate=evaluate,
        rounds=1,
        min_run_time=0.01,
        warmup=1,
    )
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "model.int8.onnx").is_file()
    assert not list((tmp_path / "out").glob("*.tmp"))
    assert results["onnx/ok"] and results["onnx/audit_ok"] and results["onnx/equivalent"]
    assert results["onnx/max_rel_error"] <= 1e-4 and results["onnx/batch_sizes_checked"] == "8,1"
    assert results["onnx/fused_blocks"] == 5 and results["onnx/conv_nodes"] == 5
    assert results["onnx/latency_ms"] > 0 and results["onnx/torch_latency_ms"] > 0
    assert results["int8/latency_ms"] > 0 and math.isfinite(results["int8/latency_vs_fp32"])
    assert results["int8/calibration_batches"] == 3 and results["int8/calibration_samples"] == 24
    assert results["onnx/acc"] == results["int8/acc"] == 0.5 and results["int8/acc_drop"] == 0
    assert [type(module) for module in calls] == [export.OnnxModule, export.OnnxModule]
    assert results["int8/weights_kernels"] == 5 and results["int8/weights_max_outlier_ratio"] >= 1
    assert all(isinstance(value, (str, int, float, bool)) for value in results.values())  # results.json fields


# --- INT8 ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_small():
    """small trained for four epochs on scikit-learn's digits (1,400 train, 397 test images): 0.96 test accuracy."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    images = (images - images[:1400].mean()) / images[:1400].std()
    torch.manual_seed(0)
    model = small()
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(4):
        order = torch.randperm(1400)
        for start in range(0, 1400, 64):
            index = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    train = [images[start : start + 32] for start in range(0, 1400, 32)]
    test = [(images[start : start + 64], labels[start : start + 64]) for start in range(1400, 1797, 64)]
    return reparameterize(model), train, test


def test_int8_accuracy_stays_within_two_points_of_fp32(trained_small):
    """Per-channel int8 weights and uint8 activations, calibrated on 8 training batches: at most 2 points (8 of
    397 test images) below the FP32 graph; measured: the same accuracy, +-1 image."""
    model, train, test = trained_small
    fp32 = export.export_onnx(model, train[0])
    int8 = export.quantize_int8(fp32, train, num_batches=8)
    with torch.no_grad():
        eager = sum(int((model(x).argmax(1) == y).sum()) for x, y in test) / sum(len(y) for _, y in test)
    fp32_accuracy, int8_accuracy = export.onnx_accuracy(fp32, test), export.onnx_accuracy(int8, test)
    assert fp32_accuracy == pytest.approx(eager, abs=1 / 397) and fp32_accuracy > 0.9
    assert abs(fp32_accuracy - int8_accuracy) <= 0.02
    # ... and the graph is really quantized: QDQ nodes, int8 weights, outputs that differ from FP32
    counts = op_counts(int8)
    assert counts["QuantizeLinear"] >= 5 and counts["DequantizeLinear"] >= counts["Conv"] == 5
    assert any(init.data_type == onnx.TensorProto.INT8 and len(init.dims) == 4 for init in int8.graph.initializer)
    assert any(init.data_type == onnx.TensorProto.UINT8 for init in int8.graph.initializer)  # activation zero points
    error = export.onnx_max_rel_error(model, int8, [test[0][0]])
    assert 1e-4 < error < 0.2


def test_calibration_reader_takes_inputs_of_tensor_or_pair_batches():
    reader = export.BatchReader([(torch.ones(2, 1), torch.zeros(2)), torch.zeros(3, 1), torch.ones(1, 1)], "x", 2)
    first, second = reader.get_next(), reader.get_next()
    assert first["x"].shape == (2, 1) and second["x"].shape == (3, 1) and reader.get_next() is None
    reader.rewind()
    assert reader.get_next()["x"].dtype == np.float32
    with pytest.raises(ValueError, match="at least one input batch"):
        export.BatchReader([], "x")


def test_kernel_statistics_match_a_hand_computation():
    # Channel 0: 1000 weights 0.001, 0.002, ..., 1.000, then one outlier 10; channel 1: -2 .. 2 in 1001 steps.
    ramp = torch.arange(1, 1001, dtype=torch.float64) / 1000
    weight = torch.stack([torch.cat([ramp, torch.tensor([10.0])]), torch.linspace(-2, 2, 1001, dtype=torch.float64)])
    weight = weight.view(2, 1, 1001, 1)
    stats = export.kernel_statistics(weight)
    # |w| pooled: 2002 values; the 99.9th percentile with linear interpolation lies at position 0.999 * 2001 = 1998.999
    # of the sorted magnitudes, whose top four are 1.996, 2, 2, 10 (positions 1998..2001).
    magnitudes = sorted(weight.abs().flatten().tolist())
    assert magnitudes[-4:] == pytest.approx([1.996, 2.0, 2.0, 10.0])
    p999 = magnitudes[1998] + 0.999 * (magnitudes[1999] - magnitudes[1998])
    assert stats["p999_abs"] == pytest.approx(p999) and stats["p999_abs"] == pytest.approx(1.999996)
    assert stats["max_abs"] == 10 and stats["outlier_ratio"] == pytest.approx(10 / p999)
    # channel ranges: 10 - 0.001 and 2 - (-2); the median of two is their mean
    assert stats["channel_range_max"] == pytest.approx(9.999) and stats["channel_range_min"] == pytest.approx(4.0)
    assert stats["channel_range_median"] == pytest.approx((9.999 + 4) / 2)
    assert stats["channel_range_ratio"] == pytest.approx(9.999 / 6.9995)
    # per-channel int8: channel 0's step is 10 / 127, so |w| < 5 / 127 = 0.03937 -> the 39 weights 0.001 .. 0.039;
    # channel 1's step is 2 / 127: |w| < 1 / 127 -> the 3 weights -0.004, 0, 0.004 (spacing 0.004)
    assert stats["zero_fraction"] == pytest.approx((39 + 3) / 2002)


def test_kernel_statistics_of_uniform_and_empty_kernels():
    flat = export.kernel_statistics(torch.full((4, 2, 3, 3), 0.5))
    assert flat["outlier_ratio"] == 1 and flat["channel_range_max"] == 0 and flat["channel_range_ratio"] == math.inf
    assert export.kernel_statistics(torch.zeros(2, 2, 1, 1))["outlier_ratio"] == 1
    with pytest.raises(ValueError):
        export.kernel_statistics(torch.zeros(3))


def test_weight_statistics_cover_every_fused_kernel(small_deployed, yolo_deployed):
    rows = export.weight_statistics(small_deployed)
    assert [row["conv"] for row in rows] == [f"{name}.rbr_reparam" for name, _ in reparameterizable_modules(small())]
    assert rows[0]["shape"] == [16, 1, 3, 3] and rows[0]["block"] == "RepConv"
    yolo = export.weight_statistics(yolo_deployed)
    assert len(yolo) == 58 and sum(row["block"] == "IDetect" for row in yolo) == 3
    summary = export.weight_summary(yolo)
    assert summary["int8/weights_kernels"] == 58
    assert summary["int8/weights_max_outlier_ratio"] == max(row["outlier_ratio"] for row in yolo)
    assert export.weight_statistics(small()) == []  # training form: nothing fused yet


# --- the command line ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config():
    return inspect_cli.compose_config(["model=small", "+variant=repconv"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, config):
    """A run directory with a fused deploy.pt, a deploy.pt holding the training form, and a Lightning .ckpt."""
    torch.manual_seed(0)
    trained = with_bn_statistics(inspect_cli.build_model(config))
    root = tmp_path_factory.mktemp("export-cli")
    (root / "run" / "checkpoints").mkdir(parents=True)
    fused = {"state_dict": reparameterize(trained).state_dict(), "config": config, "deploy": True}
    torch.save(fused, root / "run" / "checkpoints" / "deploy.pt")
    torch.save({"state_dict": trained.state_dict(), "config": config, "deploy": True}, root / "unfused.pt")
    state = {f"model.{key}": value for key, value in trained.state_dict().items()}
    torch.save({"state_dict": state, "repablate_config": config, "epoch": 3}, root / "last.ckpt")
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "repablate.export", *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_bad_input_exits_2(tmp_path, checkpoints, capsys):
    assert export.main([str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert export.main([str(tmp_path)]) == 2  # a directory without checkpoints/deploy.pt
    assert "without checkpoints/deploy.pt" in capsys.readouterr().err
    (tmp_path / "text.pt").write_text("not a checkpoint")
    assert export.main([str(tmp_path / "text.pt")]) == 2
    assert export.main([str(checkpoints / "run"), "--input-shape", "0,1,8,8"]) == 2
    assert export.main([str(checkpoints / "run"), "--calibration-batches", "0"]) == 2


def test_cli_lightning_checkpoint_is_fused_then_exported(tmp_path, checkpoints, capsys):
    assert export.main([str(checkpoints / "last.ckpt"), "--out", str(tmp_path), "--no-latency"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["source"].endswith(", fused") and summary["input_shape"] == [1, 1, 8, 8]
    assert summary["results"]["onnx/fused_blocks"] == 5 and summary["results"]["onnx/ok"]
    assert (tmp_path / "model.onnx").is_file()


def test_cli_unfused_deploy_checkpoint_exits_1(tmp_path, checkpoints, capsys):
    assert export.main([str(checkpoints / "unfused.pt"), "--out", str(tmp_path), "--no-latency"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["results"]["onnx/audit_ok"] is False
    assert "the graph audit failed" in captured.err and "left unfused" in captured.err


@pytest.mark.slow
def test_cli_exit_codes_as_a_user_runs_it(tmp_path, checkpoints):
    done = run_cli(str(checkpoints / "run"), "--int8", "--calibration-batches", "2", "--threads", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    results = summary["results"]
    assert results["onnx/ok"] and results["onnx/max_rel_error"] <= 1e-4 and results["onnx/latency_ms"] > 0
    assert results["int8/latency_ms"] > 0 and results["int8/calibration_batches"] == 2
    assert len(summary["weights"]) == 5 and "synthetic" in summary["calibration"]
    assert (checkpoints / "run" / "checkpoints" / "model.onnx").is_file()  # beside deploy.pt by default
    assert (checkpoints / "run" / "checkpoints" / "model.int8.onnx").is_file()

    done = run_cli(str(checkpoints / "unfused.pt"), "--out", str(tmp_path), "--no-latency")
    assert done.returncode == 1 and "left unfused" in done.stderr

    done = run_cli(str(tmp_path / "missing"))
    assert done.returncode == 2 and "does not exist" in done.stderr and not done.stdout

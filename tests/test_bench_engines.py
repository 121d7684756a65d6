"""repablate.bench.engines: PyTorch eager beside ONNX Runtime (and OpenVINO, CUDA, TensorRT where present) on one
deployed model, interleaved; engines this machine lacks are skipped with their reason. No timing asserts."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import onnxruntime
import pytest
import torch

from repablate.bench import engines
from repablate.bench.latency import Latency
from repablate.export import export_onnx
from repablate.nn import RepConv, reparameterize

QUICK = {"warmup": 1, "min_run_time": 0.01, "rounds": 2}


@pytest.fixture(scope="module")
def deployed():
    torch.manual_seed(0)
    return reparameterize(torch.nn.Sequential(RepConv(3, 8, s=2), RepConv(8, 8)))


@pytest.fixture(scope="module")
def graph(deployed):
    return export_onnx(deployed, torch.randn(2, 3, 16, 16))


def test_onnxruntime_is_timed_beside_eager_and_checked_against_it(deployed, graph):
    x = torch.randn(4, 3, 16, 16)
    report = engines.measure_engines(deployed, graph, x, engines=["onnxruntime"], threads=1, **QUICK)
    assert set(report.latencies) == {"torch", "onnxruntime"} and report.batch_size == 4 and report.threads == 1
    assert report.errors["onnxruntime"] <= 1e-5
    assert all(latency.median_ms > 0 and len(latency.round_medians_ms) == 2 for latency in report.latencies.values())
    record = report.as_dict()
    assert record["engine/onnxruntime/latency_vs_torch"] == pytest.approx(report.latency_vs("onnxruntime"))
    assert record["engine/torch/throughput"] == pytest.approx(4 / (record["engine/torch/latency_ms"] / 1e3))
    assert "engine/torch/latency_vs_torch" not in record and "CPUExecutionProvider" in record["engine/ort_providers"]


def test_an_int8_graph_is_timed_as_its_own_engine(deployed, graph):
    from repablate.export import quantize_int8

    x = torch.randn(2, 3, 16, 16)
    int8 = quantize_int8(graph, [torch.randn(2, 3, 16, 16)], num_batches=1)
    report = engines.measure_engines(deployed, graph, x, engines=["onnxruntime"], int8_model=int8, threads=1, **QUICK)
    assert set(report.latencies) == {"torch", "onnxruntime", "onnxruntime-int8"}
    assert 0 < report.errors["onnxruntime-int8"] < 0.5  # quantization error, measured, not equivalence


def test_sessions_get_the_thread_settings(graph):
    session = engines.ort_session(graph, threads=1)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    precise = engines.ort_session(graph, threads=1, config={"session.x64quantprecision": "1"})
    assert precise.get_session_options().get_session_config_entry("session.x64quantprecision") == "1"


def test_missing_providers_are_skipped_with_their_reason(deployed, graph, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    report = engines.measure_engines(
        deployed, graph, torch.randn(1, 3, 16, 16), engines=["onnxruntime-cuda", "onnxruntime-tensorrt"], **QUICK
    )
    assert set(report.latencies) == {"torch"}
    assert "CUDAExecutionProvider is not in this onnxruntime build" in report.skipped["onnxruntime-cuda"]
    assert "TensorrtExecutionProvider" in report.skipped["onnxruntime-tensorrt"]
    assert report.as_dict()["engine/onnxruntime-cuda/skipped"] == report.skipped["onnxruntime-cuda"]
    table = engines.markdown_engines([("case", report)])
    assert "Skipped: onnxruntime-cuda (CUDAExecutionProvider" in table and "| case | torch (eager) |" in table


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="CUDA EP really here")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_a_provider_that_falls_back_to_the_cpu_is_unavailable(graph, monkeypatch):
    """Listed but unusable (no GPU, missing libraries): ONNX Runtime falls back to the CPU; that is a skip."""
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with pytest.raises(engines.EngineUnavailable, match="fell back|CUDAExecutionProvider"):
        engines.ort_session(graph, threads=1, engine="onnxruntime-cuda")


def test_openvino_missing_is_skipped(deployed, graph, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    report = engines.measure_engines(deployed, graph, torch.randn(1, 3, 16, 16), engines=["openvino"], **QUICK)
    assert report.skipped == {"openvino": "openvino is not installed (pip install 'repablate[openvino]')"}


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="the openvino extra is not installed")
def test_openvino_runs_the_graph_when_installed(deployed, graph):
    report = engines.measure_engines(deployed, graph, torch.randn(2, 3, 16, 16), engines=["openvino"], **QUICK)
    assert report.errors["openvino"] <= 1e-4 and report.latencies["openvino"].median_ms > 0


def test_unknown_engines_and_bad_settings_are_refused(deployed, graph):
    with pytest.raises(ValueError, match="unknown"):
        engines.measure_engines(deployed, graph, torch.randn(1, 3, 16, 16), engines=["tvm"], **QUICK)
    with pytest.raises(ValueError, match="rounds"):
        engines.measure_engines(deployed, graph, torch.randn(1, 3, 16, 16), rounds=0)
    with pytest.raises(ValueError, match="not an ONNX Runtime engine"):
        engines.ort_session(graph, engine="openvino")


def test_max_rel_error_is_normwise_and_never_hides_nan_or_a_shape_mismatch():
    a = [torch.tensor([1.0, -4.0]), np.array([[2.0]])]
    b = [torch.tensor([1.5, -4.0]), np.array([[1.0]])]
    assert engines.max_rel_error(a, b) == pytest.approx(1.0 / 4.0)  # max |a - b| = 1 over max |a| = 4
    assert engines.max_rel_error(a, a) == 0
    assert engines.max_rel_error([torch.tensor([1.0, float("nan")])], [torch.tensor([1.0, float("nan")])]) == math.inf
    assert engines.max_rel_error([torch.zeros(2)], [torch.zeros(3)]) == math.inf
    assert engines.max_rel_error(a, a[:1]) == math.inf
    assert engines.max_rel_error([torch.zeros(2)], [torch.ones(2)]) == math.inf


def test_output_leaves_follow_the_exporters_order():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert engines.output_leaves((a, [b, {"x": c}])) == [a, b, c]
    with pytest.raises(TypeError):
        engines.output_leaves((a, "text"))


def test_paired_ratio_is_the_median_of_per_round_ratios():
    fast = Latency(1.0, 0.1, 3, 1, 1, round_medians_ms=(1.0, 2.0, 1.0))
    slow = Latency(2.0, 0.1, 3, 1, 1, round_medians_ms=(2.0, 2.0, 4.0))
    assert engines.paired_ratio(fast, slow) == 0.5  # ratios 0.5, 1, 0.25


@pytest.mark.slow
def test_bench_cli_prints_the_engine_table(capsys):
    from repablate.bench.__main__ import main

    argv = ["--quick", "--threads", "1", "--widths", "8", "--resolutions", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "## Engines: each deployed network in PyTorch eager vs inference engines" in out
    assert "| repconv_stack_r32 | torch (eager) | CPU |" in out and "| repconv_stack_r32 | onnxruntime | CPU |" in out
    assert main([*argv, "--no-engines"]) == 0
    assert "## Engines" not in capsys.readouterr().out

"""repablate.bench counting, latency and the measure_forms record: closed forms and hand arithmetic, no timings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from repablate.bench import (
    MemoryAccessCounter,
    count_flops,
    count_params,
    measure_forms,
    measure_latencies,
    measure_latency,
    measure_model,
    memory_access,
)
from repablate.nn import Conv, RepConv, reparameterize

FLOAT32 = 4  # bytes


@st.composite
def conv_shapes(draw):
    groups = draw(st.sampled_from([1, 2]))
    return {
        "c1": groups * draw(st.integers(1, 4)),
        "c2": groups * draw(st.integers(1, 4)),
        "k": draw(st.sampled_from([1, 3, 5])),
        "s": draw(st.sampled_from([1, 2])),
        "g": groups,
        "n": draw(st.integers(1, 2)),
        "h": draw(st.integers(3, 9)),
    }


def conv_flops(n: int, c1: int, c2: int, k: int, out_hw: int, g: int) -> int:
    """Closed form: one multiply-add (2 FLOPs) per output element per input channel of its group per tap."""
    return 2 * n * c2 * out_hw * out_hw * (c1 // g) * k * k


@settings(max_examples=25, deadline=None)
@given(conv_shapes())
def test_flops_of_repconv_forms_match_the_closed_form(shape):
    # Exact integers: the counter must agree to the FLOP, in both forms, for any kernel, stride and grouping.
    n, c1, c2, k, s, g, h = (shape[key] for key in ("n", "c1", "c2", "k", "s", "g", "h"))
    block = RepConv(c1, c2, k, s, g=g).eval()
    x = torch.randn(n, c1, h, h)
    out_hw = (h - 1) // s + 1  # 'same' padding
    dense = conv_flops(n, c1, c2, k, out_hw, g)
    one_by_one = conv_flops(n, c1, c2, 1, out_hw, g) if k > 1 else 0  # with k == 1 there is no separate 1x1 branch
    assert count_flops(block, x) == dense + one_by_one
    assert count_flops(reparameterize(block), x) == dense


def test_flops_ratio_of_a_c_to_c_block_is_ten_ninths():
    block = RepConv(16, 16)
    x = torch.randn(1, 16, 12, 12)
    assert count_flops(block, x) / count_flops(reparameterize(block), x) == pytest.approx(10 / 9, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(conv_shapes(), st.booleans(), st.sampled_from([torch.float32, torch.float64]))
def test_memory_access_of_one_conv_is_input_weight_bias_output(shape, bias, dtype):
    # Exact: read x, W (and b), write y; nothing else moves, whatever the shape, grouping or dtype.
    n, c1, c2, k, s, g, h = (shape[key] for key in ("n", "c1", "c2", "k", "s", "g", "h"))
    conv = nn.Conv2d(c1, c2, k, stride=s, padding=k // 2, groups=g, bias=bias).to(dtype)
    out_hw = (h - 1) // s + 1
    size = torch.finfo(dtype).bits // 8
    expected = size * (n * c1 * h * h + c2 * (c1 // g) * k * k + (c2 if bias else 0) + n * c2 * out_hw * out_hw)
    assert memory_access(conv, torch.randn(n, c1, h, h, dtype=dtype)) == expected


def test_memory_access_by_hand_for_one_strided_conv():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True)
    # x 2*3*10*10 + W 8*3*3*3 + b 8 + y 2*8*5*5 = 600 + 216 + 8 + 400 = 1224 floats
    assert memory_access(conv, torch.randn(2, 3, 10, 10)) == 1224 * FLOAT32


def test_memory_access_of_one_eval_batch_norm_reads_four_statistics():
    bn = nn.BatchNorm2d(6).eval()
    x = torch.randn(3, 6, 7, 7)
    # read x, gamma, beta, running mean, running var; write y (the empty save_mean/save_invstd add 0 bytes)
    assert memory_access(bn, x) == FLOAT32 * (3 * 6 * 49 + 4 * 6 + 3 * 6 * 49)


def test_memory_access_skips_views_and_counts_per_op():
    x = torch.randn(4, 5, 6)
    assert memory_access(nn.Flatten(), x) == 0  # a view moves no data
    counter = MemoryAccessCounter()
    with counter:
        torch.add(x, x)
    assert counter.by_op == {"aten.add": 3 * x.numel() * FLOAT32}
    assert counter.total == 3 * x.numel() * FLOAT32


def test_count_params_counts_parameters_not_buffers():
    assert count_params(nn.BatchNorm2d(5)) == 10
    assert count_params(reparameterize(RepConv(4, 4))) == 4 * 4 * 9 + 4


def test_measure_latency_runs_on_cpu_and_names_its_settings():
    model = reparameterize(RepConv(4, 4))
    result = measure_latency(model, torch.randn(1, 4, 8, 8), threads=1, warmup=2, min_run_time=0.01, rounds=2)
    assert result.threads == 1 and result.blocks >= 2 and result.calls_per_block >= 1
    assert result.median_ms > 0 and result.iqr_ms >= 0
    assert result.peak_mem_bytes is None  # the CPU reports no peak memory
    assert len(result.round_medians_ms) == 2


def test_measure_latencies_times_each_callable():
    calls = {"a": 0, "b": 0}

    def count(name):
        def run(x):
            calls[name] += 1
            return x

        return run

    results = measure_latencies({"a": count("a"), "b": count("b")}, torch.zeros(1), warmup=3, min_run_time=0.01)
    assert set(results) == {"a", "b"} and calls["a"] > 3 and calls["b"] > 3


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"threads": 0}, "threads=0"),
        ({"rounds": 0}, "rounds=0"),
        ({"warmup": -1}, "warmup=-1"),
        ({"min_run_time": 0}, "min_run_time=0"),
    ],
)
def test_measure_latency_names_a_bad_setting(setting, message):
    with pytest.raises(ValueError, match=message):
        measure_latency(nn.Identity(), torch.zeros(1), **setting)


CONTRACT_KEYS = [
    f"{form}/{metric}"
    for form in ("train_form", "deploy_form")
    for metric in ("params", "flops", "mem_bytes", "latency_ms", "latency_iqr_ms", "throughput")
] + [
    "ratio/params",
    "ratio/flops",
    "ratio/mem_bytes",
    "ratio/latency_ms",
    "ratio/throughput",
    "bench/batch_size",
    "bench/threads",
    "bench/dtype",
    "bench/device",
    "bench/torch",
    "bench/machine",
]


def test_measure_forms_gives_the_flat_record_of_the_contract():
    train = nn.Sequential(RepConv(3, 8, s=2), RepConv(8, 8)).train()
    deploy = reparameterize(train)
    record = measure_forms(train, deploy, torch.randn(3, 3, 16, 16), threads=1, warmup=1, min_run_time=0.01).as_dict()
    assert set(CONTRACT_KEYS) <= set(record)
    assert record["bench/batch_size"] == 3 and record["bench/threads"] == 1
    assert record["bench/dtype"] == "float32" and record["bench/device"] == "cpu"
    assert record["ratio/flops"] == record["train_form/flops"] / record["deploy_form/flops"]
    assert record["deploy_form/params"] == (8 * 3 * 9 + 8) + (8 * 8 * 9 + 8)
    assert record["train_form/throughput"] == pytest.approx(3 / (record["train_form/latency_ms"] / 1e3))
    assert train.training and not train[0].deploy  # the caller's model is measured on a copy


def test_measure_model_without_latency_reports_counts_only_and_scales_with_dtype():
    model = reparameterize(Conv(4, 4, 3))
    x = torch.randn(1, 4, 8, 8)
    full = measure_model(model, x, latency=False)
    half = measure_model(model, x, latency=False, dtype="bfloat16", channels_last=True)
    assert "latency_ms" not in full and full["flops"] == half["flops"]
    assert half["mem_bytes"] * 2 == full["mem_bytes"] and half["bench/dtype"] == "bfloat16"


@pytest.mark.parametrize(("setting", "message"), [({"dtype": "int8"}, "dtype='int8'"), ({"device": "tpu9"}, "tpu9")])
def test_measure_model_names_a_bad_setting(setting, message):
    with pytest.raises(ValueError, match=message):
        measure_model(nn.Identity(), torch.zeros(1, 1), latency=False, **setting)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_clearly():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        measure_model(nn.Identity(), torch.zeros(1, 1), device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_synchronizes_and_reports_peak_memory():
    train = RepConv(16, 16)
    record = measure_forms(
        train, reparameterize(train), torch.randn(2, 16, 32, 32), device="cuda", warmup=2, min_run_time=0.05
    ).as_dict()
    assert record["bench/device"].startswith("cuda")
    assert record["train_form/peak_mem_bytes"] > 0 and record["deploy_form/peak_mem_bytes"] > 0

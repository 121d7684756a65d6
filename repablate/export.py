"""Export a deployed model to ONNX, prove the graph is the fused one and computes what PyTorch computes, time it in
ONNX Runtime, and quantize it to INT8 with the weight statistics that explain an INT8 collapse.

``export_and_check(deployed_model, example_input, out_dir, ...)`` is the one call the deploy check needs: it writes
``model.onnx`` (and ``model.int8.onnx``) atomically and returns flat results.json fields (``onnx/*``, ``int8/*``).
The pieces are public too: ``export_onnx``, ``audit_graph``, ``onnx_max_rel_error``, ``OnnxModule`` (an ONNX
graph behind ``nn.Module``'s interface, for any evaluation loop), ``quantize_int8``, ``onnx_accuracy``,
``kernel_statistics`` and ``weight_statistics``.

``python -m repablate.export RUN_DIR_OR_CHECKPOINT [--int8] [--out DIR]`` prints a JSON summary and exits 0 when
the graph passes its audit and matches PyTorch, 1 when it does not (or cannot be exported), 2 on bad input.

Library code here stands on repablate.nn, repablate.bench and repablate.results; only the command line (``main``
and ``load_deployed``) looks sideways, at repablate.inspect's safe checkpoint loading.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from torch import nn

from repablate.bench.engines import (
    OnnxModel,
    max_rel_error,
    measure_engines,
    onnx_bytes,
    ort_session,
    output_leaves,
    paired_ratio,
)
from repablate.nn import reparameterizable_modules
from repablate.results import write_atomically

OPSET = 18  # >= 17 (LayerNormalization); 18 is what torch.onnx's exporter targets natively
ONNX_FILE, INT8_FILE = "model.onnx", "model.int8.onnx"
TOLERANCE = 1e-4  # max |onnx - torch| / max |torch| of the FP32 graph
INPUT_NAME = "input"
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ExportError(RuntimeError):
    """The model could not be exported to ONNX; the message says why."""


# --- export ------------------------------------------------------------------------------------------------------


def _output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{index}" for index in range(count)]


def export_onnx(
    model: nn.Module, example_input: torch.Tensor, path: str | Path | None = None, *, opset: int = OPSET
) -> onnx.ModelProto:
    """``model`` (a float32 copy on the CPU, in eval mode; ``model`` itself is untouched) as an ONNX graph with a
    dynamic batch axis.

    torch.onnx's exporter (``dynamo=True``: torch.export, then onnxscript's optimizer), which gives a clean graph
    (YOLOv7-tiny: no Shape/Gather/Constant chains as the TorchScript exporter leaves) and records each node's
    module scope (``pkg.torch.onnx.name_scopes``), which ``audit_graph`` reads. One input, ``input``; outputs
    ``output`` or ``output_0``, ``output_1``, ... in the order of ``bench.engines.output_leaves``; the first
    dimension of the input and every output is ``batch``. A batch of 1 is doubled for the export (a size-1
    dimension would be specialized). The graph is checked with ``onnx.checker``; with ``path`` it is written
    atomically. Raises ExportError when the exporter fails.
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise ValueError("example_input must be a batch tensor whose first dimension is the batch size")
    if opset < 17:
        raise ValueError(f"opset={opset} is not allowed: repablate exports with opset 17 or later")
    x = example_input.detach().to("cpu", torch.float32)
    if x.shape[0] == 1:
        x = torch.cat([x, x])
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    try:
        with torch.no_grad():
            count = len(output_leaves(model(x)))
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=_output_names(count),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            optimize=True,
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 -- torch.export and the translator fail in many ways
        raise ExportError(f"torch.onnx.export failed: {type(error).__name__}: {str(error)[:2000]}") from error
    proto = program.model_proto
    onnx.checker.check_model(proto)
    if path is not None:
        write_atomically(path, proto.SerializeToString())
    return proto


# --- graph audit -------------------------------------------------------------------------------------------------


@dataclass
class BlockNodes:
    """One re-parameterizable block in the graph: its form, how often the forward called it, how many conv
    modules it owns, and the ONNX nodes exported inside its module scope."""

    name: str
    kind: str
    deployed: bool
    calls: int
    conv_modules: int
    ops: Counter[str] = field(default_factory=Counter)

    @property
    def fused(self) -> bool:
        """A fused block: deployed, and owning exactly one convolution (a detection head fused per level owns
        several and is only held to having no BatchNormalization)."""
        return self.deployed and self.conv_modules == 1


@dataclass
class GraphAudit:
    """The audit of an exported graph against the model it came from; ``ok`` when ``problems`` is empty."""

    ops: Counter[str]
    blocks: list[BlockNodes]
    conv_calls: int  # convolution modules the forward called: one Conv node each
    scoped: bool  # whether the graph records module scopes (per-block attribution)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def fused_blocks(self) -> int:
        return sum(block.fused for block in self.blocks)

    def as_dict(self) -> dict[str, Any]:
        """Flat ``onnx/*`` fields: node counts (all, Conv, BatchNormalization, by op type as JSON), fused blocks,
        the verdict and the problems joined by '; '."""
        return {
            "onnx/nodes": sum(self.ops.values()),
            "onnx/conv_nodes": self.ops.get("Conv", 0),
            "onnx/batch_norm_nodes": self.ops.get("BatchNormalization", 0),
            "onnx/fused_blocks": self.fused_blocks,
            "onnx/op_counts": json.dumps(dict(self.ops.most_common())),
            "onnx/audit_ok": self.ok,
            "onnx/audit_problems": "; ".join(self.problems),
        }


def _scopes(node: onnx.NodeProto) -> list[str] | None:
    """The module names a node was exported inside (its ``pkg.torch.onnx.name_scopes`` minus the op's own name;
    a repeated call's ``@n`` suffix dropped), or None when the node records none."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                names = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return [str(name).split("@", 1)[0] for name in names[:-1]]
    return None


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(iter([*model.parameters(), *model.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _calls(model: nn.Module, example_input: torch.Tensor, modules: Mapping[str, nn.Module]) -> Counter[str]:
    """How often one eval-mode forward calls each of ``modules`` (modes restored)."""
    calls: Counter[str] = Counter()
    handles = [
        module.register_forward_pre_hook(lambda *_, name=name: calls.update([name])) for name, module in modules.items()
    ]
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example_input.to(_device_of(model)))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return calls


def audit_graph(onnx_model: OnnxModel, model: nn.Module, example_input: torch.Tensor) -> GraphAudit:
    """Count the graph's nodes by op type and hold them to the deployed form of ``model``:

    - no BatchNormalization node, and no block of ``model`` left unfused (``deploy`` False);
    - one Conv node per call of every convolution module (the exporter's optimizer folds a lone BN into its conv,
      so this and the next rule, not the BN count alone, catch an unfused block);
    - inside every fused block (``repablate.nn.reparameterizable_modules`` that are deployed and own one
      convolution) exactly one Conv node per call and no Add: the branches were fused before export.

    Per-block counts come from the module scopes the exporter records; a graph without them is held to the
    whole-graph rules only. ``example_input`` is run once through ``model`` to count calls.
    """
    proto = onnx_model if isinstance(onnx_model, onnx.ModelProto) else onnx.load_from_string(onnx_bytes(onnx_model))
    nodes = list(proto.graph.node)
    ops = Counter(node.op_type for node in nodes)
    blocks = {name or "<root>": module for name, module in reparameterizable_modules(model)}
    convs = {name: module for name, module in model.named_modules() if isinstance(module, CONVOLUTIONS)}
    calls = _calls(model, example_input, {**blocks, **convs})
    audits = {
        name: BlockNodes(
            name,
            type(module).__name__,
            bool(module.deploy),
            calls[name],
            sum(isinstance(m, CONVOLUTIONS) for m in module.modules()),
        )
        for name, module in blocks.items()
    }
    node_scopes = [_scopes(node) for node in nodes]
    scoped = bool(nodes) and all(scopes is not None for scopes in node_scopes)
    if scoped:
        for node, scopes in zip(nodes, node_scopes, strict=True):
            for name in set(scopes) & audits.keys():
                audits[name].ops[node.op_type] += 1
    problems = []
    if ops["BatchNormalization"]:
        problems.append(f"{ops['BatchNormalization']} BatchNormalization node(s) in a graph meant to be deployed")
    unfused = [block.name for block in audits.values() if not block.deployed]
    if unfused:
        problems.append(
            f"{len(unfused)} block(s) left unfused (reparameterize was not applied): {', '.join(unfused[:5])}"
            + (" ..." if len(unfused) > 5 else "")
        )
    conv_calls = sum(calls[name] for name in convs)
    if ops["Conv"] != conv_calls:
        problems.append(f"{ops['Conv']} Conv node(s) for {conv_calls} convolution call(s) of the model")
    for block in audits.values():
        if not scoped or not block.calls or not block.conv_modules:
            continue
        if block.fused and block.ops["Conv"] != block.calls:
            problems.append(f"{block.name}: {block.ops['Conv']} Conv node(s) for {block.calls} call(s), expected one")
        if block.fused and block.ops["Add"]:
            problems.append(f"{block.name}: {block.ops['Add']} Add node(s) although fused (branches not fused)")
        if not block.deployed and block.ops["Conv"] > block.calls:
            problems.append(f"{block.name}: {block.ops['Conv']} Conv node(s) in {block.calls} call(s) (branches)")
        if block.ops["BatchNormalization"]:
            problems.append(f"{block.name}: {block.ops['BatchNormalization']} BatchNormalization node(s)")
    return GraphAudit(ops, list(audits.values()), conv_calls, scoped, problems)


# --- running the graph -------------------------------------------------------------------------------------------


def _rebuild(template: Any, leaves: Iterator[torch.Tensor]) -> Any:
    if isinstance(template, torch.Tensor):
        return next(leaves)
    if isinstance(template, Mapping):
        return {key: _rebuild(value, leaves) for key, value in template.items()}
    if isinstance(template, (list, tuple)):
        return type(template)(_rebuild(item, leaves) for item in template)
    raise TypeError(f"cannot rebuild an output holding a {type(template).__name__}")


class OnnxModule(nn.Module):
    """An ONNX graph run by ONNX Runtime behind ``nn.Module``'s interface, so that code written for a model -- a
    task's ``evaluate(model, loader)``, an accuracy loop -- runs the exported graph unchanged.

    ``forward(x)`` feeds ``x`` (moved to the CPU as float32) to the session and returns tensors on ``x``'s device,
    shaped like ``output_template`` (the eager model's output on some input, e.g. YOLOv7-tiny's
    ``(decoded, [raw, raw, raw])``); without a template, one tensor or a tuple. It has no parameters; train/eval
    mode changes nothing. ``threads``, ``engine``: see ``repablate.bench.engines.ort_session``.
    """

    def __init__(
        self,
        onnx_model: OnnxModel,
        output_template: Any = None,
        *,
        threads: int | None = None,
        engine: str = "onnxruntime",
    ):
        super().__init__()
        self.session = ort_session(onnx_model, threads=threads, engine=engine)
        self.input_name = self.session.get_inputs()[0].name
        self.output_template = output_template

    def forward(self, x: torch.Tensor) -> Any:
        outputs = self.session.run(None, {self.input_name: x.detach().to("cpu", torch.float32).numpy()})
        tensors = [torch.from_numpy(output).to(x.device) for output in outputs]
        if self.output_template is not None:
            return _rebuild(self.output_template, iter(tensors))
        return tensors[0] if len(tensors) == 1 else tuple(tensors)


def _batches(batches: Iterable[Any], limit: int | None = None) -> Iterator[torch.Tensor]:
    """Input tensors from tensors or (inputs, targets) batches, at most ``limit`` of them."""
    for batch in islice(batches, limit):
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def onnx_max_rel_error(
    model: nn.Module, onnx_model: OnnxModel | OnnxModule, inputs: Iterable[Any], *, threads: int | None = None
) -> float:
    """The largest normwise relative error (max |onnx - torch| / max |torch| over all outputs of a batch) of the
    graph against ``model`` in eval mode (modes restored; on its own device), over the batches of ``inputs``
    (tensors or (inputs, targets) pairs). ``inf`` for a NaN or infinity, or for outputs that differ in count or
    shape."""
    module = onnx_model if isinstance(onnx_model, OnnxModule) else OnnxModule(onnx_model, threads=threads)
    modes = [(m, m.training) for m in model.modules()]
    device, worst = _device_of(model), 0.0
    try:
        model.eval()
        for x in _batches(inputs):
            expected = output_leaves(model(x.to(device)))
            worst = max(worst, max_rel_error(expected, output_leaves(module(x.to("cpu", torch.float32)))))
    finally:
        for m, training in modes:
            m.training = training
    return worst


def onnx_accuracy(
    onnx_model: OnnxModel | OnnxModule, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *, threads=None
) -> float:
    """Top-1 accuracy of a classifier's graph over (inputs, targets) batches: argmax of the logits == target."""
    module = onnx_model if isinstance(onnx_model, OnnxModule) else OnnxModule(onnx_model, threads=threads)
    correct = total = 0
    for inputs, targets in batches:
        logits = module(inputs)
        correct += int((logits.argmax(dim=1).cpu() == targets.cpu()).sum())
        total += targets.numel()
    if not total:
        raise ValueError("onnx_accuracy got no batches")
    return correct / total


# --- INT8 --------------------------------------------------------------------------------------------------------

# Activations: unsigned 8 bit, asymmetric. On x86 ONNX Runtime's CPU kernels compute u8 x s8 (QDQS8ToU8Transformer
# shifts int8 activations to uint8 anyway), and asymmetric uint8 spends all 256 levels on a post-ReLU range that
# symmetric int8 would halve. Weights: int8, symmetric, per output channel. On AVX2 (and AVX-512) without VNNI the
# u8 x s8 kernel (VPMADDUBSW) adds pairs of products in saturating 16 bit, so large weights can clip: the ONNX
# Runtime docs' remedies are reduce_range=True (7-bit weights) or u8 weights, and its session option
# session.x64quantprecision=1 runs u8 x u8 kernels there; with VNNI (VPDPBUSD) nothing saturates.
ACTIVATION_TYPE = "QUInt8"


class BatchReader(CalibrationDataReader):
    """ONNX Runtime's CalibrationDataReader over input batches (tensors, or (inputs, targets) pairs): at most
    ``limit`` of them, each fed as ``{input_name: float32 array}``."""

    def __init__(self, batches: Iterable[Any], input_name: str = INPUT_NAME, limit: int | None = None):
        self.input_name = input_name
        self.arrays = [x.detach().to("cpu", torch.float32).numpy() for x in _batches(batches, limit)]
        if not self.arrays:
            raise ValueError("calibration needs at least one input batch")
        self._next = iter(self.arrays)

    def get_next(self) -> dict[str, np.ndarray] | None:
        array = next(self._next, None)
        return None if array is None else {self.input_name: array}

    def rewind(self) -> None:
        self._next = iter(self.arrays)


def _preprocess(source: Path, target: Path) -> None:
    """``quant_pre_process``: graph cleanup (ONNX Runtime's basic optimizations) and ONNX shape inference, as
    ONNX Runtime recommends before quantizing. Its symbolic shape inference is skipped: it is meant for dynamic
    shapes, the exporter's graph already carries every intermediate shape (only the batch is symbolic), and where
    it cannot finish (YOLOv7-tiny's graph without ``auto_merge``) it leaves sym_shape_infer_temp.onnx and its
    external data in the working directory before raising."""
    quant_pre_process(str(source), str(target), skip_symbolic_shape=True)


def quantize_int8(
    onnx_model: OnnxModel,
    calibration_batches: Iterable[Any],
    path: str | Path | None = None,
    *,
    num_batches: int = 8,
    activation_type: str = ACTIVATION_TYPE,
    reduce_range: bool = False,
    calibrate_method: str = "MinMax",
) -> onnx.ModelProto:
    """Static post-training quantization with ONNX Runtime: ``quant_pre_process`` (graph cleanup and shape
    inference, as ONNX Runtime recommends before quantizing), then ``quantize_static`` in QDQ format,
    per-channel symmetric int8 weights (QInt8), ``activation_type`` activations (see ``ACTIVATION_TYPE``),
    calibrated (``calibrate_method``: MinMax, Entropy, Percentile, Distribution) on the first ``num_batches`` of
    ``calibration_batches`` (tensors or (inputs, targets) pairs). Written atomically to ``path`` if given."""
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches} is not allowed: calibration needs at least one batch")
    proto = onnx_model if isinstance(onnx_model, onnx.ModelProto) else onnx.load_from_string(onnx_bytes(onnx_model))
    reader = BatchReader(calibration_batches, proto.graph.input[0].name, num_batches)
    with tempfile.TemporaryDirectory(prefix="repablate-int8-") as folder:
        fp32, prepared, int8 = (Path(folder) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        fp32.write_bytes(proto.SerializeToString())
        _preprocess(fp32, prepared)
        quantize_static(
            str(prepared),
            str(int8),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType[activation_type],
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod[calibrate_method],
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
        data = int8.read_bytes()
    if path is not None:
        write_atomically(path, data)
    return onnx.load_from_string(data)


def kernel_statistics(weight: torch.Tensor) -> dict[str, float]:
    """What a conv kernel (c_out, c_in, ...) costs INT8, in float64 (Chu et al., "Make RepVGG Greater Again: A
    Quantization-aware Approach", AAAI 2024: fused RepVGG kernels carry outliers and channel ranges that
    quantization cannot hold):

    - ``max_abs`` = max |w|; ``p999_abs`` = the 99.9th percentile of |w| (linear interpolation);
      ``outlier_ratio`` = max_abs / p999_abs: far above 1 when a few weights set a per-tensor int8 scale;
    - per output channel c the range r_c = max w_c - min w_c: ``channel_range_max``, ``channel_range_median``,
      ``channel_range_min`` and ``channel_range_ratio`` = max / median;
    - ``zero_fraction``: the share of weights that per-channel symmetric int8 (scale_c = max |w_c| / 127, as
      ``quantize_int8`` uses) rounds to 0, i.e. |w| < scale_c / 2.
    """
    w = weight.detach().to("cpu", torch.float64).numpy()
    if w.ndim < 2 or not w.size:
        raise ValueError(f"a conv kernel is (c_out, c_in, ...), not shape {w.shape}")
    magnitude = np.abs(w)
    max_abs = float(magnitude.max())
    p999 = float(np.quantile(magnitude, 0.999))
    per_channel = w.reshape(w.shape[0], -1)
    ranges = per_channel.max(axis=1) - per_channel.min(axis=1)
    median_range = float(np.median(ranges))
    scales = np.abs(per_channel).max(axis=1, keepdims=True) / 127
    zeroed = np.abs(per_channel) < scales / 2
    return {
        "max_abs": max_abs,
        "p999_abs": p999,
        "outlier_ratio": max_abs / p999 if p999 > 0 else (1.0 if max_abs == 0 else math.inf),
        "channel_range_max": float(ranges.max()),
        "channel_range_median": median_range,
        "channel_range_min": float(ranges.min()),
        "channel_range_ratio": float(ranges.max()) / median_range if median_range > 0 else math.inf,
        "zero_fraction": float(zeroed.mean()),
    }


def weight_statistics(model: nn.Module) -> list[dict[str, Any]]:
    """``kernel_statistics`` of every convolution inside a deployed block of ``model`` (its fused kernels), each
    with ``conv`` (the module's name), ``block`` (the block's type) and ``shape``."""
    rows = []
    for name, block in reparameterizable_modules(model):
        if not getattr(block, "deploy", False):
            continue
        for sub, module in block.named_modules():
            if isinstance(module, CONVOLUTIONS):
                conv = ".".join(part for part in (name, sub) if part)
                rows.append(
                    {
                        "conv": conv,
                        "block": type(block).__name__,
                        "shape": list(module.weight.shape),
                        **kernel_statistics(module.weight),
                    }
                )
    # A block nested in another (a Conv inside a custom block) would list its kernel twice: keep the first.
    return list({row["conv"]: row for row in reversed(rows)}.values())[::-1]


def weight_summary(rows: list[dict[str, Any]], prefix: str = "int8/weights_") -> dict[str, Any]:
    """The model-level figures of ``weight_statistics``: the worst and the median outlier ratio (and which conv has
    the worst), the worst channel range ratio, the largest zero fraction, the number of kernels."""
    if not rows:
        return {f"{prefix}kernels": 0}
    worst = max(rows, key=lambda row: row["outlier_ratio"])
    return {
        f"{prefix}kernels": len(rows),
        f"{prefix}max_outlier_ratio": worst["outlier_ratio"],
        f"{prefix}max_outlier_conv": worst["conv"],
        f"{prefix}median_outlier_ratio": statistics.median(row["outlier_ratio"] for row in rows),
        f"{prefix}max_channel_range_ratio": max(row["channel_range_ratio"] for row in rows),
        f"{prefix}max_zero_fraction": max(row["zero_fraction"] for row in rows),
    }


# --- the deploy check's call -------------------------------------------------------------------------------------


def _other_batch(x: torch.Tensor) -> torch.Tensor:
    """A batch of another size than ``x``'s (1, or 3 when ``x`` has one sample), to exercise the dynamic axis."""
    if x.shape[0] > 1:
        return x[:1]
    return torch.cat([x, torch.randn_like(x), torch.randn_like(x)])


def export_and_check(
    deployed_model: nn.Module,
    example_input: torch.Tensor,
    out_dir: str | Path,
    *,
    calibration_batches: Iterable[Any] | None = None,
    num_calibration_batches: int = 8,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    activation_type: str = ACTIVATION_TYPE,
    threads: int | None = None,
    latency: bool = True,
    rounds: int = 5,
    min_run_time: float = 0.1,
    warmup: int = 5,
    tolerance: float = TOLERANCE,
    opset: int = OPSET,
) -> dict[str, Any]:
    """Export ``deployed_model`` to ``out_dir/model.onnx``, audit and verify it, time it; with
    ``calibration_batches`` also quantize it to ``out_dir/model.int8.onnx`` and measure that. Files are written
    atomically. Returns flat results.json fields:

    - ``onnx/file``, ``onnx/opset``, the audit (``GraphAudit.as_dict``: ``onnx/nodes``, ``onnx/conv_nodes``,
      ``onnx/batch_norm_nodes``, ``onnx/fused_blocks``, ``onnx/op_counts``, ``onnx/audit_ok``,
      ``onnx/audit_problems``);
    - ``onnx/max_rel_error``: ONNX Runtime against PyTorch, normwise, the worst of the example batch and a batch of
      another size (the dynamic axis); ``onnx/equivalent`` = it is <= ``tolerance``; ``onnx/ok`` = audit and
      equivalence both pass;
    - with ``latency``: ``onnx/latency_ms``, ``onnx/latency_iqr_ms``, ``onnx/torch_latency_ms`` (eager, same
      threads, interleaved), ``onnx/latency_vs_torch`` (paired by round; below 1 is faster), ``onnx/threads``;
    - with ``evaluate`` (called with an ``OnnxModule``, e.g. ``lambda m: task.evaluate(m, test_loader)``):
      ``onnx/<metric>`` for each metric it returns;
    - with ``calibration_batches`` (tensors or (inputs, targets) batches; the first ``num_calibration_batches``):
      ``int8/file``, ``int8/activation_type``, ``int8/calibration_batches``, ``int8/max_rel_error`` (against
      PyTorch: the quantization error, informational), ``int8/latency_ms``, ``int8/latency_iqr_ms``,
      ``int8/latency_vs_fp32`` (against ``onnx/latency_ms``, paired by round), ``int8/<metric>`` and
      ``int8/<metric>_drop`` (FP32 graph minus INT8), and the weight statistics ``int8/weights_*``
      (``weight_summary``).

    Everything runs on a float32 copy of ``deployed_model`` on the CPU (the model itself is untouched), with
    ``threads`` CPU threads in PyTorch and ONNX Runtime (None: ``torch.get_num_threads()``). Raises ExportError
    when the model cannot be exported.
    """
    out_dir = Path(out_dir)
    threads = threads if threads is not None else torch.get_num_threads()
    x = example_input.detach().to("cpu", torch.float32)
    deployed_model = copy.deepcopy(deployed_model).to("cpu", torch.float32).eval()  # wherever it trained
    fp32 = export_onnx(deployed_model, x, out_dir / ONNX_FILE, opset=opset)
    audit = audit_graph(fp32, deployed_model, x)
    with torch.no_grad():
        template = deployed_model(x)
    session = OnnxModule(fp32, template, threads=threads)
    other = _other_batch(x)
    error = onnx_max_rel_error(deployed_model, session, [x, other])
    results: dict[str, Any] = {"onnx/file": str(out_dir / ONNX_FILE), "onnx/opset": opset, **audit.as_dict()}
    results["onnx/max_rel_error"] = error
    results["onnx/batch_sizes_checked"] = f"{x.shape[0]},{other.shape[0]}"
    results["onnx/equivalent"] = error <= tolerance
    results["onnx/ok"] = audit.ok and error <= tolerance
    if evaluate is not None:
        fp32_metrics = dict(evaluate(session))
        results.update({f"onnx/{key}": value for key, value in fp32_metrics.items()})
    int8 = None
    if calibration_batches is not None:
        calibration = list(_batches(calibration_batches, num_calibration_batches))
        int8 = quantize_int8(
            fp32, calibration, out_dir / INT8_FILE, num_batches=len(calibration) or 1, activation_type=activation_type
        )
        int8_session = OnnxModule(int8, template, threads=threads)
        results["int8/file"] = str(out_dir / INT8_FILE)
        results["int8/activation_type"] = activation_type
        results["int8/calibration_batches"] = len(calibration)
        results["int8/calibration_samples"] = sum(batch.shape[0] for batch in calibration)
        results["int8/max_rel_error"] = onnx_max_rel_error(deployed_model, int8_session, [x])
        if evaluate is not None:
            for key, value in dict(evaluate(int8_session)).items():
                results[f"int8/{key}"] = value
                if key in fp32_metrics:
                    results[f"int8/{key}_drop"] = fp32_metrics[key] - value
        results.update(weight_summary(weight_statistics(deployed_model)))
    if latency:
        report = measure_engines(
            deployed_model,
            fp32,
            x,
            engines=("onnxruntime",),
            int8_model=int8,
            threads=threads,
            warmup=warmup,
            min_run_time=min_run_time,
            rounds=rounds,
        )
        ort, eager = report.latencies["onnxruntime"], report.latencies["torch"]
        results.update(
            {
                "onnx/latency_ms": ort.median_ms,
                "onnx/latency_iqr_ms": ort.iqr_ms,
                "onnx/torch_latency_ms": eager.median_ms,
                "onnx/latency_vs_torch": paired_ratio(ort, eager),
                "onnx/threads": threads,
                "onnx/provider": "CPUExecutionProvider",
            }
        )
        if int8 is not None:
            quantized = report.latencies["onnxruntime-int8"]
            results["int8/latency_ms"] = quantized.median_ms
            results["int8/latency_iqr_ms"] = quantized.iqr_ms
            results["int8/latency_vs_fp32"] = paired_ratio(quantized, ort)
    return results


# --- command line ------------------------------------------------------------------------------------------------


class UsageError(Exception):
    """Bad input: a message for the user, exit status 2."""


def load_deployed(path: Path) -> tuple[nn.Module, dict[str, Any], str, Path]:
    """The deployed model of a run directory (RUN_DIR/checkpoints/deploy.pt), a deploy.pt or a Lightning .ckpt
    (fused here), read weights only through repablate's allow-list. Returns (model, config, description, the
    checkpoint's path). A deploy.pt holding the training form is returned as it is: the audit names its blocks."""
    from repablate.inspect import InspectError, load_checkpoint  # the CLI looks sideways; the library does not
    from repablate.nn import reparameterize
    from repablate.results import CHECKPOINTS_DIR, DEPLOY_CHECKPOINT

    checkpoint = path / CHECKPOINTS_DIR / DEPLOY_CHECKPOINT if path.is_dir() else path
    if path.is_dir() and not checkpoint.is_file():
        raise UsageError(f"{path} is a directory without {CHECKPOINTS_DIR}/{DEPLOY_CHECKPOINT}: give a run directory")
    try:
        model, config, meant_deployed, source = load_checkpoint(checkpoint)
    except InspectError as error:
        raise UsageError(str(error)) from error
    if not meant_deployed:
        model, source = reparameterize(model), f"{source}, fused"
    return model.eval(), config, source, checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m repablate.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", type=Path, help="a run directory, a deploy.pt, or a Lightning .ckpt (fused first)")
    parser.add_argument("--out", type=Path, help="where model.onnx goes (default: beside the checkpoint)")
    parser.add_argument("--int8", action="store_true", help="also quantize to model.int8.onnx and time it")
    parser.add_argument(
        "--calibration-batches", type=int, default=8, help="batches of synthetic N(0, 1) inputs (default 8)"
    )
    parser.add_argument("--input-shape", help="N,C,H,W of the example input (default: 1 and the config's data)")
    parser.add_argument("--threads", type=int, help="CPU threads of PyTorch and ONNX Runtime (default: torch's)")
    parser.add_argument("--no-latency", action="store_true", help="skip the timing")
    return parser.parse_args(argv)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinity as null (JSON has neither), as results.json writes them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> int:
    """Export, audit, verify (and quantize); print a JSON summary. Exit 0 clean, 1 problems found, 2 bad input."""
    from repablate.inspect import InspectError, example_input

    args = parse_args(argv)
    try:
        if args.calibration_batches < 1:
            raise UsageError(f"--calibration-batches {args.calibration_batches} is not allowed: give 1 or more")
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"--threads {args.threads} is not allowed: give 1 or more")
        model, config, source, checkpoint = load_deployed(args.path)
        x = example_input(config, args.input_shape)
    except (UsageError, InspectError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    calibration = [torch.randn_like(x) for _ in range(args.calibration_batches)] if args.int8 else None
    out = args.out if args.out is not None else checkpoint.parent
    try:
        results = export_and_check(
            model,
            x,
            out,
            calibration_batches=calibration,
            num_calibration_batches=args.calibration_batches,
            threads=args.threads,
            latency=not args.no_latency,
        )
    except ExportError as error:
        print(f"error: {source}: {error}", file=sys.stderr)
        return 1
    summary: dict[str, Any] = {
        "source": source,
        "input_shape": list(x.shape),
        "onnxruntime": onnxruntime.__version__,
        "results": results,
    }
    if args.int8:
        summary["calibration"] = "synthetic N(0, 1) inputs: INT8 latency and graph only; accuracy needs real batches"
        summary["weights"] = weight_statistics(model)
    print(json.dumps(_finite(summary), indent=1, default=str, allow_nan=False))
    if results["onnx/ok"]:
        return 0
    if not results["onnx/audit_ok"]:
        print(f"error: the graph audit failed: {results['onnx/audit_problems']}", file=sys.stderr)
    if not results["onnx/equivalent"]:
        print(
            f"error: ONNX Runtime differs from PyTorch: max relative error {results['onnx/max_rel_error']:.3g} > "
            f"{TOLERANCE:g}",
            file=sys.stderr,
        )
    return 1


if __name__ == "__main__":
    sys.exit(main())

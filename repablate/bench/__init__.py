"""repablate.bench -- what re-parameterization costs and saves: params, FLOPs, memory traffic, latency, op audit.

Stands on repablate.nn and torch only (and ONNX Runtime, OpenVINO where installed, for the engines).
``measure_forms(train_model, deploy_model, example_input)`` is the one call the rest of the project needs;
``audit_ops`` proves what a forward pass actually runs; ``measure_engines`` times a deployed model in PyTorch eager
beside inference runtimes running its ONNX graph.
"""

from repablate.bench.audit import BlockAudit, OpAudit, audit_ops
from repablate.bench.counting import MemoryAccessCounter, count_flops, count_params, memory_access
from repablate.bench.engines import ENGINES, EngineReport, EngineUnavailable, measure_engines
from repablate.bench.forms import BenchSettings, FormsReport, ModelCost, measure_forms, measure_model, measure_models
from repablate.bench.latency import Latency, measure_latencies, measure_latency

__all__ = [
    "BenchSettings",
    "BlockAudit",
    "ENGINES",
    "EngineReport",
    "EngineUnavailable",
    "FormsReport",
    "Latency",
    "MemoryAccessCounter",
    "ModelCost",
    "OpAudit",
    "audit_ops",
    "count_flops",
    "count_params",
    "measure_engines",
    "measure_forms",
    "measure_latencies",
    "measure_latency",
    "measure_model",
    "measure_models",
    "memory_access",
]

"""Op audit: which aten ops a forward pass runs, per model and per re-parameterizable block, and what is wrong.

It answers the article's troubleshooting list (section 4.2) with evidence rather than by reading code:
- a deployed model must run no batch_norm, and each fused block (a block that owns one convolution once
  deployed) exactly one convolution and no branch addition per call; a deployed block that owns several
  convolutions (a detection head fused per level) is only held to running no batch_norm;
- a block meant to be deployed but left in its multi-branch form is flagged ("fuse_repvgg_block() never called");
- an identity branch on a block whose stride, channels or padding make input and output shapes differ is
  flagged (the article's first pitfall). ``repablate.nn.RepConv`` refuses to build one, but a module loaded from
  YOLOv7 code or edited after construction can still carry it, so the check reads the live submodules.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from repablate.nn import reparameterizable_modules


def is_convolution(op: str) -> bool:
    """Whether an aten op name (e.g. 'aten.convolution') is a convolution."""
    return "conv" in op and "backward" not in op


def is_batch_norm(op: str) -> bool:
    """Whether an aten op name is a batch norm (native_batch_norm, _native_batch_norm_legit_no_training, ...)."""
    return "batch_norm" in op


def is_addition(op: str) -> bool:
    """Whether an aten op name is a tensor addition, the op that sums branches."""
    return op in ("aten.add", "aten.add_")


@dataclass
class BlockAudit:
    """One re-parameterizable block: its form, live branches, how many conv modules it owns, and the ops its
    forward ran over ``calls`` calls."""

    name: str
    kind: str
    deployed: bool
    branches: tuple[str, ...]
    conv_modules: int = 0
    calls: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def count(self, predicate) -> int:
        """How many ops of the kind ``predicate`` (e.g. ``is_convolution``) ran inside this block."""
        return sum(n for op, n in self.ops.items() if predicate(op))


@dataclass
class OpAudit:
    """The audit of one forward pass. ``ok`` is False when anything listed under ``problems()`` was found;
    ``forward_error`` says why the forward raised, if it did (the ops then stop where it failed)."""

    model: str
    expect_deployed: bool
    ops: Counter[str]
    blocks: list[BlockAudit]
    model_problems: list[str] = field(default_factory=list)
    forward_error: str | None = None

    def problems(self) -> list[str]:
        """Every problem found, model-level first, then per block (prefixed with the block's name)."""
        return self.model_problems + [f"{block.name}: {problem}" for block in self.blocks for problem in block.problems]

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems()

    @property
    def unfused(self) -> list[str]:
        """Names of the blocks still in their multi-branch (training) form."""
        return [block.name for block in self.blocks if not block.deployed]

    def to_markdown(self) -> str:
        """The audit as a markdown report: verdict, ops per forward, blocks, problems."""
        form = "deployed" if self.expect_deployed else "training"
        verdict = "OK" if self.ok else f"{len(self.problems())} problem(s)"
        lines = [f"# Op audit: {self.model}", "", f"- expected form: {form}", f"- verdict: {verdict}", ""]
        lines += ["## Ops per forward", "", "| op | calls |", "|---|---:|"]
        lines += [f"| {op} | {n} |" for op, n in self.ops.most_common()]
        lines += ["", "## Re-parameterizable blocks", ""]
        lines += ["| block | type | form | branches | calls | convolutions | batch_norms | additions |"]
        lines += ["|---|---|---|---|---:|---:|---:|---:|"]
        for block in self.blocks:
            lines.append(
                f"| {block.name} | {block.kind} | {'deployed' if block.deployed else 'training'} | "
                f"{', '.join(block.branches) or '-'} | {block.calls} | {block.count(is_convolution)} | "
                f"{block.count(is_batch_norm)} | {block.count(is_addition)} |"
            )
        lines += ["", "## Problems", ""]
        lines += [f"- {problem}" for problem in self.problems()] or ["none"]
        return "\n".join(lines) + "\n"


def _is_block(module: nn.Module) -> bool:
    # YOLOv7's own RepConv has no reparameterize(); its rbr_* attributes identify it.
    return hasattr(module, "rbr_dense") or hasattr(module, "rbr_reparam")


def _blocks(model: nn.Module) -> dict[str, nn.Module]:
    found = dict(reparameterizable_modules(model))
    found.update((name, module) for name, module in model.named_modules() if _is_block(module))
    return {name or "<root>": module for name, module in model.named_modules() if (name in found)}


def _branches(module: nn.Module) -> tuple[str, ...]:
    if callable(getattr(module, "branches", None)):
        return tuple(module.branches())
    named = {"dense": "rbr_dense", "1x1": "rbr_1x1", "identity": "rbr_identity"}
    return tuple(name for name, attribute in named.items() if getattr(module, attribute, None) is not None)


def _is_deployed(module: nn.Module) -> bool:
    deploy = getattr(module, "deploy", None)
    return bool(deploy) if deploy is not None else hasattr(module, "rbr_reparam")


def _identity_conflict(module: nn.Module) -> str | None:
    """Why an identity branch cannot match the output shape of the block, or None where it can (or is absent)."""
    if getattr(module, "rbr_identity", None) is None or getattr(module, "rbr_dense", None) is None:
        return None
    conv = next((m for m in module.rbr_dense.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return None
    reasons = []
    if any(s != 1 for s in conv.stride):
        reasons.append(f"stride {tuple(conv.stride)}")
    if conv.in_channels != conv.out_channels:
        reasons.append(f"c1={conv.in_channels} != c2={conv.out_channels}")
    same = tuple(d * (k // 2) for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
    if conv.padding != same and conv.padding != "same":
        reasons.append(f"padding {conv.padding} instead of {same}")
    if not reasons:
        return None
    return (
        f"identity branch on a block with {', '.join(reasons)}: the identity cannot match the output shape "
        "(remove it, e.g. use_identity=False / RepConvN)"
    )


class _OpRecorder(TorchDispatchMode):
    """Counts aten ops overall and for every block on the call stack when the op runs."""

    def __init__(self, block_audits: dict[str, BlockAudit]):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.stack: list[str] = []
        self.block_audits = block_audits

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = str(func.overloadpacket)
        self.ops[op] += 1
        for name in self.stack:
            self.block_audits[name].ops[op] += 1
        return func(*args, **(kwargs or {}))


def _check_deployed_block(block: BlockAudit) -> None:
    if block.calls == 0:
        return
    if block.count(is_batch_norm):
        block.problems.append(f"ran {block.count(is_batch_norm)} batch_norm op(s) although deployed")
    if block.conv_modules != 1:
        return  # e.g. a detection head with one fused conv per level: its convs and additions are its design
    convolutions = block.count(is_convolution)
    if convolutions != block.calls:
        block.problems.append(f"ran {convolutions} convolution(s) in {block.calls} call(s), expected one per call")
    if block.count(is_addition):
        block.problems.append(f"ran {block.count(is_addition)} addition(s) although deployed (branches not fused)")


@torch.no_grad()
def audit_ops(model: nn.Module, example_input: Any, expect_deployed: bool | None = None) -> OpAudit:
    """Run one forward of ``model`` in eval mode on ``example_input`` (a tensor or a tuple of arguments) and audit it.

    ``expect_deployed``: whether the model is meant to be in its fused form. None infers it: meant to be deployed
    when any block is deployed (so a partly fused model is flagged). The model's train/eval modes are restored
    and nothing of it is changed. A forward that raises is reported as a problem, not raised.
    """
    modules = _blocks(model)
    audits = {
        name: BlockAudit(
            name,
            type(module).__name__,
            _is_deployed(module),
            _branches(module),
            conv_modules=sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in module.modules()),
        )
        for name, module in modules.items()
    }
    if expect_deployed is None:
        expect_deployed = any(audit.deployed for audit in audits.values())
    recorder = _OpRecorder(audits)
    model_problems: list[str] = []
    forward_error = None
    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(lambda *_, name=name: recorder.stack.append(name)))
        handles.append(module.register_forward_hook(lambda *_, name=name: _leave(recorder, audits[name])))
    modes = [(module, module.training) for module in model.modules()]
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        model.eval()
        with recorder:
            model(*args)
    except Exception as error:  # noqa: BLE001 -- a broken model is what an audit exists to report
        forward_error = f"{type(error).__name__}: {error}"
        model_problems.append(f"the forward pass failed: {forward_error}")
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    for name, module in modules.items():
        audit = audits[name]
        conflict = _identity_conflict(module)
        if conflict:
            audit.problems.append(conflict)
        if expect_deployed and not audit.deployed:
            detail = f"branches {list(audit.branches)}" if audit.branches else "training form"
            audit.problems.append(f"left unfused ({detail}): reparameterize was not applied")
        if audit.deployed:
            _check_deployed_block(audit)
    if expect_deployed:
        batch_norms = sum(n for op, n in recorder.ops.items() if is_batch_norm(op))
        if batch_norms:
            model_problems.append(f"batch_norm still runs {batch_norms} time(s) in a model meant to be deployed")
    return OpAudit(
        type(model).__name__, expect_deployed, recorder.ops, list(audits.values()), model_problems, forward_error
    )


def _leave(recorder: _OpRecorder, audit: BlockAudit) -> None:
    recorder.stack.pop()
    audit.calls += 1

"""The harness's callbacks. They work for any task module (``repablate.train.task.TaskModule``'s protocol:
``model``, ``evaluate``, ``example_input``).

BranchGradientMonitor watches every multi-branch block's gradients; DivergenceGuard ends a run whose loss or
weights stop being finite; DeployCheck fuses, proves, evaluates and measures the model at the end of fit;
TrainingThroughput times the training epochs; RunConfigInCheckpoints stores the run config in every checkpoint.

A callback that contributes to results.json has ``run_results() -> dict[str, Any]``: flat results.json fields,
read once the fit has ended (``repablate.train.main`` merges those of every callback that has the method).
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from repablate.data.tensors import whole_split_loader
from repablate.nn import equivalence_error, load_state_dict, reparameterize
from repablate.results import GRADIENT_COLUMNS, write_atomically
from repablate.train.checkpoints import CheckpointError, check_model_config, read_checkpoint

log = logging.getLogger(__name__)


class DeployMismatchError(RuntimeError):
    """The deploy (fused) form does not compute what the training form computes."""


class TrainingDiverged(RuntimeError):
    """The training loss or the weights became NaN or infinite. ``step`` is the optimizer step (0-based, as in
    branch_gradients.csv) at which it was found, or None if no step had been taken."""

    def __init__(self, message: str, step: int | None):
        super().__init__(message)
        self.step = step


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of the parameters and floating-point buffers of ``module`` that hold a NaN or an infinity.

    One device sync for the whole module (the per-tensor flags are stacked before they are read).
    """
    named = [
        (name, tensor)
        for name, tensor in (*module.named_parameters(), *module.named_buffers())
        if tensor.is_floating_point() and tensor.numel()
    ]
    if not named:
        return []
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(tensor).all().to(named[0][1].device) for _, tensor in named]).tolist()
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def batch_inputs(batch: Any) -> Any:
    """The model input of a batch: the batch itself if a tensor, else its first item ((inputs, targets, ...))."""
    return batch if isinstance(batch, torch.Tensor) else batch[0]


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _log_to_loggers(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


class BranchGradientMonitor(Callback):
    """Gradient norm of each branch of each multi-branch block (anything with a non-empty ``branches()``, e.g.
    RepConv: dense, 1x1, identity), every ``every_n_steps`` optimizer steps, before gradient clipping.

    A branch's norm is the 2-norm of all its parameters' gradients (conv weight and BN affine); its share is that
    norm over the sum of the layer's branch norms. When a branch's share stays below ``threshold`` for
    ``patience`` checks in a row, a warning is logged and counted (once per streak). Loggers get only the
    aggregate per branch kind (``grad/share_mean/<branch>``, ``grad/share_min/<branch>``), which stays small
    for deep models; every (step, layer, branch) row goes to ``csv_path``.
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        threshold: float = 0.01,
        patience: int = 5,
        csv_path: str | os.PathLike | None = None,
    ):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} is not allowed: it must be a positive integer")
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold={threshold!r} is not allowed: it must be a share in [0, 1)")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience={patience!r} is not allowed: it must be a positive integer")
        self.every_n_steps, self.threshold, self.patience = every_n_steps, threshold, patience
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.warnings = 0
        self._layers: list[tuple[str, dict[str, list[nn.Parameter]]]] = []
        self._streaks: dict[tuple[str, str], int] = defaultdict(int)
        self._rows: list[tuple] = []
        self._share_sum: dict[str, float] = defaultdict(float)
        self._share_count: dict[str, int] = defaultdict(int)
        self._share_min: dict[str, float] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer is not None and not trainer.is_global_zero:  # under DDP only the first process writes the CSV
            self.csv_path = None
        self._layers = []
        for name, module in pl_module.model.named_modules():
            branches = module.branches() if callable(getattr(module, "branches", None)) else {}
            if len(branches) > 1:  # one branch has a share of 1 by definition: nothing to watch
                params = {b: [p for p in m.parameters() if p.requires_grad] for b, m in branches.items()}
                self._layers.append((name, params))
        self._params, self._spans = [], []  # every branch's parameters in order, and each branch's slice of them
        for _, branches in self._layers:
            for params in branches.values():
                self._spans.append((len(self._params), len(self._params) + len(params)))
                self._params += params

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        step = trainer.global_step
        # Under DDP every process holds the same averaged gradients: the first one watches and writes.
        if not self._layers or step % self.every_n_steps or not trainer.is_global_zero:
            return
        # Two batched norm calls for the whole model (per parameter, then per branch) and one device sync.
        zero = torch.zeros((), device=pl_module.device)
        grads = [p.grad if p.grad is not None else zero for p in self._params]
        param_norms = torch._foreach_norm(grads)
        branch_norms = torch._foreach_norm([torch.stack(param_norms[i:j]) for i, j in self._spans])
        norms = torch.stack(branch_norms).tolist()
        aggregate: dict[str, list[float]] = defaultdict(list)
        index = 0
        for layer, branches in self._layers:
            layer_norms = norms[index : index + len(branches)]
            index += len(branches)
            total = sum(layer_norms)
            for branch, norm in zip(branches, layer_norms, strict=True):
                share = norm / total if total > 0 else 0.0
                self._rows.append((step, layer, branch, norm, share))
                aggregate[branch].append(share)
                self._track_streak(layer, branch, share, step)
        metrics = {}
        for branch, shares in aggregate.items():
            metrics[f"grad/share_mean/{branch}"] = sum(shares) / len(shares)
            metrics[f"grad/share_min/{branch}"] = min(shares)
            self._share_sum[branch] += sum(shares)
            self._share_count[branch] += len(shares)
            self._share_min[branch] = min(self._share_min.get(branch, 1.0), min(shares))
        metrics["grad/warnings"] = self.warnings
        _log_to_loggers(trainer, metrics)

    def _track_streak(self, layer: str, branch: str, share: float, step: int) -> None:
        key = (layer, branch)
        self._streaks[key] = self._streaks[key] + 1 if share < self.threshold else 0
        if self._streaks[key] == self.patience:
            self.warnings += 1
            log.warning(
                "branch '%s' of layer '%s' is starved: its share of the layer's gradient norm stayed below %g for "
                "%d checks in a row (now %.2e, step %d)",
                branch,
                layer,
                self.threshold,
                self.patience,
                share,
                step,
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._flush()  # the gradients up to a divergence or an interruption are what explains it

    def _flush(self) -> None:
        if self.csv_path is None or (not self._rows and self.csv_path.exists()):
            return
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.csv_path.exists()
        with self.csv_path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(GRADIENT_COLUMNS)
            writer.writerows(self._rows)
        self._rows = []

    def run_results(self) -> dict[str, float]:
        """``grad/warnings`` and, per branch kind, the mean and min share over every check and layer."""
        result: dict[str, float] = {"grad/warnings": self.warnings}
        for branch, count in self._share_count.items():
            result[f"grad/share_mean/{branch}"] = self._share_sum[branch] / count
            result[f"grad/share_min/{branch}"] = self._share_min[branch]
        return result


class DivergenceGuard(Callback):
    """Ends the fit with ``TrainingDiverged`` when the training loss is NaN or infinite, and at each train epoch's
    end (before that epoch's checkpoints are written) when a weight or buffer of ``pl_module.model`` is.

    The loss is checked in ``on_before_backward``, so the run stops at the first bad step, before its update. On
    the CPU reading the loss costs nothing, so every step is checked at once. On an accelerator reading it would
    make the host wait for the device every step; there the first bad step is kept on the device (no sync) and read
    every ``check_every_n_steps`` steps and at the epoch's end, so the run stops a few steps late, but names the
    first bad step all the same. ``sync_every_step`` overrides that choice (None: only on the CPU).
    """

    def __init__(self, check_every_n_steps: int = 10, sync_every_step: bool | None = None):
        if not isinstance(check_every_n_steps, int) or isinstance(check_every_n_steps, bool) or check_every_n_steps < 1:
            raise ValueError(
                f"check_every_n_steps={check_every_n_steps!r} is not allowed: it must be a positive integer"
            )
        self.check_every_n_steps, self.sync_every_step = check_every_n_steps, sync_every_step
        self._first_bad_step: torch.Tensor | None = None  # -1 while every loss has been finite
        self._first_bad_loss: torch.Tensor | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_bad_step = self._first_bad_loss = None

    @torch.no_grad()
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach()
        if loss.ndim:  # a scalar, NaN or infinite whenever any element is
            loss = loss.float().mean()
        step = trainer.global_step
        sync = self.sync_every_step if self.sync_every_step is not None else loss.device.type == "cpu"
        if sync:
            bad = not math.isfinite(loss.item())  # a few microseconds: the cheapest test of a CPU scalar
            if trainer.world_size > 1:  # DDP: every process stops at the same step, or the others would hang
                bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
            if bad:
                raise self._loss_error(loss, step)
            return
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._first_bad_loss = torch.zeros((), device=loss.device)
        first = ~torch.isfinite(loss) & (self._first_bad_step < 0)
        self._first_bad_step = torch.where(first, step, self._first_bad_step)
        self._first_bad_loss = torch.where(first, loss.float(), self._first_bad_loss)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step % self.check_every_n_steps == 0:
            self._raise_if_a_loss_was_bad(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raise_if_a_loss_was_bad(trainer)
        raise_if_nonfinite(pl_module.model, f"after epoch {trainer.current_epoch}", trainer.global_step)

    def _raise_if_a_loss_was_bad(self, trainer: pl.Trainer) -> None:
        step = int(self._first_bad_step) if self._first_bad_step is not None else -1  # the one sync
        bad = step >= 0
        if trainer.world_size > 1:  # DDP: all processes check at the same steps and stop together
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad and step >= 0:
            raise self._loss_error(self._first_bad_loss, step)
        if bad:
            raise TrainingDiverged(
                "the training loss of another DDP process was NaN or infinite: training diverged", None
            )

    @staticmethod
    def _loss_error(loss: torch.Tensor, step: int) -> TrainingDiverged:
        return TrainingDiverged(
            f"the training loss is {loss.item()} at optimizer step {step}: training diverged (a lower optimizer.lr or "
            "lr_scale, a warm-up or trainer.gradient_clip_val may keep it finite)",
            step,
        )


def raise_if_nonfinite(model: nn.Module, when: str, global_step: int) -> None:
    """``TrainingDiverged`` if a weight or buffer of ``model`` is NaN or infinite; ``when`` says when it was found,
    ``global_step`` is the number of optimizer steps taken (the last of them is reported as the divergence's)."""
    bad = nonfinite_tensors(model)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise TrainingDiverged(
            f"{when} the model holds NaN or infinity in {len(bad)} tensors ({shown}): training diverged",
            global_step - 1 if global_step > 0 else None,
        )


@contextmanager
def _full_float32():
    """TF32 off on CUDA while comparing the forms: its 10-bit mantissa would hide the fusion's own error."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# The ONNX exporter's optimizer logs every pass at INFO ("Skipping constant folding ...", "No unused functions to
# remove"): a run's console keeps warnings and errors from them only.
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


@contextmanager
def _quiet(names: tuple[str, ...], level: int = logging.WARNING):
    """Loggers ``names`` at ``level`` or above while inside (their levels restored after)."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, old in zip(loggers, saved, strict=True):
            logger.setLevel(old)


class DeployCheck(Callback):
    """At the end of fit: fuse a copy of ``pl_module.model`` and prove it is the same function.

    1. equivalence error (training vs deploy form, both in eval mode) on ``equivalence_batches`` validation
       batches; above ``max_rel_error`` the run fails;
    2. ``pl_module.evaluate`` of both forms on the validation and test loaders; a metric differing by more than
       ``metric_atol`` fails the run (float noise may flip near-tie predictions, nothing more);
    3. ``repablate.bench.measure_forms`` of both forms on ``example_input(measure_batch_size)``, with ``bench``
       as its keyword arguments;
    4. ``checkpoint_path`` (deploy.pt): ``{"state_dict", "config", "deploy": True}``, verified the way any
       tool reads it: weights only (``read_checkpoint``), loaded into ``instantiate(config["model"],
       deploy=True)`` from the run's own config in memory, outputs compared. A model target outside
       ``repablate.train.checkpoints``' allow-list (a user's own block) is built, with a warning that inspect
       will refuse to rebuild that file.
    5. with ``export``: ``repablate.export.export_and_check`` of the fused model into the folder of
       ``checkpoint_path`` (``model.onnx``; with ``int8`` also ``model.int8.onnx``, statically quantized on the
       inputs of the first ``calibration_batches`` training batches), ``export_options`` as its further keyword
       arguments; the FP32 graph and the INT8 graph are evaluated with ``pl_module.evaluate`` on the validation
       and test loaders (``onnx/<split>/<metric>``, ``int8/<split>/<metric>``). A graph that fails its audit,
       differs from the fused model by more than ``max_rel_error``, or whose metrics differ from the fused
       model's by more than ``metric_atol`` fails the run. ``int8/drop`` is the fused model's test metric minus
       the INT8 graph's, for the task's first metric (``acc``; ``map50`` for detection).

    Steps 1 and 2 run in float32 whatever the training precision (a float32 copy of a model trained in
    ``bf16-true``); both forms are then evaluated at the run's precision (``at_precision/...``: under its autocast,
    or in its dtype), as they would deploy. Under DDP the first process checks alone, on whole batches
    (``whole_split_loader``); the others go on to the test.

    ``run_config`` (the resolved run config, a plain dict) is set by the entry point; without it step 4 saves
    no config and skips the verification. ``run_results()``: the figures of steps 1-3 and 5 (flat, results.json's
    keys).
    """

    def __init__(
        self,
        checkpoint_path: str | os.PathLike,
        equivalence_batches: int = 4,
        max_rel_error: float = 1e-4,
        metric_atol: float = 0.005,
        measure_batch_size: int = 32,
        bench: dict[str, Any] | None = None,
        export: bool = True,
        int8: bool = True,
        calibration_batches: int = 8,
        export_options: dict[str, Any] | None = None,
    ):
        if not isinstance(equivalence_batches, int) or equivalence_batches < 1:
            raise ValueError(f"equivalence_batches={equivalence_batches!r} is not allowed: it must be >= 1")
        if not isinstance(calibration_batches, int) or isinstance(calibration_batches, bool) or calibration_batches < 1:
            raise ValueError(f"calibration_batches={calibration_batches!r} is not allowed: it must be >= 1")
        self.export, self.int8, self.calibration_batches = export, export and int8, calibration_batches
        self.export_options = dict(export_options or {})
        self.checkpoint_path = Path(checkpoint_path)
        self.equivalence_batches, self.max_rel_error, self.metric_atol = equivalence_batches, max_rel_error, metric_atol
        self.measure_batch_size = measure_batch_size
        self.bench = dict(bench or {})
        self.run_config: dict[str, Any] | None = None
        self.results: dict[str, Any] = {}

    def run_results(self) -> dict[str, Any]:
        return dict(self.results)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A diverged model would "fuse" into NaN weights and be saved as deploy.pt: refuse it as divergence.
        raise_if_nonfinite(pl_module.model, "at the end of training", trainer.global_step)
        if not trainer.is_global_zero:  # under DDP the first process checks alone, on whole batches
            return
        # Lightning's teardown has moved the module to the CPU before on_fit_end: check, evaluate (at the run's
        # precision, whose autocast is the training device's) and measure where it trained, then put it back.
        pl_module.to(trainer.strategy.root_device)
        try:
            self._check(trainer, pl_module)
        finally:
            pl_module.cpu()

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        trained_dtype = next(model.parameters()).dtype
        if trained_dtype != torch.float32:  # e.g. precision=bf16-true: the proof is made in float32 all the same
            model = copy.deepcopy(model).float()
        deployed = reparameterize(model)
        datamodule = trainer.datamodule
        loaders = {split: whole_split_loader(datamodule, split) for split in ("val", "test")}
        self.results = self._equivalence(model, deployed, loaders["val"], pl_module.device)
        for split, loader in loaders.items():
            self._compare_metrics(split, pl_module.evaluate(model, loader), pl_module.evaluate(deployed, loader))
        self.results.update(self._at_precision(trainer, pl_module, deployed, loaders))
        from repablate.bench import measure_forms  # measurement is costly to import; only needed here

        bench = {"device": pl_module.device, **self.bench}  # measured where it trained unless bench says otherwise
        report = measure_forms(model, deployed, pl_module.example_input(self.measure_batch_size), **bench)
        self.results.update(report.as_dict())
        self._save_deploy_checkpoint(deployed, pl_module.example_input(2))
        if self.export:
            self.results.update(self._export(deployed, pl_module, datamodule))
        _log_to_loggers(trainer, _scalars(self.results))

    def _at_precision(self, trainer: pl.Trainer, pl_module: pl.LightningModule, deployed: nn.Module, loaders):
        """Both forms' metrics under the precision the run trained with, as it would deploy them: under its
        autocast for a mixed precision, in its dtype for a "-true" one (``at_precision/...``). In float32 these are
        the float32 figures."""
        results: dict[str, Any] = {"at_precision/name": str(trainer.precision)}
        trained_dtype = next(pl_module.model.parameters()).dtype
        if str(trainer.precision) in ("32", "32-true"):
            figures = {
                key: value for key, value in self.results.items() if key.startswith(("train_form/", "deploy_form/"))
            }
            return results | {f"at_precision/{key}": value for key, value in figures.items()}
        deployed = copy.deepcopy(deployed).to(trained_dtype)
        with trainer.precision_plugin.forward_context():
            for split, loader in loaders.items():
                for form, model in (("train_form", pl_module.model), ("deploy_form", deployed)):
                    for name, value in pl_module.evaluate(model, loader).items():
                        results[f"at_precision/{form}/{split}/{name}"] = value
        return results

    def _export(self, deployed: nn.Module, pl_module: pl.LightningModule, datamodule) -> dict[str, Any]:
        from repablate.export import export_and_check  # ONNX and ONNX Runtime are costly to import

        def evaluate(graph: nn.Module) -> dict[str, float]:
            loaders = {split: whole_split_loader(datamodule, split) for split in ("val", "test")}
            return {
                f"{split}/{name}": value
                for split, loader in loaders.items()
                for name, value in pl_module.evaluate(graph, loader).items()
            }

        calibration = None
        if self.int8:  # inputs only, the first batches in the loader's order (shuffled or not, any fixed batches do)
            calibration = [
                batch_inputs(batch)
                for batch in islice(whole_split_loader(datamodule, "train"), self.calibration_batches)
            ]
        options = {"tolerance": self.max_rel_error, **self.export_options}
        with _quiet(EXPORTER_LOGGERS):
            results = export_and_check(
                deployed,
                pl_module.example_input(self.measure_batch_size),
                self.checkpoint_path.parent,
                calibration_batches=calibration,
                num_calibration_batches=self.calibration_batches,
                evaluate=evaluate,
                **options,
            )
        if not results["onnx/ok"]:
            problems = results["onnx/audit_problems"] or "none"
            raise DeployMismatchError(
                f"the exported ONNX graph {results['onnx/file']} is not the fused model: max_rel_error "
                f"{results['onnx/max_rel_error']:.3e} (tolerance {options['tolerance']:g}); audit problems: {problems}"
            )
        metrics = [key.removeprefix("deploy_form/test/") for key in self.results if key.startswith("deploy_form/test/")]
        for split in ("val", "test"):
            for name in metrics:
                fused, graph = self.results[f"deploy_form/{split}/{name}"], results[f"onnx/{split}/{name}"]
                if not abs(fused - graph) <= self.metric_atol:
                    raise DeployMismatchError(
                        f"{split} {name} of the exported ONNX graph is {graph:.6f}, the fused model's {fused:.6f}: "
                        f"they differ by more than float noise (metric_atol={self.metric_atol:g})"
                    )
        if self.int8 and metrics:
            primary = metrics[0]  # the task's first metric: acc, or map50 for detection
            results["int8/drop"] = self.results[f"deploy_form/test/{primary}"] - results[f"int8/test/{primary}"]
            results["int8/drop_metric"] = primary
        return results

    def _equivalence(self, model: nn.Module, deployed: nn.Module, loader, device) -> dict[str, Any]:
        max_abs = max_rel = 0.0
        with _full_float32():
            for batch in islice(loader, self.equivalence_batches):
                error = equivalence_error(model, deployed, batch_inputs(batch).to(device))
                max_abs, max_rel = max(max_abs, error.max_abs), max(max_rel, error.max_rel)
        if not max_rel <= self.max_rel_error:
            raise DeployMismatchError(
                f"the fused model differs from the trained one by max_rel={max_rel:.3e} (max_abs={max_abs:.3e}) on "
                f"validation batches, above the float-noise bound max_rel_error={self.max_rel_error:g}"
            )
        return {"equivalence/max_abs": max_abs, "equivalence/max_rel": max_rel}

    def _compare_metrics(self, split: str, trained: dict[str, float], fused: dict[str, float]) -> None:
        for name, value in trained.items():
            self.results[f"train_form/{split}/{name}"] = value
            self.results[f"deploy_form/{split}/{name}"] = fused[name]
            if not abs(value - fused[name]) <= self.metric_atol:
                raise DeployMismatchError(
                    f"{split} {name} of the fused model is {fused[name]:.6f}, the trained model's {value:.6f}: "
                    f"they differ by more than float noise (metric_atol={self.metric_atol:g})"
                )

    def _save_deploy_checkpoint(self, deployed: nn.Module, example: torch.Tensor) -> None:
        checkpoint = {"state_dict": deployed.state_dict(), "config": self.run_config, "deploy": True}
        write_atomically(self.checkpoint_path, lambda stream: torch.save(checkpoint, stream))
        if self.run_config is None:
            return
        # The weights come back from the file as data (weights only). The model config is this run's own
        # composition, held in memory, so a user's own block is as trusted as the run itself and is built; only a
        # config read from a file is held to the allow-list, and the user is told when inspect would refuse it.
        try:
            check_model_config(self.run_config["model"], deploy=True)
        except CheckpointError as error:
            log.warning(
                "%s: the deploy checkpoint is saved and verified here, but `python -m repablate.inspect` "
                "will refuse to rebuild it from the file",
                error,
            )
        from hydra.utils import instantiate

        rebuilt = instantiate(self.run_config["model"], deploy=True).to(example.device)
        load_state_dict(rebuilt, read_checkpoint(self.checkpoint_path)["state_dict"])
        with _full_float32():
            error = equivalence_error(deployed, rebuilt, example)
        if not error.max_rel <= 1e-6:  # same weights, same ops: equal up to a GPU's choice of conv algorithm
            raise DeployMismatchError(
                f"{self.checkpoint_path} loaded into a deploy=True model gives outputs {error.max_abs:.3e} away "
                "from the fused model it was saved from"
            )


class TrainingThroughput(Callback):
    """Training images per second (results.json's ``train/images_per_s``): images over the time from each train
    epoch's start to its last batch's end (validation, checkpointing and the deploy check excluded; data loading
    included)."""

    def __init__(self):
        self.images, self.seconds = 0, 0.0
        self._epoch_start = self._last_batch_end = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last_batch_end = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.images += len(batch_inputs(batch)) * trainer.world_size  # under DDP: every process's part
        self._last_batch_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds += self._last_batch_end - self._epoch_start

    @property
    def images_per_s(self) -> float | None:
        """Images per second over all train epochs so far; None before any."""
        return self.images / self.seconds if self.seconds > 0 else None

    def run_results(self) -> dict[str, Any]:
        return {"train/images_per_s": self.images_per_s}


class RunConfigInCheckpoints(Callback):
    """Stores ``config`` (the resolved run config, a plain dict) in every Lightning checkpoint as
    ``ckpt["repablate_config"]``, so that the model can be rebuilt from a checkpoint alone."""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["repablate_config"] = self.config

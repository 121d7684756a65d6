"""``python -m repablate.inspect``: audit the ops a model runs, from a model config or a checkpoint.

    python -m repablate.inspect model=small +variant=repconv           # the configured model, training form
    python -m repablate.inspect model=small +variant=repconv --fuse    # ... and after reparameterize
    python -m repablate.inspect --checkpoint outputs/.../checkpoints/deploy.pt

Prints a markdown report (costs, aten ops per forward, every re-parameterizable block with its branches and
form, problems). Exits 1 when the audit finds a problem -- for example a deploy checkpoint whose blocks were
never fused -- and 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from repablate.bench import audit_ops, measure_model
from repablate.nn import load_state_dict, reparameterize
from repablate.paths import conf_dir
from repablate.train import checkpoints
from repablate.train.checkpoints import CheckpointError


class InspectError(Exception):
    """Bad input: a message for the user, exit status 2."""


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """The run config composed from conf/ with Hydra overrides, as a plain dict (model and data resolved)."""
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        # Only what the audit needs is resolved: other groups may interpolate Hydra's runtime (run dirs, ...).
        shape = {key: OmegaConf.select(cfg, f"data_shape.{key}") for key in ("in_channels", "image_size")}
        model = OmegaConf.to_container(cfg.model, resolve=True) if "model" in cfg else None
        return {"data_shape": {key: value for key, value in shape.items() if value is not None}, "model": model}
    except (HydraException, OmegaConfBaseException) as error:
        raise InspectError(f"cannot compose the model config from overrides {overrides}: {error}") from error


def build_model(config: Mapping[str, Any], **kwargs: Any) -> nn.Module:
    """The model of ``config["model"]``, built only from repablate's own targets (``checkpoints.build_model``)."""
    if not isinstance(config, Mapping):
        raise InspectError(f"the stored config is a {type(config).__name__}, not a mapping")
    if config.get("model") is None:
        raise InspectError(f"the config has no 'model' entry (keys: {sorted(config)})")
    try:
        return checkpoints.build_model(config["model"], **kwargs)
    except CheckpointError as error:
        raise InspectError(str(error)) from error


def example_input(config: Mapping[str, Any], shape: str | None) -> torch.Tensor:
    """A random batch: of ``shape`` ('1,3,64,64') if given, else (1, data_shape.in_channels, image_size, image_size)."""
    if shape:
        try:
            dims = tuple(int(dim) for dim in shape.split(","))
        except ValueError:
            dims = ()
        if not dims or min(dims) < 1:
            raise InspectError(f"--input-shape {shape!r} is not allowed: give positive sizes such as 1,3,64,64")
        return torch.randn(dims)
    # Checkpoints written before data_shape existed keep these keys in their data config.
    data = config.get("data_shape") or config.get("data") or {}
    if "in_channels" not in data or "image_size" not in data:
        raise InspectError(
            "the config names no data_shape.in_channels and data_shape.image_size: pass --input-shape N,C,H,W"
        )
    size = data["image_size"]
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(1, data["in_channels"], height, width)


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any], bool, str]:
    """Rebuild the model of a Lightning or deploy checkpoint (docs/ARCHITECTURE.md, "Checkpoints").

    Returns (model, config, meant to be deployed, description). A deploy checkpoint whose state_dict holds the
    training form is loaded into a training-form model, so that the audit can name its unfused blocks. Nothing in
    the file runs: it is read weights only, and the model is built from repablate's own targets only.
    """
    try:
        # Weights only, and the model rebuilt from allowed targets only: a checkpoint may come from anywhere.
        checkpoint = checkpoints.read_checkpoint(path)
    except CheckpointError as error:
        raise InspectError(f"--checkpoint {error}") from error
    if not isinstance(checkpoint.get("state_dict"), Mapping):
        raise InspectError(f"{path} is not a repablate checkpoint: it holds no 'state_dict' mapping")
    if checkpoint.get("deploy") is True and "config" in checkpoint:
        state = checkpoint["state_dict"]
        try:
            model = build_model(checkpoint["config"], deploy=True)
            load_state_dict(model, state)
            return model, checkpoint["config"], True, f"deploy checkpoint {path}"
        except RuntimeError as fused_error:
            model = build_model(checkpoint["config"], deploy=False)
            try:
                load_state_dict(model, state)
            except RuntimeError:
                raise InspectError(f"the state_dict of {path} fits the model in neither form: {fused_error}") from None
            return model, checkpoint["config"], True, f"deploy checkpoint {path} (holds the training form)"
    if "repablate_config" in checkpoint:
        model = build_model(checkpoint["repablate_config"])
        state = {
            key[len("model.") :]: value for key, value in checkpoint["state_dict"].items() if key.startswith("model.")
        }
        try:
            load_state_dict(model, state)
        except RuntimeError as error:
            raise InspectError(f"the state_dict of {path} does not fit its configured model: {error}") from error
        return model, checkpoint["repablate_config"], False, f"Lightning checkpoint {path}"
    raise InspectError(
        f"{path} is not a repablate checkpoint: expected a deploy checkpoint ({{'state_dict', 'config', 'deploy': "
        "True}) or a Lightning checkpoint with 'repablate_config'"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options: Hydra overrides (positional) or --checkpoint, and the input shape."""
    parser = argparse.ArgumentParser(
        prog="python -m repablate.inspect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. model=small +variant=repconv")
    parser.add_argument("--checkpoint", type=Path, help="a deploy.pt or a Lightning .ckpt written by a run")
    parser.add_argument("--fuse", action="store_true", help="reparameterize the model, then audit the fused form")
    parser.add_argument("--input-shape", help="N,C,H,W of the audit's input (default: from the config's data)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Audit and print; returns the exit status (0 clean, 1 problems found, 2 bad input)."""
    args = parse_args(argv)
    try:
        if args.checkpoint and args.overrides:
            raise InspectError("give either --checkpoint or config overrides, not both")
        if args.checkpoint:
            model, config, expect_deployed, source = load_checkpoint(args.checkpoint)
        else:
            config = compose_config(args.overrides)
            model, expect_deployed = build_model(config), False
            source = f"config {' '.join(args.overrides) or '(defaults)'}"
        x = example_input(config, args.input_shape)
    except InspectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.fuse:
        model, expect_deployed, source = reparameterize(model), True, f"{source}, fused"
    audit = audit_ops(model, x, expect_deployed=expect_deployed)
    cost = measure_model(model, x, latency=False) if audit.forward_error is None else {}
    print(f"source: {source}; input {tuple(x.shape)}\n")
    if cost:
        print(
            f"params {cost['params']:,}; FLOPs {cost['flops']:,} (2 per multiply-add); memory access "
            f"{cost['mem_bytes']:,} bytes (analytic estimate)\n"
        )
    print(audit.to_markdown())
    if audit.ok:
        return 0
    if expect_deployed and audit.unfused:
        print(
            f"error: {source} is meant to be deployed but {len(audit.unfused)} block(s) are unfused: "
            f"{', '.join(audit.unfused[:5])}{' ...' if len(audit.unfused) > 5 else ''}",
            file=sys.stderr,
        )
    else:
        print(f"error: the audit found {len(audit.problems())} problem(s), listed above", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

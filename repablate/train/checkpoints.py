"""Reading checkpoints without running code from them (docs/ARCHITECTURE.md, "Checkpoints").

A checkpoint is a pickle, and a pickle can call any function while it is read; a stored Hydra config can name any
function as ``_target_``. So ``read_checkpoint`` unpickles weights only (tensors and plain containers), and
``build_model`` rebuilds a model from a stored config only through an allow-list of repablate's own models and
blocks and torch's activation modules, checking every ``_target_`` before anything is built.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

import repablate.models
import repablate.nn


class CheckpointError(ValueError):
    """A checkpoint or stored model config that cannot be read safely; the message names the file or key."""


# Lightning's own checkpoints need no extra globals under weights_only=True: checked on what runs write
# (last.ckpt and best-*.ckpt of classification and detection runs, SGD and AdamW, cosine and warm-up schedules, EMA
# weight averaging), whose pickles name only torch's tensor rebuilders and storages and collections.OrderedDict,
# all allowed by torch by default. So no global is allow-listed: any other one is refused, not trusted.


def read_checkpoint(path: str | PathLike[str]) -> dict[str, Any]:
    """``torch.load(path, map_location="cpu", weights_only=True)``: a deploy.pt or a Lightning .ckpt as a dict.

    Raises CheckpointError, its message starting with the path, for a missing path, a directory, a file that is
    no torch checkpoint (or is damaged), a file whose unpickling would have to call code (refused, never run), and
    a file that holds no dict.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give a checkpoint file such as RUN_DIR/checkpoints/deploy.pt")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        code = _code_the_pickle_would_run(str(error))
        if code is not None:
            raise CheckpointError(
                f"{path} cannot be read as weights only: unpickling it would call {code}; repablate refuses to run "
                "code from files (it reads tensors, numbers, strings and plain containers only)"
            ) from None
        raise _not_a_checkpoint(path, error) from None
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error.strerror or error}") from None
    except Exception as error:  # noqa: BLE001 -- text, empty or truncated files fail in many ways inside torch.load
        raise _not_a_checkpoint(path, error) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def _code_the_pickle_would_run(message: str) -> str | None:
    """What torch's weights-only unpickler refused to call or construct, or None when the file is merely malformed.

    Tied to torch's wording, so an unrecognized refusal is reported as "not a torch checkpoint": still refused.
    """
    named = re.search(r"GLOBAL (\S+)", message)
    if named:
        return named.group(1)
    refused = re.search(r"(reduce for unrecognized function \S+|Can only (?:build|create new object)[^\n]*)", message)
    return f"something outside tensors and plain containers ({refused.group(1)})" if refused else None


def _not_a_checkpoint(path: Path, error: Exception) -> CheckpointError:
    # torch's own wording, shortened to what failed (without its advice to retry with unsafe unpickling).
    message = str(error).strip()
    unpickler = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", message)
    if unpickler:
        detail = unpickler.group(1)
    else:
        detail = message.splitlines()[0].split(". ")[0] if message else ""
    return CheckpointError(
        f"{path} is not a torch checkpoint (a file written by torch.save), or it is damaged "
        f"(torch.load: {' '.join([type(error).__name__, detail[:160]]).strip()})"
    )


# --- rebuilding a model from a stored config -------------------------------------------------------------------------

# torch.nn activation modules a block's ``act`` may be: their arguments are numbers and flags only.
ACTIVATIONS = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
)
# The networks and block factories of repablate.models (not its init schemes, which take a model, not sizes).
MODELS = (
    repablate.models.RepVGGClassifier,
    repablate.models.YOLOv7Tiny,
    repablate.models.small,
    repablate.models.repvgg_a0,
    repablate.models.repvgg_a1,
    repablate.models.repvgg_b0,
    repablate.models.repconv_relu,
)
# Every block repablate.nn exports (its nn.Module classes; not its functions such as reparameterize).
BLOCKS = tuple(
    obj
    for obj in (getattr(repablate.nn, name) for name in repablate.nn.__all__)
    if isinstance(obj, type) and issubclass(obj, nn.Module)
)
# Hydra's control keys a stored model config may use. _args_ (positional arguments), _recursive_ and _convert_ are
# refused: repablate's configs never use them, and every argument a stored config passes is then named by a key.
ALLOWED_CONTROL_KEYS = frozenset({"_target_", "_partial_"})
PLAIN_VALUES = (type(None), bool, int, float, str)


def _allowed_targets() -> dict[str, str]:
    """Every accepted ``_target_`` spelling -> the public name used in messages.

    Both the exported path (repablate.models.small, torch.nn.SiLU) and the defining module's path
    (repablate.models.yolov7_tiny.YOLOv7Tiny, repablate.nn.blocks.RepConv) are accepted, as configs use both.
    Targets are compared as strings, so a refused one is never even imported.
    """
    spellings = {}
    for package, objects in (("repablate.models", MODELS), ("repablate.nn", BLOCKS), ("torch.nn", ACTIVATIONS)):
        for obj in objects:
            public = f"{package}.{obj.__name__}"
            spellings[public] = spellings[f"{obj.__module__}.{obj.__qualname__}"] = public
    return spellings


ALLOWED_TARGETS = _allowed_targets()


def _allowed_summary() -> str:
    by_package: dict[str, list[str]] = {}
    for public in sorted(set(ALLOWED_TARGETS.values())):
        package, name = public.rsplit(".", 1)
        by_package.setdefault(package, []).append(name)
    return "; ".join(f"{package}.{{{', '.join(names)}}}" for package, names in by_package.items())


def _nodes(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(location, value) for ``value`` and everything nested in it, parents first."""
    yield where, value
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _nodes(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _nodes(item, f"{where}[{index}]")


def check_model_config(model_config: Mapping[str, Any], **kwargs: Any) -> None:
    """Raise CheckpointError unless ``model_config`` (with ``kwargs`` merged in, as ``build_model`` would) is
    plain data whose every ``_target_`` is on the allow-list. Imports and builds nothing."""
    if not isinstance(model_config, Mapping):
        raise CheckpointError(f"the model config is a {type(model_config).__name__}, not a mapping")
    if "_target_" not in model_config:
        raise CheckpointError(f"the model config names no _target_ (keys: {sorted(map(str, model_config))})")
    for where, value in _nodes({**model_config, **kwargs}, "model"):
        if isinstance(value, Mapping):
            _check_node(value, where)
        elif isinstance(value, str) and "${" in value:
            # Stored configs are resolved; an interpolation would run OmegaConf resolvers (oc.env, oc.decode, ...).
            raise CheckpointError(
                f"value {value!r} at {where} is an interpolation, which a stored model config may "
                "not hold (stored configs are resolved)"
            )
        elif not isinstance(value, (list, tuple, *PLAIN_VALUES)):
            raise CheckpointError(
                f"the model config holds a {type(value).__name__} at {where}; a stored model "
                "config holds only numbers, strings, booleans, None, lists and mappings"
            )


def _check_node(node: Mapping[Any, Any], where: str) -> None:
    if "_target_" in node:  # the target first: it is what would run
        target = node["_target_"]
        if not isinstance(target, str):
            raise CheckpointError(f"_target_ at {where} must be a string naming an allowed target, not {target!r}")
        if target not in ALLOWED_TARGETS:
            raise CheckpointError(
                f"target {target!r} at {where} is not allowed in a stored model config; allowed targets: "
                f"{_allowed_summary()}"
            )
    if "_partial_" in node and not isinstance(node["_partial_"], bool):
        raise CheckpointError(f"_partial_ at {where} must be true or false, not {node['_partial_']!r}")
    for key in node:
        if not isinstance(key, str):
            raise CheckpointError(f"key {key!r} at {where} is not allowed: keys of a model config are strings")
        if key.startswith("_") and key.endswith("_") and len(key) > 2 and key not in ALLOWED_CONTROL_KEYS:
            raise CheckpointError(
                f"key {key!r} at {where} is not allowed in a stored model config: of Hydra's "
                f"control keys only {sorted(ALLOWED_CONTROL_KEYS)} are"
            )


def build_model(model_config: Mapping[str, Any], **kwargs: Any) -> nn.Module:
    """Rebuild the model a stored config describes (``config["model"]`` of a checkpoint), e.g. ``deploy=True``.

    Every ``_target_`` anywhere in the config (and in ``kwargs``) must be a model of repablate.models, a block of
    repablate.nn or an activation module of torch.nn; all are checked before anything is instantiated, and a
    refusal raises CheckpointError naming the target, where it is, and the allowed set. Failing to build an
    allowed config also raises CheckpointError.
    """
    check_model_config(model_config, **kwargs)
    try:
        model = instantiate(dict(model_config), **kwargs)
    except Exception as error:  # noqa: BLE001 -- any failure to build an allowed config is a bad stored config
        raise CheckpointError(f"cannot build the model from its stored config: {error}") from error
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"the stored model config builds a {type(model).__name__}, not an nn.Module")
    return model

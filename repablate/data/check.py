"""The dataset check: every image opened and every label line read and validated once, before training.

A datamodule that reads files (``data=yolo``, ``shapes_detect``, ``imagefolder``) runs it from ``prepare_data``
and ``setup``, so a bad dataset stops the run before its first step, in the main process, with every bad file
named -- never later, inside a DataLoader worker, for the one batch that reads it. On its own::

    python -m repablate.data.check data=yolo data.data_yaml=/data/coco.yaml
    python -m repablate.data.check data=imagefolder data.root=/data/pets --report dataset_report.json

Problems, each with a policy (``data.check.policy.<problem>``; docs/DATA.md):

- ``unreadable``: an image (or label file) that cannot be read: truncated, not an image, missing.
- ``malformed``: a label line that is not 5 finite numbers ``cls cx cy w h``.
- ``bad_class``: a class that is not an integer in [0, num_classes).
- ``empty_box``: a width or height that is not positive.
- ``out_of_bounds``: a box edge outside the image by more than ``tolerance`` (normalized units).
- ``duplicate``: a line equal to an earlier line of the same file.

Policies: ``error`` (the run stops before training, listing every instance), ``warn-and-drop`` (the image and
all its labels are left out, as YOLOv7 and Ultralytics leave out an image with a corrupt label file), ``fix``
(``out_of_bounds``: the box is clipped to the image; ``duplicate``: one copy is kept). Every problem defaults to
``error``: each one either crashes the run later or makes the metric wrong. Box edges within ``tolerance`` of
the image (1e-3 by default, 0.64 pixels at 640) are clipped without a report: that is rounding, not an error.

What the check read is cached by file path, size and modification time (``.repablate_check*.json`` in the
dataset folder, else under ``$REPABLATE_CACHE``), so a later run reads only files that changed. The cache is
JSON: a cache file in someone else's dataset folder runs no code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from repablate.data.images import probe_image
from repablate.paths import conf_dir
from repablate.results import write_atomically

log = logging.getLogger(__name__)

# problem -> the policies it allows; a whole split with no images, no labels or no objects always fails
PROBLEMS: dict[str, tuple[str, ...]] = {
    "unreadable": ("error", "warn-and-drop"),
    "malformed": ("error", "warn-and-drop"),
    "bad_class": ("error", "warn-and-drop"),
    "empty_box": ("error", "warn-and-drop"),
    "out_of_bounds": ("error", "warn-and-drop", "fix"),
    "duplicate": ("error", "warn-and-drop", "fix"),
}
FIXES = {"out_of_bounds": "clipped", "duplicate": "copy removed"}
HINTS = {"out_of_bounds": "clip the box to the image", "duplicate": "keep one copy"}
DEFAULT_POLICY = dict.fromkeys(PROBLEMS, "error")
TOLERANCE = 1e-3
CACHE_FILE = ".repablate_check.json"
CACHE_VERSION = 1
REPORT_FILE = "dataset_report.json"


class DatasetCheckError(ValueError):
    """The check found problems under policy ``error`` (or a split that cannot be used); the message lists them."""


def default_cache_dir() -> Path:
    """``$REPABLATE_CACHE`` if set, else ``~/.cache/repablate``."""
    return Path(os.environ.get("REPABLATE_CACHE") or Path.home() / ".cache" / "repablate").expanduser()


@dataclass(frozen=True)
class CheckSettings:
    """``data.check``: a policy per problem, the bounds tolerance, and the cache.

    ``cache_dir``: null keeps the cache in the dataset folder (under ``$REPABLATE_CACHE`` when that folder is
    not writable). ``workers``: threads that decode images (null: up to 8, one per CPU).
    """

    policy: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_POLICY))
    tolerance: float = TOLERANCE
    cache: bool = True
    cache_dir: str | None = None
    workers: int | None = None

    @classmethod
    def from_config(cls, check: Mapping[str, Any] | None) -> CheckSettings:
        """Settings from a ``data.check`` mapping; unknown keys, problems or policies fail naming what is allowed."""
        check = dict(check or {})
        unknown = sorted(set(check) - {"policy", "tolerance", "cache", "cache_dir", "workers"})
        if unknown:
            allowed = "policy, tolerance, cache, cache_dir, workers"
            raise ValueError(f"data.check.{unknown[0]} is not allowed: use {allowed}")
        policy = dict(DEFAULT_POLICY)
        for problem, value in dict(check.get("policy") or {}).items():
            if problem not in PROBLEMS:
                raise ValueError(f"data.check.policy.{problem} is not allowed: the problems are {', '.join(PROBLEMS)}")
            if value not in PROBLEMS[problem]:
                raise ValueError(
                    f"data.check.policy.{problem}={value!r} is not allowed: use {' or '.join(PROBLEMS[problem])}"
                )
            policy[problem] = value
        tolerance = check.get("tolerance", TOLERANCE)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 0.5:
            raise ValueError(f"data.check.tolerance={tolerance!r} is not allowed: use a number in [0, 0.5)")
        workers = check.get("workers")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"data.check.workers={workers!r} is not allowed: use a positive integer or null")
        cache_dir = check.get("cache_dir")
        return cls(policy, float(tolerance), bool(check.get("cache", True)), cache_dir and str(cache_dir), workers)

    def cache_file(self, dataset_root: str | os.PathLike, name: str = "") -> Path | None:
        """Where the cache of the dataset at ``dataset_root`` lives (None when the cache is off); ``name`` tells
        apart datasets that share a root (YOLO: the data YAML's name)."""
        if not self.cache:
            return None
        root = Path(os.path.abspath(dataset_root))
        stem = f"{CACHE_FILE.removesuffix('.json')}-{name}" if name else CACHE_FILE.removesuffix(".json")
        if self.cache_dir is None and os.access(root, os.W_OK):
            return root / f"{stem}.json"
        key = hashlib.sha256(f"{root}:{name}".encode()).hexdigest()[:16]
        folder = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir() / "dataset_check"
        return folder / f"{root.name}-{key}.json"


@dataclass
class Entry:
    """One image of a split as listed: its label file (detection) or class index (classification), and where it
    was listed when a list file named it (``train.txt:12``). Paths are kept as strings (a dataset has many)."""

    image: str
    label: str | None = None
    target: int | None = None
    listed_at: str | None = None

    def __post_init__(self) -> None:
        self.image = os.fspath(self.image)
        self.label = None if self.label is None else os.fspath(self.label)


@dataclass(frozen=True)
class Problem:
    """One finding: ``file:line: problem: detail [action]``; action is what its policy did."""

    split: str
    file: str
    line: int | None
    problem: str
    detail: str
    action: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.problem}: {self.detail} [{self.action}]"


@dataclass
class CheckedSplit:
    """The images of a split that passed (paths), with their labels as checked (and fixed): (n, 5) float32 arrays
    of ``cls cx cy w h`` (detection), or class indices (classification)."""

    images: list[str]
    labels: list[np.ndarray] | None = None
    targets: list[int] | None = None


@dataclass
class CheckResult:
    """What the check found: the usable splits, every problem, and the report (``dataset_report.json``)."""

    splits: dict[str, CheckedSplit]
    problems: list[Problem]
    report: dict[str, Any]

    @property
    def failed(self) -> bool:
        return self.report["status"] == "failed"

    def summary(self, max_problems: int = 20) -> str:
        """The summary lines of every split, then the first ``max_problems`` problems."""
        lines = [f"dataset check of {self.report['source']}: {self.report['status']}"]
        for name, counts in self.report["splits"].items():
            lines.append(f"  {name}: {_describe(counts)}")
        lines += [f"  note: {note}" for note in self.report.get("notes", [])]
        if self.report.get("report_path"):
            lines.append(f"  report: {self.report['report_path']}")
        if self.problems and max_problems > 0:
            lines.append(f"problems ({len(self.problems)}; policy action in brackets):")
            lines += [f"  {problem}" for problem in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                where = self.report.get("report_path") or "the report (--report PATH)"
                lines.append(f"  ... and {len(self.problems) - max_problems} more, all listed in {where}")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Raise ``DatasetCheckError`` naming the problems, what to change, and where the full list is."""
        if not self.failed:
            return
        errors = [p for p in self.problems if p.action == "error"]
        counts = Counter(p.problem for p in errors)
        lines = [
            f"dataset check failed for {self.report['source']}: {len(errors)} problem(s) "
            f"({', '.join(f'{k} {n}' for k, n in counts.items())}); the first:"
        ]
        lines += [f"  {problem}" for problem in errors[:10]]
        if self.report.get("report_path"):
            lines.append(f"every problem is listed in {self.report['report_path']}")
        hints = [
            f"data.check.policy.{kind}=fix ({HINTS[kind]})"
            if kind in FIXES
            else f"data.check.policy.{kind}=warn-and-drop (leave the image out)"
            for kind in counts
            if kind in PROBLEMS
        ]
        if hints:
            lines.append(f"correct the files, or choose what to do with them (docs/DATA.md): {', '.join(hints)}")
        raise DatasetCheckError("\n".join(lines))


def _describe(counts: Mapping[str, Any]) -> str:
    text = f"{counts['images']:,} images"
    if "backgrounds" in counts:
        text += f", {counts['backgrounds']:,} backgrounds, {counts['objects']:,} objects"
    text += f", {counts['corrupt']:,} corrupt"
    if counts["problems"]:
        text += f" ({', '.join(f'{k} {n}' for k, n in counts['problems'].items())})"
    if counts["dropped"]:
        text += f"; {counts['dropped']:,} dropped"
    if counts["fixed"]:
        text += f"; {counts['fixed']:,} labels fixed"
    skipped = {k: n for k, n in counts.get("skipped", {}).items() if n}
    if skipped:
        text += f"; skipped: {', '.join(f'{n:,} {k}' for k, n in skipped.items())}"
    return text


# --- label files --------------------------------------------------------------------------------------------


def parse_labels(text: str) -> list[list]:
    """The lines of a YOLO label file: ``[line, cls, cx, cy, w, h]`` for a line of 5 finite numbers, else
    ``[line, reason]``. Blank lines are skipped; lines count from 1."""
    rows: list[list] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            hint = " (a polygon? only boxes 'cls cx cy w h' are read)" if len(fields) > 6 and len(fields) % 2 else ""
            rows.append([number, f"{len(fields)} fields in {line.strip()!r}, expected 5: cls cx cy w h{hint}"])
            continue
        try:
            values = [float(value) for value in fields]
        except ValueError:
            rows.append([number, f"{line.strip()!r} is not 5 numbers: cls cx cy w h"])
            continue
        if not all(math.isfinite(value) for value in values):
            rows.append([number, f"{line.strip()!r} is not finite"])
            continue
        rows.append([number, *values])
    return rows


def _read_label_file(path: str) -> list[list] | str:
    try:
        with open(path, encoding="utf-8-sig") as stream:
            return parse_labels(stream.read())
    except (OSError, UnicodeDecodeError) as error:
        return f"cannot read the label file: {error}"


# --- the cache ----------------------------------------------------------------------------------------------


def _stat(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


def _load_cache(path: Path | None) -> dict[str, dict[str, list]]:
    empty: dict[str, dict[str, list]] = {"images": {}, "labels": {}}
    if path is None or not path.is_file():
        return empty
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return empty
    if not isinstance(cache, dict) or cache.get("version") != CACHE_VERSION:
        return empty
    return {key: cache.get(key) if isinstance(cache.get(key), dict) else {} for key in empty}


def write_json_atomically(path: str | os.PathLike, value: Any, indent: int | None = 1) -> Path:
    """Strict JSON through repablate's one atomic writer (a reader finds the old file or the new one); the cache
    is written without indentation (``indent=None``), which keeps a 10,000-image index small and fast."""
    text = json.dumps(value, indent=indent, separators=None if indent else (",", ":"), allow_nan=False)
    return write_atomically(path, text)


# --- the check ----------------------------------------------------------------------------------------------


def _probe(path: str) -> list:
    try:
        width, height = probe_image(path)
    except Exception as error:  # noqa: BLE001 -- whatever Pillow raises, the image is unreadable: name it
        return [None, None, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__]
    return [width, height, None]


class _Judge:
    """Applies the policies to one image and its label lines."""

    def __init__(self, settings: CheckSettings, num_classes: int | None):
        self.policy, self.tolerance, self.num_classes = settings.policy, settings.tolerance, num_classes
        self.within_tolerance = 0

    def action(self, problem: str) -> str:
        policy = self.policy.get(problem, "error")
        return {"error": "error", "warn-and-drop": "image dropped"}.get(policy) or FIXES[problem]

    def labels(self, split: str, file: str, rows: list[list], problems: list[Problem]) -> list[tuple]:
        """The label rows that survive (fixed where the policy fixes); every problem appended to ``problems``."""
        kept, seen = [], {}

        def report(line: int, problem: str, detail: str) -> str:
            action = self.action(problem)
            problems.append(Problem(split, file, line, problem, detail, action))
            return action

        for row in rows:
            line = row[0]
            if len(row) == 2:
                report(line, "malformed", row[1])
                continue
            cls, cx, cy, w, h = row[1:]
            if cls != int(cls) or cls < 0 or (self.num_classes is not None and cls >= self.num_classes):
                allowed = f"[0, {self.num_classes})" if self.num_classes is not None else "0 or more"
                report(line, "bad_class", f"class {cls:g} is not an integer in {allowed}")
                continue
            if w <= 0 or h <= 0:
                report(line, "empty_box", f"width {w:g}, height {h:g}: a box needs a positive size")
                continue
            x1, x2, y1, y2 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
            excess = max(-x1, x2 - 1, -y1, y2 - 1)
            if excess > self.tolerance:
                detail = (
                    f"box x {x1:.4g}..{x2:.4g}, y {y1:.4g}..{y2:.4g} leaves the image [0, 1] by {excess:.4g} "
                    f"(tolerance {self.tolerance:g})"
                )
                if report(line, "out_of_bounds", detail) != "clipped":
                    continue
            if excess > 0:
                if excess <= self.tolerance:
                    self.within_tolerance += 1
                x1, x2, y1, y2 = max(x1, 0.0), min(x2, 1.0), max(y1, 0.0), min(y2, 1.0)
                cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
                if w <= 0 or h <= 0:
                    report(line, "empty_box", "nothing of the box is left inside the image once clipped")
                    continue
            key = (cls, cx, cy, w, h)
            if key in seen:
                report(line, "duplicate", f"repeats line {seen[key]}")
                continue
            seen[key] = line
            kept.append(key)
        return kept


def _read_files(
    splits: Mapping[str, Sequence[Entry]], label_stats: Mapping[str, tuple[int, int] | None], cache_file, workers: int
) -> tuple[dict[str, list], dict[str, list], int, int]:
    """What the files hold, from the cache where a file's size and mtime still match, else read now:
    ``images[path] = [size, mtime_ns, width, height, error]``, ``labels[path] = [size, mtime_ns, rows or error]``
    (label files that do not exist are left out). Returns them and how many images were decoded, labels read."""
    cache = _load_cache(cache_file)
    images: dict[str, list] = {}
    to_probe: list[str] = []
    for entries in splits.values():
        for entry in entries:
            if entry.image in images:
                continue
            stat, cached = _stat(entry.image), cache["images"].get(entry.image)
            if stat is None:
                images[entry.image] = [None, None, None, None, "the image does not exist"]
            elif cached and cached[:2] == list(stat):
                images[entry.image] = cached
            else:
                images[entry.image] = [*stat, None, None, None]
                to_probe.append(entry.image)
    if workers > 1 and len(to_probe) > 64:  # Pillow decodes without the GIL
        with ThreadPoolExecutor(workers) as pool:
            probed = list(pool.map(_probe, to_probe, chunksize=64))
    else:
        probed = [_probe(path) for path in to_probe]
    for path, result in zip(to_probe, probed, strict=True):
        images[path][2:] = result
    labels: dict[str, list] = {}
    read = 0
    for path, stat in label_stats.items():
        cached = cache["labels"].get(path)
        if stat is None:
            continue
        if cached and cached[:2] == list(stat):
            labels[path] = cached
        else:
            labels[path] = [*stat, _read_label_file(path)]
            read += 1
    if cache_file is not None and (images != cache["images"] or labels != cache["labels"]):
        try:
            cache = {"version": CACHE_VERSION, "images": images, "labels": labels}
            write_json_atomically(cache_file, cache, indent=None)
        except OSError as error:
            log.warning("dataset check: the cache %s was not written: %s", cache_file, error)
    return images, labels, len(to_probe), read


def _check_split(
    name: str, entries: Sequence[Entry], images: Mapping[str, list], labels: Mapping[str, list], judge: _Judge
) -> tuple[CheckedSplit, Counter, list[Problem]]:
    """One split's usable images with their checked labels, its counts, and its problems."""
    detection = any(entry.label is not None for entry in entries)
    kept, arrays, targets, problems = [], [], [], []
    counts: Counter = Counter()
    for entry in entries:
        found: list[Problem] = []
        error = images[entry.image][4]
        if error is not None:
            at = f" (listed at {entry.listed_at})" if entry.listed_at else ""
            found.append(Problem(name, entry.image, None, "unreadable", error + at, judge.action("unreadable")))
        rows: list[tuple] = []
        label = labels.get(entry.label) if entry.label is not None else None
        if label is not None and isinstance(label[2], str):
            found.append(Problem(name, entry.label, None, "unreadable", label[2], judge.action("unreadable")))
        elif label is not None:
            rows = judge.labels(name, entry.label, label[2], found)
        problems += found
        counts["corrupt"] += bool(found)
        actions = {problem.action for problem in found}
        if "error" in actions:
            continue
        if "image dropped" in actions:
            counts["dropped"] += 1
            continue
        counts["fixed"] += sum(problem.action in FIXES.values() for problem in found)
        kept.append(entry.image)
        if detection:
            arrays.append(np.asarray(rows, dtype=np.float32).reshape(-1, 5))
            counts["objects"] += len(rows)
            counts["backgrounds"] += not rows
        else:
            targets.append(entry.target)
    split = CheckedSplit(kept, arrays, None) if detection else CheckedSplit(kept, None, targets)
    return split, counts, problems


def check_dataset(
    splits: Mapping[str, Sequence[Entry]],
    *,
    source: str,
    settings: CheckSettings,
    num_classes: int | None = None,
    cache_file: Path | None = None,
    report_path: str | os.PathLike | None = None,
    skipped: Mapping[str, Mapping[str, int]] | None = None,
    optional_labels: Sequence[str] = (),
) -> CheckResult:
    """Check every image (and label file, for entries that have one) of ``splits``; apply ``settings.policy``.

    Returns the usable splits, the problems and the report, which is also written to ``report_path`` if given.
    Does not raise for problems: call ``CheckResult.raise_if_failed``. ``skipped`` counts, per split, files the
    listing passed over (hidden, not images). A split in ``optional_labels`` whose images have no label file at
    all is left out, with a note (COCO's test-dev, in YOLOv7's data YAML, has none), instead of failing.
    """
    started = time.perf_counter()
    detection = any(entry.label is not None for entries in splits.values() for entry in entries)
    label_stats = {e.label: _stat(e.label) for entries in splits.values() for e in entries if e.label is not None}
    has_labels = {name: any(label_stats.get(e.label) for e in entries) for name, entries in splits.items()}
    notes, usable = [], {}
    for name, entries in splits.items():
        if detection and entries and not has_labels[name] and name in optional_labels:
            notes.append(f"{name}: none of its {len(entries):,} images has a label file; left out")
            continue
        usable[name] = entries
    workers = settings.workers or min(8, os.cpu_count() or 1)
    images, labels, decoded, read = _read_files(usable, label_stats, cache_file, workers)

    judge = _Judge(settings, num_classes)
    problems: list[Problem] = []
    checked: dict[str, CheckedSplit] = {}
    split_counts: dict[str, dict[str, Any]] = {}
    for name, entries in usable.items():
        checked[name], counts, found = _check_split(name, entries, images, labels, judge)
        problems += found
        if not entries:
            fatal = ("no_images", "lists no images")
        elif detection and not has_labels[name]:
            fatal = (
                "no_labels",
                f"none of its {len(entries):,} images has a label file (the first would be {entries[0].label}, "
                "by YOLO's images -> labels rule): a split of background only cannot be trained on or evaluated",
            )
        elif not checked[name].images and not any(problem.action == "error" for problem in found):
            fatal = ("no_images", "every image was dropped by the policies")
        elif detection and checked[name].images and not counts["objects"]:
            fatal = ("no_objects", "its label files hold no object: a split of background only is no use")
        else:
            fatal = None
        if fatal:
            found.append(Problem(name, source, None, fatal[0], f"split {name!r}: {fatal[1]}", "error"))
            problems.append(found[-1])
        split_counts[name] = {
            "images": len(entries),
            "kept": len(checked[name].images),
            **({"backgrounds": counts["backgrounds"], "objects": counts["objects"]} if detection else {}),
            "corrupt": counts["corrupt"],
            "dropped": counts["dropped"],
            "fixed": counts["fixed"],
            "problems": dict(Counter(problem.problem for problem in found)),
            "skipped": dict((skipped or {}).get(name, {})),
        }

    total: dict[str, Any] = {key: 0 for key in ("images", "kept", "corrupt", "dropped", "fixed")}
    if detection:
        total.update(backgrounds=0, objects=0)
    for counts in split_counts.values():
        for key in total:
            total[key] += counts[key]
    total["problems"] = dict(sum((Counter(c["problems"]) for c in split_counts.values()), Counter()))
    total["skipped"] = dict(sum((Counter(c["skipped"]) for c in split_counts.values()), Counter()))
    total["within_tolerance"] = judge.within_tolerance
    report = {
        "source": source,
        "status": "failed" if any(problem.action == "error" for problem in problems) else "passed",
        "summary": total,
        "splits": split_counts,
        "notes": notes,
        "policy": dict(settings.policy),
        "tolerance": settings.tolerance,
        "problems": [
            {
                "split": p.split,
                "file": p.file,
                "line": p.line,
                "problem": p.problem,
                "detail": p.detail,
                "action": p.action,
            }  # fmt: skip
            for p in problems
        ],
        "cache": {
            "file": str(cache_file) if cache_file else None,
            "images_decoded": decoded,
            "label_files_read": read,
        },
        "seconds": round(time.perf_counter() - started, 3),
        "report_path": str(report_path) if report_path else None,
    }
    if report_path:
        write_json_atomically(report_path, report)
    return CheckResult(checked, problems, report)


def log_result(result: CheckResult, logger: logging.Logger = log) -> None:
    """The summary at INFO; problems that did not stop the run (dropped, fixed) at WARNING, the first 10."""
    logger.info("%s", result.summary(max_problems=0))
    handled = [problem for problem in result.problems if problem.action != "error"]
    for problem in handled[:10]:
        logger.warning("dataset check: %s", problem)
    if len(handled) > 10:
        where = result.report.get("report_path") or "the report"
        logger.warning("dataset check: ... and %d more dropped or fixed, listed in %s", len(handled) - 10, where)


# --- python -m repablate.data.check ---------------------------------------------------------------------------


def build_datamodule(overrides: list[str], report: str | None):
    """The datamodule of the run config composed from conf/ with ``overrides`` (only ``data`` is instantiated);
    ``data.report_path`` set to ``report``, and a YOLO class count taken from the data YAML when not given."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf, open_dict

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        if "report_path" in cfg.data:
            cfg.data.report_path = report
        if "num_classes" in cfg.data and OmegaConf.is_missing(cfg.data_shape, "num_classes"):
            cfg.data.num_classes = None
    return instantiate(cfg.data)


def main(argv: list[str] | None = None) -> int:
    """Check the dataset of a data config; 0 passed, 1 problems under policy error, 2 bad input."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    parser = argparse.ArgumentParser(
        prog="python -m repablate.data.check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. data=yolo data.data_yaml=x.yaml")
    parser.add_argument("--report", help=f"write the whole report (every problem) here, e.g. {REPORT_FILE}")
    parser.add_argument("--max-problems", type=int, default=50, help="problems to print (default 50)")
    args = parser.parse_args(argv)
    try:
        datamodule = build_datamodule(args.overrides, args.report)
        if not hasattr(datamodule, "check_data"):
            print(f"{type(datamodule).__name__} reads no image files: nothing to check")
            return 0
        result = datamodule.check_data()
    except (HydraException, OmegaConfBaseException, OSError, ValueError) as error:
        if isinstance(error, DatasetCheckError):
            print(f"error: {error}", file=sys.stderr)
            return 1
        cause = error.__cause__ if isinstance(error, HydraException) and error.__cause__ else error
        print(f"error: {cause}", file=sys.stderr)
        return 2
    print(result.summary(max_problems=args.max_problems))
    return 1 if result.failed else 0


if __name__ == "__main__":
    # Run the importable module's main, not this copy's: the datamodules raise repablate.data.check's classes.
    from repablate.data.check import main as check_main

    sys.exit(check_main())


class CheckedData:
    """For a datamodule whose ``check_data()`` runs the dataset check (once, cached on the instance):
    ``verified()`` logs its summary once and raises DatasetCheckError when it failed, and ``prepare_data`` runs
    it in the main process, so a bad dataset stops the run before the first step, never inside a worker."""

    _logged = False

    def check_data(self) -> CheckResult:
        raise NotImplementedError

    def verified(self) -> CheckResult:
        """The check's result, its summary logged once; raises DatasetCheckError when it failed."""
        result = self.check_data()
        if not self._logged:
            log_result(result)
            self._logged = True
        result.raise_if_failed()
        return result

    def prepare_data(self) -> None:
        self.verified()

"""Detection data in YOLO format: a data YAML naming the train/val/test images and the class names, and one
``cls cx cy w h`` line per object (normalized to the image) in a label file found by the images -> labels rule.

``YoloDataModule`` reads any such dataset from a local path, following the data YAML conventions of YOLOv7 and
Ultralytics (``read_data_yaml``); ``ShapesDetectDataModule`` first writes one, the embedded default: synthetic
shapes (classes by shape and colour, varied sizes, some overlap), generated deterministically from a seed and
cached on first use, so nothing is downloaded. Both run the dataset check (repablate.data.check) before
training and serve the labels it verified.
Batches are ``(images, targets)``: images (B, 3, S, S) in [0, 1], letterboxed to S; targets (N, 6) rows of
``batch_index, class, cx, cy, w, h`` in pixels of the letterboxed image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from repablate.data.check import (
    CheckedData,
    CheckedSplit,
    CheckResult,
    CheckSettings,
    Entry,
    check_dataset,
    default_cache_dir,
)
from repablate.data.images import is_image, open_image, walk_files

PAD_VALUE = 114  # YOLO's grey letterbox border
SPLITS = ("train", "val", "test")

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "blue": (40, 90, 230), "green": (40, 190, 60)}


def _existing(candidates: list[Path]) -> Path | None:
    return next((Path(os.path.normpath(path)) for path in candidates if path.exists()), None)


def read_data_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YOLO data YAML into ``{"root": Path, "train": [Path, ...], "val": [...], "test": [...], "names":
    [str, ...]}``, the conventions of YOLOv7 and Ultralytics:

    - ``path:`` the dataset root, absolute or relative to the YAML's folder (else, if only that exists, to the
      working directory, Ultralytics' reading); without it, the YAML's folder (Ultralytics).
    - ``train``, ``val`` (required), ``test`` (optional): an image folder, a ``.txt`` list of image paths, or a
      list of these; relative to the root, else, if only that exists, to the working directory (as YOLOv7's
      ``./coco/train2017.txt`` is read).
    - ``names``: a list, or an index -> name mapping; or only ``nc`` (names become ``class0``, ...); both must agree.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data yaml {str(path)!r} does not exist: give the path of a YOLO data YAML")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"data yaml {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(spec, dict):
        raise ValueError(f"data yaml {str(path)!r} is not a mapping of keys (train, val, names, ...)")
    missing = [key for key in ("train", "val") if not spec.get(key)]
    if "names" not in spec and "nc" not in spec:
        missing.append("names")
    if missing:
        raise ValueError(f"data yaml {str(path)!r} lacks {missing}: it needs train, val (images) and names")
    folder = path.parent.absolute()
    root = folder
    if spec.get("path"):
        given = Path(str(spec["path"])).expanduser()
        root = given if given.is_absolute() else (_existing([folder / given, Path.cwd() / given]) or folder / given)
    result: dict[str, Any] = {"root": Path(os.path.normpath(root)), "names": _names(spec, path)}
    for split in SPLITS:
        value = spec.get(split) or []
        entries = value if isinstance(value, list) else [value]
        if not all(isinstance(entry, str) for entry in entries):
            raise ValueError(
                f"data yaml {str(path)!r}: {split}={value!r} is not allowed: give an image folder, a .txt list of "
                "image paths, or a list of these"
            )
        result[split] = [_resolve(entry, result["root"], split, path) for entry in entries]
    return result


def _names(spec: Mapping[str, Any], path: Path) -> list[str]:
    names = spec.get("names")
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"data yaml {str(path)!r}: the keys of names must be 0 to {len(names) - 1}")
        names = [names[i] for i in range(len(names))]
    elif names is None:
        names = [f"class{i}" for i in range(int(spec["nc"]))]
    elif not isinstance(names, list):
        raise ValueError(f"data yaml {str(path)!r}: names must be a list or an index -> name mapping")
    if "nc" in spec and spec["nc"] != len(names):
        raise ValueError(f"data yaml {str(path)!r}: nc={spec['nc']} but names lists {len(names)} classes")
    return [str(name) for name in names]


def _resolve(entry: str, root: Path, split: str, data_yaml: Path) -> Path:
    given = Path(entry).expanduser()
    candidates = [given] if given.is_absolute() else [root / given, Path.cwd() / given]
    found = _existing(candidates)
    if found is None:
        raise FileNotFoundError(
            f"data yaml {str(data_yaml)!r}: {split}={entry!r} does not exist (looked for "
            f"{' and '.join(repr(str(c)) for c in candidates)}); give an image folder or a .txt list of images"
        )
    return found


IMAGES, LABELS = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"


def label_file(image: str) -> str | None:
    """YOLO's images -> labels rule as Ultralytics applies it: the last ``images`` folder of the path becomes
    ``labels`` and the suffix ``.txt`` (YOLOv7 replaces the first; they differ only for paths with two).
    None when the path has no ``images`` folder."""
    head, found, tail = image.rpartition(IMAGES)
    return f"{head}{LABELS}{os.path.splitext(tail)[0]}.txt" if found else None


def label_path(image: str | os.PathLike) -> Path:
    """``label_file`` as a Path; raises ValueError when the rule cannot apply."""
    found = label_file(os.fspath(image))
    if found is None:
        raise ValueError(f"{image} has no 'images' folder in its path")
    return Path(found)


def _listed_path(line: str, folder: Path) -> str:
    """An image path of a list file: absolute as is; relative to the list's folder (YOLOv7 and Ultralytics read
    ``./x`` so; they read ``x`` from the working directory, which is used here only when that file exists)."""
    given = os.path.expanduser(line)
    if os.path.isabs(given):
        return os.path.normpath(given)
    here = os.path.normpath(os.path.join(folder, given))
    if line.startswith("./") or os.path.exists(here) or not os.path.exists(given):
        return here
    return os.path.abspath(given)


def list_images(sources: list[Path]) -> tuple[list[Entry], dict[str, int]]:
    """The images of a split's sources (folders searched recursively, list files read line by line), sorted,
    each with its label file; and counts of what was skipped: ``hidden`` (names starting with . or _),
    ``not_image`` (other suffixes), ``listed_twice``. Raises ValueError when the images -> labels rule cannot
    apply (no ``images`` folder in an image's path)."""
    found: dict[str, str | None] = {}
    skipped: Counter = Counter()

    def add(image: str, listed_at: str | None) -> None:
        if image in found:
            skipped["listed_twice"] += 1
        else:
            found[image] = listed_at

    for source in sources:
        if source.is_dir():
            for path, hidden in walk_files(source):
                if hidden:
                    skipped["hidden"] += 1
                elif not is_image(path):
                    skipped["not_image"] += 1
                else:
                    add(path, None)
            continue
        for number, line in enumerate(source.read_text(encoding="utf-8-sig").splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            if not is_image(line):
                skipped["not_image"] += 1
                continue
            add(_listed_path(line, source.parent), f"{source}:{number}")
    entries = [Entry(image, label_file(image), listed_at=found[image]) for image in sorted(found)]
    unmatched = [entry for entry in entries if entry.label is None]
    if unmatched:
        first = unmatched[0]
        raise ValueError(
            f"cannot find the labels of {len(unmatched):,} image(s), e.g. {first.image}"
            + (f" (listed at {first.listed_at})" if first.listed_at else "")
            + ": YOLO finds an image's label file by replacing the last 'images' folder of its path with "
            "'labels' (.../images/train/a.jpg -> .../labels/train/a.txt), and this path has no 'images' folder; "
            "keep the images under a folder named images/, their labels under labels/ beside it"
        )
    return entries, dict(skipped)


def letterbox(image: Image.Image, size: int) -> tuple[Image.Image, float, tuple[int, int]]:
    """Resize keeping the aspect ratio so the longer side is ``size``, centre on a grey square.

    Returns the square image, the scale and the (left, top) padding, to map boxes: x' = x * scale + left.
    """
    width, height = image.size
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = (size - new_w) // 2, (size - new_h) // 2
    canvas = Image.new("RGB", (size, size), (PAD_VALUE,) * 3)
    canvas.paste(image, (left, top))
    return canvas, scale, (left, top)


class YoloDataset(Dataset):
    """The checked images of one split with their checked labels, letterboxed to ``image_size``; optionally
    augmented with a horizontal flip and colour jitter (torchvision.transforms.v2, boxes flipped along).

    Labels come from the check (``CheckedSplit``), so a worker never parses a label file; an image that cannot
    be read now (changed since the check) raises an OSError naming it."""

    def __init__(
        self,
        split: CheckedSplit,
        image_size: int,
        augment: bool = False,
        flip: float = 0.5,
        brightness: float = 0.4,
        saturation: float = 0.5,
        hue: float = 0.015,
    ):
        if split.labels is None or len(split.labels) != len(split.images):
            raise ValueError("a detection split needs one label array per image")
        self.images, self.labels, self.image_size = [os.fspath(p) for p in split.images], split.labels, image_size
        self.augment = (
            v2.Compose(
                [
                    v2.RandomHorizontalFlip(flip),
                    v2.ColorJitter(brightness=brightness, saturation=saturation, hue=hue),
                ]
            )
            if augment
            else None
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = open_image(self.images[index])
        labels = self.labels[index]
        width, height = image.size
        image, scale, (left, top) = letterbox(image, self.image_size)
        boxes = labels[:, 1:] * np.array([width, height, width, height], dtype=np.float32) * scale
        boxes[:, :2] += np.array([left, top], dtype=np.float32)
        pixels = tv_tensors.Image(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        boxes = tv_tensors.BoundingBoxes(
            torch.from_numpy(boxes), format="CXCYWH", canvas_size=(self.image_size, self.image_size)
        )
        if self.augment is not None:
            pixels, boxes = self.augment(pixels, boxes)
        targets = torch.cat((torch.from_numpy(labels[:, :1]), boxes.as_subclass(torch.Tensor)), 1)
        return pixels.as_subclass(torch.Tensor).float() / 255, targets


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images; concatenate targets with the image's index in front: (N, 6)."""
    images, targets = zip(*batch, strict=True)
    indexed = [torch.cat((torch.full((t.shape[0], 1), float(i)), t), 1) for i, t in enumerate(targets)]
    return torch.stack(images), torch.cat(indexed).reshape(-1, 6)


class YoloDataModule(CheckedData, pl.LightningDataModule):
    """A YOLO-format dataset from a local data YAML (see ``read_data_yaml``), checked before training.

    Args:
        data_yaml: path of the data YAML.
        num_classes: must equal the number of names in the YAML (None: take it from the YAML).
        image_size: side of the letterboxed square inputs; a multiple of 32 (the coarsest stride).
        batch_size, num_workers, seed: of the loaders (seed: of the training shuffle).
        augment: flip and colour jitter on the training set; ``flip``, ``brightness``, ``saturation``, ``hue``
          are their strengths.
        check: the dataset check's settings (``CheckSettings.from_config``: ``policy``, ``tolerance``, ``cache``).
        report_path: where to write the check's report (``dataset_report.json``); None writes none.

    The test split is the YAML's ``test`` when it has labels, else the validation split.
    """

    in_channels = 3  # RGB

    def __init__(
        self,
        data_yaml: str | Path,
        num_classes: int | None = None,
        image_size: int = 640,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        flip: float = 0.5,
        brightness: float = 0.4,
        saturation: float = 0.5,
        hue: float = 0.015,
        check: Mapping[str, Any] | None = None,
        report_path: str | Path | None = None,
    ):
        super().__init__()
        if not isinstance(image_size, int) or image_size < 32 or image_size % 32:
            raise ValueError(f"image_size={image_size!r} is not allowed: use a positive multiple of 32")
        self.data_yaml = data_yaml
        self.num_classes, self.image_size = num_classes, image_size
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.augment = dict(flip=flip, brightness=brightness, saturation=saturation, hue=hue) if augment else None
        self.check_settings = CheckSettings.from_config(check)
        self.report_path = report_path
        self.class_names: list[str] = []
        self._checked: CheckResult | None = None

    def check_data(self) -> CheckResult:
        """Run the dataset check once (cached on disk, so later runs read only changed files); its result.
        Raises for a data YAML that cannot be read or does not match ``num_classes``, not for bad files."""
        if self._checked is None:
            spec = read_data_yaml(self.data_yaml)
            names = spec["names"]
            if self.num_classes is not None and len(names) != self.num_classes:
                raise ValueError(
                    f"num_classes={self.num_classes} does not match {self.data_yaml}: it names {len(names)} "
                    f"classes {names[:10]}; set data_shape.num_classes={len(names)}"
                )
            self.num_classes, self.class_names = len(names), names
            splits, skipped = {}, {}
            for split in SPLITS:
                if spec[split]:
                    splits[split], skipped[split] = list_images(spec[split])
            self._checked = check_dataset(
                splits,
                source=str(Path(self.data_yaml).absolute()),
                settings=self.check_settings,
                num_classes=len(names),
                cache_file=self.check_settings.cache_file(spec["root"], Path(self.data_yaml).stem),
                report_path=self.report_path,
                skipped=skipped,
                optional_labels=("test",),
            )
        return self._checked

    def setup(self, stage: str | None = None) -> None:
        splits = self.verified().splits
        augment = self.augment or {}
        self.train_set = YoloDataset(splits["train"], self.image_size, bool(augment), **augment)
        self.val_set = YoloDataset(splits["val"], self.image_size)
        self.test_set = YoloDataset(splits["test"], self.image_size) if "test" in splits else self.val_set

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], colour) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each row of b."""
    inter_w = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    inter_h = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = inter_w * inter_h
    area = lambda box: (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def render_shapes_image(
    rng: np.random.Generator,
    size: int,
    shapes: list[str],
    colours: list[str],
    max_objects: int,
    min_frac: float,
    max_frac: float,
    max_overlap: float,
):
    """One image and its YOLO label rows: 1..max_objects shapes on a noisy random background, each of side
    ``min_frac``..``max_frac`` of the image; a new shape overlapping an earlier one by IoU > max_overlap is
    redrawn elsewhere (up to 20 tries), so overlaps occur but no object is hidden."""
    background = rng.integers(0, 120, 3)
    pixels = np.clip(background + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    boxes, rows = np.zeros((0, 4)), []
    for _ in range(rng.integers(1, max_objects + 1)):
        for _ in range(20):
            side = rng.uniform(min_frac, max_frac) * size
            w, h = side * rng.uniform(0.75, 1.25), side * rng.uniform(0.75, 1.25)
            x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            box = np.array([x0, y0, x0 + w, y0 + h])
            if not len(boxes) or _box_iou(box, boxes).max() <= max_overlap:
                break
        else:
            continue
        shape, colour = rng.integers(len(shapes)), rng.integers(len(colours))
        tint = np.clip(np.array(COLOURS[colours[colour]]) + rng.integers(-25, 26, 3), 0, 255)
        _draw_shape(draw, shapes[shape], tuple(box), tuple(int(c) for c in tint))
        boxes = np.vstack((boxes, box))
        cls = shape * len(colours) + colour
        rows.append((cls, (x0 + w / 2) / size, (y0 + h / 2) / size, w / size, h / size))
    return image, rows


def make_shapes_dataset(
    root: str | Path,
    num_train: int = 2000,
    num_val: int = 200,
    image_size: int = 128,
    seed: int = 0,
    shapes: tuple[str, ...] = ("circle", "square", "triangle"),
    colours: tuple[str, ...] = ("red", "blue"),
    max_objects: int = 3,
    min_frac: float = 0.15,
    max_frac: float = 0.45,
    max_overlap: float = 0.3,
) -> Path:
    """Write (once) the synthetic shapes set in YOLO format under ``root``; returns its data YAML's path.

    Classes are ``<colour> <shape>`` (class = shape index * len(colours) + colour index). The folder name is a
    hash of every argument, so different settings never share a cache entry; the set is built in a temporary
    folder and renamed into place, so an interrupted or concurrent build never leaves a partial set behind.
    """
    unknown = [s for s in shapes if s not in SHAPES] + [c for c in colours if c not in COLOURS]
    if unknown or not shapes or not colours:
        raise ValueError(f"shapes={shapes!r}, colours={colours!r}: allowed shapes {SHAPES}, colours {list(COLOURS)}")
    if not 0 < min_frac <= max_frac < 1:
        raise ValueError(f"min_frac={min_frac}, max_frac={max_frac}: need 0 < min_frac <= max_frac < 1")
    settings = dict(
        num_train=num_train,
        num_val=num_val,
        image_size=image_size,
        seed=seed,
        shapes=list(shapes),
        colours=list(colours),
        max_objects=max_objects,
        min_frac=min_frac,
        max_frac=max_frac,
        max_overlap=max_overlap,
        version=1,
    )
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    final = Path(root).expanduser() / f"shapes_detect-{key}"
    data_yaml = final / "data.yaml"
    if data_yaml.exists():
        return data_yaml
    final.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        rng = np.random.default_rng(seed)
        for split, count in (("train", num_train), ("val", num_val)):
            (building / "images" / split).mkdir(parents=True)
            (building / "labels" / split).mkdir(parents=True)
            for i in range(count):
                image, rows = render_shapes_image(
                    rng, image_size, list(shapes), list(colours), max_objects, min_frac, max_frac, max_overlap
                )
                image.save(building / "images" / split / f"{i:06d}.png")
                lines = [f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}" for c, x, y, w, h in rows]
                (building / "labels" / split / f"{i:06d}.txt").write_text("\n".join(lines) + "\n")
        names = [f"{colour} {shape}" for shape in shapes for colour in colours]
        spec = {"path": ".", "train": "images/train", "val": "images/val", "names": names, "settings": settings}
        (building / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        try:
            building.rename(final)
        except OSError:  # someone else finished the same set first; theirs is identical
            if not data_yaml.exists():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return data_yaml


class ShapesDetectDataModule(YoloDataModule):
    """The embedded default: the synthetic shapes set (see ``make_shapes_dataset``), built under ``cache_dir``
    (default ``default_cache_dir()``) on first use. ``num_classes`` must be len(shapes) * len(colours)."""

    def __init__(
        self,
        num_classes: int = 6,
        image_size: int = 64,
        num_train: int = 2000,
        num_val: int = 200,
        dataset_seed: int = 0,
        shapes: tuple[str, ...] = ("circle", "square", "triangle"),
        colours: tuple[str, ...] = ("red", "blue"),
        max_objects: int = 3,
        min_frac: float = 0.15,
        max_frac: float = 0.45,
        cache_dir: str | None = None,
        **loader_args,
    ):
        self.generator_args = dict(
            num_train=num_train,
            num_val=num_val,
            image_size=image_size,
            seed=dataset_seed,
            shapes=tuple(shapes),
            colours=tuple(colours),
            max_objects=max_objects,
            min_frac=min_frac,
            max_frac=max_frac,
        )
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        super().__init__(data_yaml="", num_classes=num_classes, image_size=image_size, **loader_args)
        if num_classes != len(shapes) * len(colours):
            raise ValueError(
                f"num_classes={num_classes} is not allowed: the shapes set has len(shapes) * len(colours) = "
                f"{len(shapes) * len(colours)} classes"
            )

    def check_data(self) -> CheckResult:
        """Build the set (once; later only a lookup), then check it as any YOLO dataset."""
        if self._checked is None:
            self.data_yaml = make_shapes_dataset(self.cache_dir, **self.generator_args)
        return super().check_data()

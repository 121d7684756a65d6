"""Detection data in YOLO format: a data YAML naming train/val image folders and class names, one
``cls cx cy w h`` line per object (normalized to the image) in ``labels/.../<image>.txt`` beside ``images/...``.

``YoloDataModule`` reads any such dataset from a local path; ``ShapesDetectDataModule`` first writes one, the
embedded default: synthetic shapes (classes by shape and colour, varied sizes, some overlap), generated
deterministically from a seed and cached on first use, so nothing is downloaded.
Batches are ``(images, targets)``: images (B, 3, S, S) in [0, 1], letterboxed to S; targets (N, 6) rows of
``batch_index, class, cx, cy, w, h`` in pixels of the letterboxed image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PAD_VALUE = 114  # YOLO's grey letterbox border

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "blue": (40, 90, 230), "green": (40, 190, 60)}


def default_cache_dir() -> Path:
    """``$REPABLATE_CACHE`` if set, else ``~/.cache/repablate``."""
    return Path(os.environ.get("REPABLATE_CACHE", Path.home() / ".cache" / "repablate")).expanduser()


def read_data_yaml(path: str | Path) -> dict:
    """Parse a YOLO data YAML into ``{"train": Path, "val": Path, "names": [str, ...]}``.

    ``train``/``val`` are image folders, relative to ``path:`` in the file if given, else to the YAML's folder;
    ``names`` is a list or an index -> name mapping.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data yaml {str(path)!r} does not exist: give the path of a YOLO data YAML")
    spec = yaml.safe_load(path.read_text()) or {}
    missing = [key for key in ("train", "val", "names") if key not in spec]
    if missing:
        raise ValueError(f"data yaml {str(path)!r} lacks {missing}: it needs train, val (image folders) and names")
    root = (path.parent / spec.get("path", ".")).resolve()
    names = spec["names"]
    if isinstance(names, dict):
        names = [names[i] for i in sorted(names)]
    return {"train": root / spec["train"], "val": root / spec["val"], "names": [str(n) for n in names]}


def label_path(image: Path) -> Path:
    """YOLO's convention: the last ``images`` folder in the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    index = len(parts) - 1 - parts[::-1].index("images")
    parts[index] = "labels"
    return Path(*parts).with_suffix(".txt")


def read_labels(path: Path, num_classes: int) -> np.ndarray:
    """(n, 5) float array of ``cls cx cy w h`` (normalized); empty when the file does not exist."""
    if not path.exists():
        return np.zeros((0, 5), dtype=np.float32)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        values = line.split()
        try:
            row = [float(v) for v in values]
        except ValueError:
            row = []
        if len(row) != 5 or not 0 <= row[0] < num_classes or row[0] != int(row[0]) or min(row[1:]) < 0:
            raise ValueError(
                f"{path}:{number}: {line!r} is not a label: expected 'cls cx cy w h' with an integer class in "
                f"[0, {num_classes}) and non-negative normalized box values"
            )
        rows.append(row)
    return np.asarray(rows, dtype=np.float32).reshape(-1, 5)


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


class YoloImageFolder(Dataset):
    """Images of one folder with their YOLO labels, letterboxed to ``image_size``; optionally augmented with a
    horizontal flip and colour jitter (torchvision.transforms.v2, boxes flipped along)."""

    def __init__(
        self,
        folder: str | Path,
        num_classes: int,
        image_size: int,
        augment: bool = False,
        flip: float = 0.5,
        brightness: float = 0.4,
        saturation: float = 0.5,
        hue: float = 0.015,
    ):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
        self.images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise ValueError(f"image folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.num_classes, self.image_size = num_classes, image_size
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
        image = Image.open(self.images[index]).convert("RGB")
        labels = read_labels(label_path(self.images[index]), self.num_classes)
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


class YoloDataModule(pl.LightningDataModule):
    """A YOLO-format dataset from a local data YAML (see ``read_data_yaml``).

    Args:
        data_yaml: path of the data YAML.
        num_classes: must equal the number of names in the YAML.
        image_size: side of the letterboxed square inputs; a multiple of 32 (the coarsest stride).
        batch_size, num_workers, seed: of the loaders (seed: of the training shuffle).
        augment: flip and colour jitter on the training set; ``flip``, ``brightness``, ``saturation``, ``hue``
          are their strengths.
    """

    in_channels = 3  # RGB

    def __init__(
        self,
        data_yaml: str | Path,
        num_classes: int,
        image_size: int = 640,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        flip: float = 0.5,
        brightness: float = 0.4,
        saturation: float = 0.5,
        hue: float = 0.015,
    ):
        super().__init__()
        if not isinstance(image_size, int) or image_size < 32 or image_size % 32:
            raise ValueError(f"image_size={image_size!r} is not allowed: use a positive multiple of 32")
        self.data_yaml = data_yaml
        self.num_classes, self.image_size = num_classes, image_size
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.augment = dict(flip=flip, brightness=brightness, saturation=saturation, hue=hue) if augment else None
        self.class_names: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        spec = read_data_yaml(self.data_yaml)
        if len(spec["names"]) != self.num_classes:
            raise ValueError(
                f"num_classes={self.num_classes} does not match {self.data_yaml}: it names "
                f"{len(spec['names'])} classes {spec['names'][:10]}; set data_shape.num_classes={len(spec['names'])}"
            )
        self.class_names = spec["names"]
        augment = self.augment or {}
        self.train_set = YoloImageFolder(spec["train"], self.num_classes, self.image_size, bool(augment), **augment)
        self.val_set = YoloImageFolder(spec["val"], self.num_classes, self.image_size)

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
        return self._loader(self.val_set, shuffle=False)


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

    def prepare_data(self) -> None:
        make_shapes_dataset(self.cache_dir, **self.generator_args)

    def setup(self, stage: str | None = None) -> None:
        self.data_yaml = make_shapes_dataset(self.cache_dir, **self.generator_args)  # cached: only a lookup
        super().setup(stage)

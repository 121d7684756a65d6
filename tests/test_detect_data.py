"""Detection data: the YOLO-format reader (letterbox, flip, label checks) and the cached synthetic shapes set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from repablate.data.detection import (
    ShapesDetectDataModule,
    YoloDataModule,
    YoloImageFolder,
    make_shapes_dataset,
    read_data_yaml,
)


def _tiny_yolo_set(root: Path, label_line: str = "1 0.5 0.5 0.2 0.4") -> Path:
    """One 100x50 image with one labelled box, as train and val; returns the data YAML."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        Image.new("RGB", (100, 50), (10, 200, 30)).save(root / "images" / split / "a.png")
        (root / "labels" / split / "a.txt").write_text(label_line + "\n")
    data_yaml = root / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": {0: "x", 1: "y"}}))
    return data_yaml


def test_letterbox_maps_boxes_into_the_padded_square(tmp_path):
    data = YoloDataModule(_tiny_yolo_set(tmp_path), num_classes=2, image_size=64, augment=False)
    data.setup()
    images, targets = next(iter(data.val_dataloader()))
    assert images.shape == (1, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    # 100x50 -> 64x32, padded by 16 rows above and below: centre (50, 25) -> (32, 16 + 16), size 20x20 -> 12.8.
    assert torch.allclose(targets, torch.tensor([[0, 1, 32.0, 32.0, 12.8, 12.8]]), atol=1e-4)
    assert torch.allclose(images[0, :, 0, 32], torch.full((3,), 114 / 255))  # grey border
    assert data.class_names == ["x", "y"]


def test_flip_moves_boxes_with_the_image(tmp_path):
    folder = YoloImageFolder(
        _tiny_yolo_set(tmp_path, "0 0.25 0.5 0.1 0.2").parent / "images" / "train",
        num_classes=2,
        image_size=64,
        augment=True,
        flip=1.0,
        brightness=0,
        saturation=0,
        hue=0,
    )
    plain = YoloImageFolder(tmp_path / "images" / "train", num_classes=2, image_size=64)
    (flipped, flipped_targets), (image, targets) = folder[0], plain[0]
    assert torch.equal(flipped, image.flip(-1))
    assert torch.allclose(flipped_targets[:, 1], 64 - targets[:, 1])
    assert torch.equal(flipped_targets[:, 2:], targets[:, 2:])


@pytest.mark.parametrize("line", ["5 0.5 0.5 0.1 0.1", "1 0.5 0.5 0.1", "a b c d e", "0 -0.1 0.5 0.1 0.1"])
def test_bad_label_lines_are_named(tmp_path, line):
    data = YoloDataModule(_tiny_yolo_set(tmp_path, line), num_classes=2, image_size=64)
    data.setup()
    with pytest.raises(ValueError, match=r"a\.txt:1: .*cls cx cy w h"):
        data.val_set[0]


def test_bad_configuration_is_refused(tmp_path):
    data_yaml = _tiny_yolo_set(tmp_path)
    with pytest.raises(ValueError, match="num_classes=3 does not match"):
        YoloDataModule(data_yaml, num_classes=3, image_size=64).setup()
    with pytest.raises(ValueError, match="image_size=50"):
        YoloDataModule(data_yaml, num_classes=2, image_size=50)
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        read_data_yaml(tmp_path / "nowhere.yaml")
    (tmp_path / "bad.yaml").write_text("train: images/train\n")
    with pytest.raises(ValueError, match=r"\['val', 'names'\]"):
        read_data_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="num_classes=5"):
        ShapesDetectDataModule(num_classes=5, cache_dir=str(tmp_path))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_set_is_deterministic_cached_and_valid(tmp_path):
    args = dict(num_train=12, num_val=4, image_size=64, seed=3)
    first = make_shapes_dataset(tmp_path / "a", **args)
    again = make_shapes_dataset(tmp_path / "b", **args)
    assert _files(first.parent) == _files(again.parent)  # same seed, same bytes
    other = make_shapes_dataset(tmp_path / "a", **{**args, "seed": 4})
    assert other.parent != first.parent and _files(other.parent) != _files(first.parent)
    stamp = first.stat().st_mtime_ns
    assert make_shapes_dataset(tmp_path / "a", **args) == first and first.stat().st_mtime_ns == stamp  # cached
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no build leftovers

    spec = read_data_yaml(first)
    assert spec["names"] == ["red circle", "blue circle", "red square", "blue square", "red triangle", "blue triangle"]
    rows = np.concatenate([np.loadtxt(p, ndmin=2) for p in sorted((first.parent / "labels").rglob("*.txt"))])
    assert set(rows[:, 0].astype(int)) <= set(range(6)) and len(rows) >= 16  # >= 1 object per image
    left, right = rows[:, 1] - rows[:, 3] / 2, rows[:, 1] + rows[:, 3] / 2
    assert left.min() >= -1e-6 and right.max() <= 1 + 1e-6
    assert rows[:, 3].min() >= 0.15 * 0.75 - 1e-6  # smallest side: min_frac x the 0.75 aspect jitter


def test_shapes_datamodule_builds_in_its_cache_dir(tmp_path):
    data = ShapesDetectDataModule(num_train=8, num_val=4, batch_size=4, cache_dir=str(tmp_path))
    data.prepare_data()
    data.setup()
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 64, 64) and targets.shape[1] == 6
    assert set(targets[:, 0].tolist()) <= {0, 1, 2, 3}
    assert len(list(tmp_path.glob("shapes_detect-*/images/train/*.png"))) == 8

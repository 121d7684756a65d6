"""Detection data: the YOLO-format reader (data YAML conventions of YOLOv7 and Ultralytics, letterbox, flip, the
dataset check before training) and the cached synthetic shapes set. Fixture datasets are built small per test."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from repablate.data.check import CheckedSplit, DatasetCheckError
from repablate.data.detection import (
    ShapesDetectDataModule,
    YoloDataModule,
    YoloDataset,
    label_path,
    list_images,
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


def _image(path: Path, label: str | None = "0 0.5 0.5 0.2 0.2", size=(40, 30)) -> Path:
    """An image at ``path`` (any suffix Pillow writes) and, if given, its label file by the images -> labels rule."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    if label is not None:
        label_file = label_path(path)
        label_file.parent.mkdir(parents=True, exist_ok=True)
        label_file.write_text(label + "\n")
    return path


def _yaml(file: Path, **spec) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(yaml.safe_dump(spec))
    return file


def _set_up(data_yaml: Path, **kwargs) -> YoloDataModule:
    data = YoloDataModule(data_yaml, num_classes=kwargs.pop("num_classes", 2), image_size=64, augment=False, **kwargs)
    data.prepare_data()
    data.setup()
    return data


def test_letterbox_maps_boxes_into_the_padded_square(tmp_path):
    data = _set_up(_tiny_yolo_set(tmp_path))
    images, targets = next(iter(data.val_dataloader()))
    assert images.shape == (1, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    # 100x50 -> 64x32, padded by 16 rows above and below: centre (50, 25) -> (32, 16 + 16), size 20x20 -> 12.8.
    assert torch.allclose(targets, torch.tensor([[0, 1, 32.0, 32.0, 12.8, 12.8]]), atol=1e-4)
    assert torch.allclose(images[0, :, 0, 32], torch.full((3,), 114 / 255))  # grey border
    assert data.class_names == ["x", "y"]


def test_flip_moves_boxes_with_the_image(tmp_path):
    image = _image(tmp_path / "images" / "a.png", size=(100, 50))
    split = CheckedSplit([image], [np.array([[0, 0.25, 0.5, 0.1, 0.2]], dtype=np.float32)])
    flipping = YoloDataset(split, image_size=64, augment=True, flip=1.0, brightness=0, saturation=0, hue=0)
    (flipped, flipped_targets), (plain, targets) = flipping[0], YoloDataset(split, image_size=64)[0]
    assert torch.equal(flipped, plain.flip(-1))
    assert torch.allclose(flipped_targets[:, 1], 64 - targets[:, 1])
    assert torch.equal(flipped_targets[:, 2:], targets[:, 2:])


@pytest.mark.parametrize(
    "line, problem",
    [
        ("5 0.5 0.5 0.1 0.1", "bad_class"),
        ("1 0.5 0.5 0.1", "malformed"),
        ("a b c d e", "malformed"),
        ("0 -0.1 0.5 0.1 0.1", "out_of_bounds"),
        ("0 1.3 0.5 1.6 0.2", "out_of_bounds"),
        ("0 0.5 0.5 0 0.1", "empty_box"),
    ],
)
def test_bad_label_lines_stop_the_run_in_prepare_data_named(tmp_path, line, problem):
    data = YoloDataModule(_tiny_yolo_set(tmp_path, line), num_classes=2, image_size=64, report_path=tmp_path / "r.json")
    with pytest.raises(DatasetCheckError, match=rf"labels/train/a\.txt:1: {problem}: "):
        data.prepare_data()
    assert str(tmp_path / "r.json") in str(pytest.raises(DatasetCheckError, data.setup).value)


def test_a_bad_file_in_a_batch_never_read_still_stops_the_run_before_the_first_step(tmp_path):
    """limit_train_batches would never read the bad file; the check reads it before training."""
    for i in range(8):
        _image(tmp_path / "images" / "train" / f"{i}.png", "0 0.5 0.5 0.2 0.2" if i != 7 else "0 0.5 0.5 0.2 0.2\n" * 2)
    _image(tmp_path / "images" / "val" / "0.png")
    data_yaml = _yaml(tmp_path / "data.yaml", train="images/train", val="images/val", names=["a"])

    class Module(pl.LightningModule):
        steps = 0

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, index):
            Module.steps += 1
            return self.layer(batch[0].mean().reshape(1, 1)).sum()

        def validation_step(self, batch, index):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        max_steps=1, limit_train_batches=1, limit_val_batches=0, logger=False, enable_checkpointing=False
    )
    data = YoloDataModule(data_yaml, num_classes=1, image_size=32, batch_size=2, augment=False)
    with pytest.raises(DatasetCheckError, match=r"labels/train/7\.txt:2: duplicate"):
        trainer.fit(Module(), datamodule=data)
    assert Module.steps == 0


def test_a_dataset_without_labels_fails_instead_of_training_on_background(tmp_path):
    for split in ("train", "val"):
        _image(tmp_path / "images" / split / "a.png", label=None)
    data_yaml = _yaml(tmp_path / "data.yaml", train="images/train", val="images/val", names=["a", "b"])
    with pytest.raises(
        DatasetCheckError,
        match=r"no_labels: split 'train': none of its 1 images has a label file .*labels/train/a\.txt",
    ):
        _set_up(data_yaml)


def test_bad_configuration_is_refused(tmp_path):
    data_yaml = _tiny_yolo_set(tmp_path)
    with pytest.raises(ValueError, match="num_classes=3 does not match"):
        YoloDataModule(data_yaml, num_classes=3, image_size=64).setup()
    with pytest.raises(ValueError, match="image_size=50"):
        YoloDataModule(data_yaml, num_classes=2, image_size=50)
    with pytest.raises(ValueError, match="bad_class='fix' is not allowed"):
        YoloDataModule(data_yaml, num_classes=2, check={"policy": {"bad_class": "fix"}})
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        read_data_yaml(tmp_path / "nowhere.yaml")
    with pytest.raises(ValueError, match=r"\['val', 'names'\]"):
        read_data_yaml(_yaml(tmp_path / "bad.yaml", train="images/train"))
    with pytest.raises(ValueError, match="nc=3 but names lists 2"):
        read_data_yaml(_yaml(tmp_path / "nc.yaml", train="images/train", val="images/val", nc=3, names=["a", "b"]))
    with pytest.raises(ValueError, match="train=3 is not allowed"):
        read_data_yaml(_yaml(tmp_path / "int.yaml", train=3, val="images/val", names=["a"]))
    with pytest.raises(FileNotFoundError, match="val='images/nothing' does not exist"):
        read_data_yaml(_yaml(tmp_path / "gone.yaml", train="images/train", val="images/nothing", names=["a"]))
    with pytest.raises(ValueError, match="keys of names must be 0 to 1"):
        read_data_yaml(_yaml(tmp_path / "keys.yaml", train="images/train", val="images/val", names={1: "a", 2: "b"}))


# --- the data YAML conventions of YOLOv7 and Ultralytics ------------------------------------------------------


def test_a_txt_list_of_images_as_in_yolov7s_coco_yaml(tmp_path, monkeypatch):
    root = tmp_path / "coco"
    for i in range(3):
        _image(root / "images" / "train2017" / f"{i}.jpg")
    _image(root / "images" / "val2017" / "v.jpg")
    # ./x is read from the list's folder (YOLOv7 and Ultralytics); x too, when it is there; absolute as is.
    (root / "train2017.txt").write_text(
        f"./images/train2017/0.jpg\nimages/train2017/1.jpg\n{root / 'images/train2017/2.jpg'}\n\nnotes.md\n"
    )
    (root / "val2017.txt").write_text("./images/val2017/v.jpg\n")
    # YOLOv7's data/coco.yaml has no path: and names its lists relative to the working directory.
    spec = dict(train="./coco/train2017.txt", val="./coco/val2017.txt", nc=2, names=["a", "b"])
    data_yaml = _yaml(tmp_path / "yolov7" / "data" / "coco.yaml", **spec)
    monkeypatch.chdir(tmp_path)
    data = _set_up(data_yaml)
    assert [Path(p).name for p in data.train_set.images] == ["0.jpg", "1.jpg", "2.jpg"]
    assert data.check_data().report["splits"]["train"]["skipped"] == {"not_image": 1}


def test_a_list_of_folders_and_lists_under_a_path_root(tmp_path):
    root = tmp_path / "datasets" / "set"
    _image(root / "images" / "a" / "0.png")
    _image(root / "images" / "b" / "1.bmp")
    _image(root / "images" / "c" / "2.png")
    _image(root / "images" / "val" / "v.png")
    (root / "extra.txt").write_text("./images/c/2.png\n./images/a/0.png\n")  # 0.png listed twice
    train = ["images/a", "images/b", "extra.txt"]
    data_yaml = _yaml(
        tmp_path / "cfg" / "set.yaml", path="../datasets/set", train=train, val="images/val", names={0: "a", 1: "b"}
    )
    spec = read_data_yaml(data_yaml)
    assert spec["root"] == root and spec["train"] == [root / "images/a", root / "images/b", root / "extra.txt"]
    assert spec["test"] == [] and spec["names"] == ["a", "b"]
    data = _set_up(data_yaml)
    assert [Path(p).name for p in data.train_set.images] == ["0.png", "1.bmp", "2.png"]
    assert data.check_data().report["splits"]["train"]["skipped"] == {"listed_twice": 1}


def test_labels_by_the_images_to_labels_rule_and_a_clear_error_when_it_cannot_apply(tmp_path):
    assert label_path(Path("/d/images/x/images/train/a.jpg")) == Path("/d/images/x/labels/train/a.txt")  # the last
    _image(tmp_path / "pics" / "a.png", label=None)
    with pytest.raises(ValueError, match=r"labels of 1 image\(s\), e\.g\. .*pics/a\.png.*no 'images' folder"):
        list_images([tmp_path / "pics"])
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'pics' / 'a.png'}\n")
    with pytest.raises(ValueError, match=r"listed at .*list\.txt:1"):
        list_images([tmp_path / "list.txt"])


def test_a_listed_image_that_does_not_exist_is_named_with_its_list_line(tmp_path):
    _image(tmp_path / "images" / "train" / "a.png")
    _image(tmp_path / "images" / "val" / "v.png")
    (tmp_path / "train.txt").write_text("./images/train/a.png\n./images/train/gone.png\n")
    data_yaml = _yaml(tmp_path / "data.yaml", train="train.txt", val="images/val", names=["a"])
    with pytest.raises(DatasetCheckError, match=r"gone\.png: unreadable: the image does not exist \(listed at .*:2\)"):
        _set_up(data_yaml, num_classes=1)


def test_tif_bmp_webp_read_hidden_files_skipped(tmp_path):
    for suffix in (".tif", ".tiff", ".bmp", ".webp", ".JPG"):
        _image(tmp_path / "images" / "train" / f"a{suffix}", label=f"0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.{len(suffix)} 0.1")
    (tmp_path / "images" / "train" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata
    _image(tmp_path / "images" / "train" / "__MACOSX" / "b.png")
    _image(tmp_path / "images" / "train" / ".ipynb_checkpoints" / "c.png")
    _image(tmp_path / "images" / "val" / "v.png")
    data = _set_up(_yaml(tmp_path / "data.yaml", train="images/train", val="images/val", names=["a", "b"]))
    assert sorted(Path(p).suffix for p in data.train_set.images) == [".JPG", ".bmp", ".tif", ".tiff", ".webp"]
    assert data.check_data().report["splits"]["train"]["skipped"] == {"hidden": 3}
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape[1:] == (3, 64, 64) and targets.shape[1] == 6


def test_exif_rotated_photos_are_read_upright_so_their_boxes_line_up(tmp_path):
    stored = np.zeros((50, 100, 3), dtype=np.uint8)
    stored[:, :50] = (255, 0, 0)  # shown turned 90 degrees clockwise: the stored left half is the top
    stored[:, 50:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        Image.fromarray(stored).save(tmp_path / "images" / split / "a.jpg", exif=exif.tobytes(), quality=95)
        (tmp_path / "labels" / split).mkdir(parents=True)
        (tmp_path / "labels" / split / "a.txt").write_text("0 0.5 0.25 0.4 0.2\n")  # the red top half, as shown
    data = _set_up(_yaml(tmp_path / "data.yaml", train="images/train", val="images/val", names=["red"]), num_classes=1)
    image, targets = data.val_set[0]
    # shown 50x100 -> 32x64, 16 columns of border on each side; box centre (25, 25) -> (16 + 16, 16)
    assert torch.allclose(targets, torch.tensor([[0, 32.0, 16.0, 12.8, 12.8]]), atol=1e-4)
    assert image[0, 16, 32] > 0.8 and image[2, 48, 32] > 0.8  # red above, blue below, where the boxes say


def test_a_labelled_test_split_is_used_and_an_unlabelled_one_left_out(tmp_path):
    for split in ("train", "val", "test"):
        _image(tmp_path / "images" / split / f"{split}.png")
    _image(tmp_path / "images" / "test-dev" / "t.png", label=None)  # as COCO's test-dev: no labels
    spec = dict(train="images/train", val="images/val", names=["a"])
    data = _set_up(_yaml(tmp_path / "a.yaml", **spec, test="images/test"), num_classes=1)
    assert [Path(p).name for p in data.test_set.images] == ["test.png"]
    data = _set_up(_yaml(tmp_path / "b.yaml", **spec, test="images/test-dev"), num_classes=1)
    assert data.test_set is data.val_set and "test: none of its 1 images" in data.check_data().report["notes"][0]


def test_an_image_changed_after_the_check_fails_naming_the_file(tmp_path):
    data = _set_up(_tiny_yolo_set(tmp_path))
    (tmp_path / "images" / "val" / "a.png").write_bytes(b"garbage")
    with pytest.raises(OSError, match=r"images/val/a\.png: cannot read the image"):
        data.val_set[0]


# --- the synthetic shapes set --------------------------------------------------------------------------------


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


def test_shapes_datamodule_builds_in_its_cache_dir_and_passes_the_check(tmp_path):
    data = ShapesDetectDataModule(num_train=8, num_val=4, batch_size=4, cache_dir=str(tmp_path))
    data.prepare_data()
    data.setup()
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 64, 64) and targets.shape[1] == 6
    assert set(targets[:, 0].tolist()) <= {0, 1, 2, 3}
    assert len(list(tmp_path.glob("shapes_detect-*/images/train/*.png"))) == 8
    report = data.check_data().report
    assert report["status"] == "passed" and report["summary"]["images"] == 12 and not report["problems"]
    assert len(list(tmp_path.glob("shapes_detect-*/.repablate_check-data.json"))) == 1

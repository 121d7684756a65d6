"""Datasets users bring: CIFAR-10/100 (torchvision's files, downloaded only when asked) and any ImageFolder.

Both are decoded once into memory as uint8 tensors and served a batch at a time (repablate.data.tensors);
per batch they are converted to float, standardized and, for training, augmented with a random padded crop
and a horizontal flip. ImageFolder images are checked first (repablate.data.check: every file opened, the unreadable
named), then resized (shorter side) and centre-cropped to ``image_size`` when loaded, so memory is about
3 * image_size**2 bytes per image: this suits folders up to a few hundred thousand small images, not ImageNet.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity

from repablate.data.check import (
    CheckedData,
    CheckedSplit,
    CheckResult,
    CheckSettings,
    DatasetCheckError,
    Entry,
    check_dataset,
)
from repablate.data.images import IMAGE_SUFFIXES, is_hidden, is_image, open_image, walk_files
from repablate.data.tensors import InMemoryDataModule, TensorBatches, check_positive_int, check_seed, derived_seed

CIFAR = {"cifar10": (datasets.CIFAR10, 10), "cifar100": (datasets.CIFAR100, 100)}


class Standardize:
    """uint8 batch -> float, standardized per channel; with ``augment``, random padded crop and flip first."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, augment: bool = False, pad: int = 4):
        self.mean, self.std = mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)
        self.augment, self.pad = augment, pad

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.mean.device != images.device:  # data held on the training device: move the statistics once
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        images = images.float().div_(255)
        if self.augment:
            images = random_crop_flip(images, self.pad, generator)
        return (images - self.mean) / self.std


def random_crop_flip(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Each image zero-padded by ``pad``, cropped back to its size at a random offset, flipped with p = 0.5."""
    n, c, h, w = images.shape
    padded = F.pad(images, [pad] * 4)
    # Drawn on the CPU generator whatever the images' device: the same crops on every device.
    top = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(images.device)
    left = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(images.device)
    flip = (torch.rand(n, 1, generator=generator) < 0.5).to(images.device)
    columns = torch.arange(w, device=images.device)
    columns = torch.where(flip, w - 1 - columns, columns) + left  # n x w
    rows = top + torch.arange(h, device=images.device)  # n x h
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], columns[:, None, None, :]]


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images (n x c x h x w) scaled to [0, 1], in chunks to bound memory."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for lo in range(0, len(images), chunk):
        part = images[lo : lo + chunk].double().div_(255)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    return mean.float(), (squares / count - mean.square()).clamp_min(1e-12).sqrt().float()


def _split_off(n: int, held_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[held_out:].sort().values, order[:held_out].sort().values


class CIFARDataModule(InMemoryDataModule):
    """CIFAR-10 or CIFAR-100 (``name="cifar10"`` or ``"cifar100"``) from a local ``root`` (torchvision's layout);
    ``download=True`` fetches it.

    Train and val come from the official training set (``val_size`` images held out, fixed by ``split_seed``),
    test is the official test set. Standardized with the training split's per-channel statistics.
    """

    in_channels = 3
    image_size = 32

    def __init__(
        self,
        root: str,
        name: str = "cifar10",
        download: bool = False,
        batch_size: int = 128,
        seed: int = 0,
        val_size: int = 5000,
        split_seed: int = 0,
        augment: bool = True,
        eval_batch_size: int | None = None,
        device_resident: bool = True,
    ):
        super().__init__(batch_size, seed, eval_batch_size, device_resident)
        if name not in CIFAR:
            raise ValueError(f"name={name!r} is not allowed: use one of {sorted(CIFAR)}")
        check_positive_int(val_size=val_size)
        check_seed(split_seed=split_seed)
        self.dataset_class, self.num_classes = CIFAR[name]
        self.root, self.name, self.download = Path(root).expanduser(), name, download
        self.val_size, self.split_seed, self.augment = val_size, split_seed, augment
        if not download and not (self.root / self.dataset_class.base_folder).is_dir():
            raise FileNotFoundError(self._missing_message())

    def _missing_message(self) -> str:
        return (
            f"{self.name} not found under root={str(self.root)!r} (expected the folder "
            f"{self.dataset_class.base_folder!r} there): point data.root at it, or set data.download=true "
            "to download it"
        )

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self.dataset_class(str(self.root), train=train, download=True)

    def _files(self) -> list[tuple[str, str]]:
        """(file name, MD5) of every file torchvision reads: the batches and the metadata."""
        meta = self.dataset_class.meta
        return [*self.dataset_class.train_list, *self.dataset_class.test_list, [meta["filename"], meta["md5"]]]

    def integrity_error(self) -> Exception | None:
        """What is wrong with the files, told apart: some missing (FileNotFoundError), or present but failing
        torchvision's MD5 checksums (DatasetCheckError); None when all are there and intact."""
        folder = self.root / self.dataset_class.base_folder
        missing = [name for name, _ in self._files() if not (folder / name).is_file()]
        if missing:
            return FileNotFoundError(
                f"{self.name} not found under root={str(self.root)!r}: the folder {str(folder)!r} lacks {missing}; "
                "point data.root at a complete copy, or set data.download=true to download it"
            )
        corrupt = [name for name, md5 in self._files() if not check_integrity(str(folder / name), md5)]
        if corrupt:
            return DatasetCheckError(
                f"{self.name} under root={str(self.root)!r} is corrupt: {corrupt} fail torchvision's MD5 checksum "
                f"(a partial download or extraction?); delete the folder {str(folder)!r} and set data.download=true "
                "to download it again"
            )
        return None

    def check_data(self) -> CheckResult:
        """Every file present and matching torchvision's checksums; raises the ``integrity_error`` otherwise."""
        error = self.integrity_error()
        if error is not None:
            raise error
        files = len(self._files())
        report = {"source": str(self.root / self.dataset_class.base_folder), "status": "passed", "splits": {}}
        report["notes"] = [f"{files} files present, every one matching torchvision's MD5 checksum"]
        return CheckResult({}, [], report)

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            dataset = self.dataset_class(str(self.root), train=train, download=self.download)
        except RuntimeError as error:  # torchvision's "Dataset not found or corrupted": say which
            raise (self.integrity_error() or FileNotFoundError(self._missing_message())) from error
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(dataset.targets)

    def build_splits(self) -> dict[str, TensorBatches]:
        images, labels = self._load(train=True)
        if self.val_size >= len(labels):
            raise ValueError(f"val_size={self.val_size} is not allowed: the training set has {len(labels)} images")
        train, val = _split_off(len(labels), self.val_size, derived_seed(self.split_seed))
        test_images, test_labels = self._load(train=False)
        mean, std = channel_stats(images[train])
        return {
            "train": TensorBatches(images[train], labels[train], Standardize(mean, std, self.augment), self.seed),
            "val": TensorBatches(images[val], labels[val], Standardize(mean, std)),
            "test": TensorBatches(test_images, test_labels, Standardize(mean, std)),
        }


SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid"), "test": ("test",)}


def class_folders(folder: Path) -> list[str]:
    """The class sub-folders of ``folder``, sorted (torchvision's class order), hidden ones (``__MACOSX``,
    ``.ipynb_checkpoints``: names starting with . or _) left out."""
    return sorted(path.name for path in folder.iterdir() if path.is_dir() and not is_hidden(path.name))


class ImageFolderDataModule(CheckedData, InMemoryDataModule):
    """Any folder of class sub-folders (torchvision's ImageFolder layout), as RGB ``image_size`` x ``image_size``.

    Layout: either ``root/<class>/<image>``, split into train/val/test by ``val_fraction`` and
    ``test_fraction`` (fixed by ``split_seed``), or ``root/train/<class>/...`` with optional ``root/val`` (or
    ``root/valid``) and ``root/test`` folders used as given, missing ones carved out of train by the same
    fractions. Folders and files whose names start with . or _ are ignored. Every image is opened by the dataset
    check first (``check``: its settings, ``policy.unreadable`` error or warn-and-drop; ``report_path``: where
    its report goes).
    """

    in_channels = 3

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        augment: bool = True,
        eval_batch_size: int | None = None,
        device_resident: bool = True,
        check: Mapping[str, Any] | None = None,
        report_path: str | Path | None = None,
    ):
        super().__init__(batch_size, seed, eval_batch_size, device_resident)
        check_positive_int(image_size=image_size)
        check_seed(split_seed=split_seed)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name}={value!r} is not allowed: it must be a number in [0, 1)")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"ImageFolder root={str(self.root)!r} does not exist: point data.root at a folder of class "
                "sub-folders (ImageFolder data is never downloaded)"
            )
        self.folders = self._split_folders()
        self.classes = class_folders(self.folders["train"])
        if not self.classes:
            raise FileNotFoundError(
                f"ImageFolder root={str(self.root)!r} holds no class folders in {str(self.folders['train'])!r}: "
                "expected <class>/<image> (or train/<class>/<image>)"
            )
        self.num_classes, self.image_size = len(self.classes), image_size
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.split_seed, self.augment = split_seed, augment
        self.check_settings = CheckSettings.from_config(check)
        self.report_path = report_path
        self._checked: CheckResult | None = None

    def _split_folders(self) -> dict[str, Path]:
        root = self.root.absolute()  # the check names files by absolute path
        if not (root / "train").is_dir():
            return {"train": root}
        folders = {}
        for split, names in SPLIT_FOLDERS.items():
            present = [root / name for name in names if (root / name).is_dir()]
            if len(present) > 1:
                raise ValueError(
                    f"ImageFolder root={str(self.root)!r} has both {' and '.join(p.name + '/' for p in present)}: "
                    f"keep one {split} folder"
                )
            if present:
                folders[split] = present[0]
        return folders

    def check_data(self) -> CheckResult:
        """List every split's images and open each once (cached on disk, so later runs open only changed files);
        the check's result. Raises for a layout that cannot be used (classes differ, an empty class)."""
        if self._checked is not None:
            return self._checked
        splits, skipped = {}, {}
        for split, folder in self.folders.items():
            classes = class_folders(folder)
            if classes != self.classes:
                raise ValueError(f"the classes of {str(folder)!r} ({classes}) differ from train's ({self.classes})")
            counts: Counter = Counter(hidden=sum(p.is_dir() and is_hidden(p.name) for p in folder.iterdir()))
            entries = []
            for target, name in enumerate(classes):
                before = len(entries)
                for path, hidden in walk_files(folder / name):
                    if hidden:
                        counts["hidden"] += 1
                    elif not is_image(path):
                        counts["not_image"] += 1
                    else:
                        entries.append(Entry(path, target=target))
                if split == "train" and len(entries) == before:
                    raise ValueError(
                        f"class folder {str(folder / name)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}): every "
                        "class needs training images"
                    )
            splits[split], skipped[split] = entries, dict(counts)
        self._checked = check_dataset(
            splits,
            source=str(self.root.absolute()),
            settings=self.check_settings,
            num_classes=self.num_classes,
            cache_file=self.check_settings.cache_file(self.root),
            report_path=self.report_path,
            skipped=skipped,
        )
        return self._checked

    def _load(self, split: CheckedSplit) -> tuple[torch.Tensor, torch.Tensor]:
        resize = transforms.Compose(
            [
                transforms.Resize(self.image_size),
                transforms.CenterCrop(self.image_size),
                transforms.PILToTensor(),
            ]
        )
        images = torch.stack([resize(open_image(path)) for path in split.images])
        return images, torch.tensor(split.targets)

    def build_splits(self) -> dict[str, TensorBatches]:
        loaded = {name: self._load(split) for name, split in self.verified().splits.items()}
        images, labels = loaded.pop("train")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(derived_seed(self.split_seed)))
        start = 0
        for name in ("val", "test"):
            if name not in loaded:
                count = round(self.fractions[name] * len(labels))
                picked = order[start : start + count].sort().values
                loaded[name] = (images[picked], labels[picked])
                start += count
        if start >= len(labels):
            raise ValueError(f"val_fraction and test_fraction leave no training images in {str(self.root)!r}")
        train = order[start:].sort().values
        images, labels = images[train], labels[train]
        mean, std = channel_stats(images)
        pad = max(1, self.image_size // 8)
        splits = {"train": TensorBatches(images, labels, Standardize(mean, std, self.augment, pad), self.seed)}
        for name in ("val", "test"):
            splits[name] = TensorBatches(*loaded[name], Standardize(mean, std))
        return splits

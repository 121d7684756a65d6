"""Datasets users bring: CIFAR-10/100 (torchvision's files, downloaded only when asked) and any ImageFolder.

Both are decoded once into memory as uint8 tensors and served a batch at a time (repablate.data.tensors);
per batch they are converted to float, standardized and, for training, augmented with a random padded crop
and a horizontal flip. ImageFolder images are resized (shorter side) and centre-cropped to ``image_size``
when loaded, so memory is about 3 * image_size**2 bytes per image: this suits folders up to a few hundred
thousand small images, not ImageNet.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import datasets, transforms
from torchvision.datasets.folder import find_classes

from repablate.data.tensors import InMemoryDataModule, TensorBatches, check_positive_int, check_seed, derived_seed

CIFAR = {"cifar10": (datasets.CIFAR10, 10), "cifar100": (datasets.CIFAR100, 100)}


class Standardize:
    """uint8 batch -> float, standardized per channel; with ``augment``, random padded crop and flip first."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, augment: bool = False, pad: int = 4):
        self.mean, self.std = mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)
        self.augment, self.pad = augment, pad

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = images.float().div_(255)
        if self.augment:
            images = random_crop_flip(images, self.pad, generator)
        return (images - self.mean) / self.std


def random_crop_flip(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Each image zero-padded by ``pad``, cropped back to its size at a random offset, flipped with p = 0.5."""
    n, c, h, w = images.shape
    padded = F.pad(images, [pad] * 4)
    top = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    columns = torch.arange(w)
    columns = torch.where(flip, w - 1 - columns, columns) + left  # n x w
    rows = top + torch.arange(h)  # n x h
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(c)[None, :, None, None]
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
    ):
        super().__init__(batch_size, seed, eval_batch_size)
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

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            dataset = self.dataset_class(str(self.root), train=train, download=self.download)
        except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
            raise FileNotFoundError(self._missing_message()) from error
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


class ImageFolderDataModule(InMemoryDataModule):
    """Any folder of class sub-folders (torchvision ImageFolder), as RGB ``image_size`` x ``image_size``.

    Layout: either ``root/<class>/<image>``, split into train/val/test by ``val_fraction`` and
    ``test_fraction`` (fixed by ``split_seed``), or ``root/train/<class>/...`` with optional ``root/val`` and
    ``root/test`` folders, missing ones carved out of train by the same fractions.
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
    ):
        super().__init__(batch_size, seed, eval_batch_size)
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
        self.folders = {name: self.root / name for name in ("train", "val", "test") if (self.root / name).is_dir()}
        if "train" not in self.folders:
            self.folders = {"train": self.root}
        try:
            self.classes, _ = find_classes(str(self.folders["train"]))
        except FileNotFoundError as error:
            raise FileNotFoundError(f"ImageFolder root={str(self.root)!r}: {error}") from error
        self.num_classes, self.image_size = len(self.classes), image_size
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.split_seed, self.augment = split_seed, augment

    def _load(self, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
        resize = transforms.Compose(
            [
                transforms.Resize(self.image_size),
                transforms.CenterCrop(self.image_size),
                transforms.PILToTensor(),
            ]
        )
        dataset = datasets.ImageFolder(str(folder), transform=resize)
        if dataset.classes != self.classes:
            raise ValueError(f"the classes of {str(folder)!r} ({dataset.classes}) differ from train's ({self.classes})")
        images = torch.stack([image for image, _ in dataset])
        return images, torch.tensor(dataset.targets)

    def build_splits(self) -> dict[str, TensorBatches]:
        loaded = {name: self._load(folder) for name, folder in self.folders.items()}
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

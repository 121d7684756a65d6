"""In-memory datasets served a whole batch at a time: the shared machinery of every repablate DataModule.

A standard DataLoader fetches samples one by one and collates them, which for small images costs more than the
forward pass. Here the sampler yields a tensor of indices per batch and the dataset indexes its tensors once
(``DataLoader(batch_size=None, sampler=SeededBatchSampler(...))``), in the main process.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

BatchTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def check_positive_int(**values: int) -> None:
    """Raise one clear ValueError for the first argument that is not a positive integer."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is not allowed: it must be a positive integer")


def check_seed(**values: int) -> None:
    """Raise one clear ValueError for the first seed that is not a non-negative integer."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} is not allowed: it must be a non-negative integer")


def derived_seed(*entropy: int) -> int:
    """A 63-bit seed mixed from several integers (e.g. a base seed and a split or epoch number)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class TensorBatches(Dataset):
    """``images`` and ``labels`` indexed by a tensor of indices; ``transform(x, generator)`` applied per batch.

    The transform (augmentation, uint8 to float normalization) draws from its own generator seeded by ``seed``.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: BatchTransform | None = None, seed: int = 0
    ):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels.long(), transform
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images[indices]
        if self.transform is not None:
            images = self.transform(images, self.generator)
        return images, self.labels[indices]


class SeededBatchSampler(Sampler[torch.Tensor]):
    """Yields index tensors of ``batch_size``; when shuffling, epoch e's order depends only on (seed, e).

    Lightning calls ``set_epoch`` before each epoch, so a resumed run sees the order it would have seen; used
    outside Lightning, each pass over the sampler advances the epoch by one.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False):
        check_positive_int(batch_size=batch_size)
        self.size, self.batch_size, self.shuffle, self.seed, self.drop_last = size, batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling order of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(derived_seed(self.seed, epoch)))
        else:
            order = torch.arange(self.size)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start : start + self.batch_size]


def batch_loader(dataset: TensorBatches, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> DataLoader:
    """A DataLoader that fetches whole batches from ``dataset`` in the main process."""
    sampler = SeededBatchSampler(len(dataset), batch_size, shuffle, seed, drop_last)
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=0)


class InMemoryDataModule(L.LightningDataModule):
    """Base of the repablate DataModules: subclasses build ``{"train", "val", "test"}`` TensorBatches once.

    The training loader shuffles (seeded) and drops the last incomplete batch, so BatchNorm never sees a
    batch of one; validation and test loaders keep every sample, in order.
    """

    num_classes: int
    in_channels: int
    image_size: int

    def __init__(self, batch_size: int = 64, seed: int = 0, eval_batch_size: int | None = None):
        super().__init__()
        check_positive_int(batch_size=batch_size)
        check_seed(seed=seed)
        if eval_batch_size is not None:
            check_positive_int(eval_batch_size=eval_batch_size)
        self.batch_size, self.seed = batch_size, seed
        self.eval_batch_size = eval_batch_size or batch_size
        self.splits: dict[str, TensorBatches] | None = None

    def build_splits(self) -> dict[str, TensorBatches]:
        """Load or generate the data: a dict with keys train, val and test."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self.build_splits()

    def split(self, name: str) -> TensorBatches:
        """The TensorBatches of one split (``train``, ``val`` or ``test``), built on first use."""
        self.setup()
        if name not in self.splits:
            raise ValueError(f"split={name!r} is not allowed: use one of {sorted(self.splits)}")
        return self.splits[name]

    def train_dataloader(self) -> DataLoader:
        train = self.split("train")
        if self.batch_size > len(train):
            raise ValueError(
                f"batch_size={self.batch_size} is not allowed: the training split has only {len(train)} samples"
            )
        return batch_loader(train, self.batch_size, shuffle=True, seed=self.seed, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return batch_loader(self.split("val"), self.eval_batch_size, shuffle=False, seed=self.seed, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return batch_loader(self.split("test"), self.eval_batch_size, shuffle=False, seed=self.seed, drop_last=False)

"""In-memory datasets served a whole batch at a time: the shared machinery of every repablate DataModule.

A standard DataLoader fetches samples one by one and collates them, which for small images costs more than the
forward pass. Here the sampler yields a tensor of indices per batch and the dataset indexes its tensors once
(``DataLoader(batch_size=None, sampler=SeededBatchSampler(...))``), in the main process.

On an accelerator the tensors are moved to the training device once, at setup (``device_resident``), and batches
are drawn there: no host-to-device copy of images per step. Under DDP each process draws its part of every global
batch (``SeededBatchSampler``'s ``rank`` and ``world_size``), so ``batch_size`` means the same in one process as in
many and a DDP run follows the one-process run (with synchronized BatchNorm, up to float noise).
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

    def to(self, device: torch.device | str) -> TensorBatches:
        """Move the images and labels to ``device`` (in place); the transform's generator stays on the CPU, so the
        random draws are the same on every device."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def __getitem__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images[indices]
        if self.transform is not None:
            images = self.transform(images, self.generator)
        return images, self.labels[indices]


class SeededBatchSampler(Sampler[torch.Tensor]):
    """Yields index tensors of ``batch_size``; when shuffling, epoch e's order depends only on (seed, e).

    Lightning calls ``set_epoch`` before each epoch, so a resumed run sees the order it would have seen; used
    outside Lightning, each pass over the sampler advances the epoch by one.

    With ``world_size`` > 1 (DDP), every process builds the same global batches and yields its own part of each:
    process ``rank`` gets the ``rank``-th of ``world_size`` near-equal slices (equal when ``batch_size`` is a
    multiple of ``world_size``; an empty slice of a short last batch is skipped). Together the processes see
    exactly the one-process batches.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        check_positive_int(batch_size=batch_size, world_size=world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} is not allowed: it must be an integer in [0, {world_size})")
        self.size, self.batch_size, self.shuffle, self.seed, self.drop_last = size, batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling order of ``epoch``."""
        self.epoch = epoch

    def _global_batches(self) -> int:
        return self.size // self.batch_size if self.drop_last else -(-self.size // self.batch_size)

    def _part(self, length: int) -> tuple[int, int]:
        """This process's slice of a global batch of ``length`` indices."""
        return self.rank * length // self.world_size, (self.rank + 1) * length // self.world_size

    def __len__(self) -> int:
        batches = self._global_batches()
        last = self.size - (batches - 1) * self.batch_size if batches else 0
        if batches and last < self.batch_size:  # a short last batch: this process's part may be empty
            start, end = self._part(last)
            return batches - (end == start)
        return batches

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(derived_seed(self.seed, epoch)))
        else:
            order = torch.arange(self.size)
        for start in range(0, self._global_batches() * self.batch_size, self.batch_size):
            batch = order[start : start + self.batch_size]
            if self.world_size > 1:
                first, end = self._part(len(batch))
                batch = batch[first:end]
            if len(batch):
                yield batch


def batch_loader(
    dataset: TensorBatches,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader that fetches whole batches from ``dataset`` in the main process (under DDP, this process's
    part of each batch: ``SeededBatchSampler``)."""
    sampler = SeededBatchSampler(len(dataset), batch_size, shuffle, seed, drop_last, rank, world_size)
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=0)


class InMemoryDataModule(L.LightningDataModule):
    """Base of the repablate DataModules: subclasses build ``{"train", "val", "test"}`` TensorBatches once.

    The training loader shuffles (seeded) and drops the last incomplete batch, so BatchNorm never sees a
    batch of one; validation and test loaders keep every sample, in order. With ``device_resident`` (default) and
    a Trainer on an accelerator, the splits move to the training device once, at setup. Under DDP ``batch_size``
    is the global batch, which each process draws its part of (``batch_size`` must then be a multiple of the
    number of processes); ``dataloader(split, shard=False)`` gives the whole split to one process.
    """

    num_classes: int
    in_channels: int
    image_size: int

    def __init__(
        self, batch_size: int = 64, seed: int = 0, eval_batch_size: int | None = None, device_resident: bool = True
    ):
        super().__init__()
        check_positive_int(batch_size=batch_size)
        check_seed(seed=seed)
        if eval_batch_size is not None:
            check_positive_int(eval_batch_size=eval_batch_size)
        if not isinstance(device_resident, bool):
            raise ValueError(f"device_resident={device_resident!r} is not allowed: it must be true or false")
        self.batch_size, self.seed, self.device_resident = batch_size, seed, device_resident
        self.eval_batch_size = eval_batch_size or batch_size
        self.splits: dict[str, TensorBatches] | None = None

    def build_splits(self) -> dict[str, TensorBatches]:
        """Load or generate the data: a dict with keys train, val and test."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self.build_splits()
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        if self.device_resident and device is not None and device.type != "cpu":
            for split in self.splits.values():
                split.to(device)

    def split(self, name: str) -> TensorBatches:
        """The TensorBatches of one split (``train``, ``val`` or ``test``), built on first use."""
        self.setup()
        if name not in self.splits:
            raise ValueError(f"split={name!r} is not allowed: use one of {sorted(self.splits)}")
        return self.splits[name]

    def _processes(self) -> tuple[int, int]:
        """(rank, world size) of the Trainer this module serves; (0, 1) outside one."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def dataloader(self, split: str, shard: bool = True) -> DataLoader:
        """The loader of ``split``: shuffled, seeded and without the short last batch for ``train``, in order and
        whole for ``val`` and ``test``; with ``shard`` (under DDP) only this process's part of each batch."""
        data = self.split(split)
        rank, world_size = self._processes() if shard else (0, 1)
        train = split == "train"
        batch_size = self.batch_size if train else self.eval_batch_size
        if train and self.batch_size > len(data):
            raise ValueError(
                f"batch_size={self.batch_size} is not allowed: the training split has only {len(data)} samples"
            )
        if train and self.batch_size % world_size:
            raise ValueError(
                f"batch_size={self.batch_size} is not allowed with {world_size} processes: the global batch is split "
                f"among them, so it must be a multiple of {world_size}"
            )
        if not train and min(batch_size, len(data)) < world_size:  # a process with no batch at all would hang DDP
            raise ValueError(
                f"eval_batch_size={batch_size} is not allowed with {world_size} processes and a {split} split of "
                f"{len(data)}: every process needs a part of every batch, so both must be at least {world_size}"
            )
        return batch_loader(data, batch_size, train, self.seed, train, rank, world_size)

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train")

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")


def whole_split_loader(datamodule: L.LightningDataModule, split: str) -> DataLoader:
    """``split``'s loader with every batch whole, also under DDP: what one process evaluating alone needs."""
    if isinstance(datamodule, InMemoryDataModule):
        return datamodule.dataloader(split, shard=False)
    return getattr(datamodule, f"{split}_dataloader")()

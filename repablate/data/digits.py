"""The embedded default dataset: scikit-learn's bundled handwritten digits (1,797 real 8x8 grey images).

Ships inside scikit-learn, so a run needs no download. The split is stratified and fixed by ``split_seed``
(default 0) independently of the run ``seed``, so every run of an ablation sees the same train, val and test
images and seeds vary only the training itself. Default sizes: 1,257 train, 180 val, 360 test.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from repablate.data.tensors import InMemoryDataModule, TensorBatches, check_positive_int, check_seed

TOTAL = 1797  # images in sklearn.datasets.load_digits


class DigitsDataModule(InMemoryDataModule):
    """Digits 0-9 as 1x8x8 float tensors, standardized with the training split's mean and std.

    Args:
        batch_size: training batch size (also for evaluation unless ``eval_batch_size`` is given).
        seed: seeds the training order.
        val_size, test_size: images held out, stratified by class.
        split_seed: seeds the split.
    """

    num_classes = 10
    in_channels = 1
    image_size = 8

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        val_size: int = 180,
        test_size: int = 360,
        split_seed: int = 0,
        eval_batch_size: int | None = None,
        device_resident: bool = True,
    ):
        super().__init__(batch_size, seed, eval_batch_size, device_resident)
        check_positive_int(val_size=val_size, test_size=test_size)
        check_seed(split_seed=split_seed)
        if val_size + test_size > TOTAL - self.num_classes:
            raise ValueError(
                f"val_size={val_size} + test_size={test_size} is not allowed: the digits have {TOTAL} images "
                f"and the training split needs at least {self.num_classes}"
            )
        self.val_size, self.test_size, self.split_seed = val_size, test_size, split_seed

    def build_splits(self) -> dict[str, TensorBatches]:
        digits = load_digits()
        images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # pixel values are 0..16
        labels = torch.from_numpy(digits.target).long()
        rest, test = train_test_split(
            np.arange(len(labels)), test_size=self.test_size, stratify=digits.target, random_state=self.split_seed
        )
        train, val = train_test_split(
            rest, test_size=self.val_size, stratify=digits.target[rest], random_state=self.split_seed
        )
        train, val, test = (torch.from_numpy(np.sort(idx)) for idx in (train, val, test))
        self.split_indices = {"train": train, "val": val, "test": test}  # rows of load_digits(), for audits
        mean, std = images[train].mean(), images[train].std()
        images = (images - mean) / std
        return {
            name: TensorBatches(images[idx], labels[idx])
            for name, idx in (("train", train), ("val", val), ("test", test))
        }

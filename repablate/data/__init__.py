"""repablate.data -- LightningDataModules; every default works offline.

Each exposes ``num_classes``, ``in_channels`` and ``image_size`` (a run checks them against the config's
``data_shape``) and takes ``batch_size`` and ``seed``. Classification data lives in memory as tensors and is
served a batch at a time (see ``repablate.data.tensors``). Datasets read from files are checked before training
(``repablate.data.check``, also ``python -m repablate.data.check``; docs/DATA.md).

The names below are imported on first use (PEP 562), so that ``python -m repablate.data.check`` runs its module
once, not once as a submodule and again as the program.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "SHAPES": "shapes",
    "CIFARDataModule": "vision",
    "DigitsDataModule": "digits",
    "ImageFolderDataModule": "vision",
    "InMemoryDataModule": "tensors",
    "SeededBatchSampler": "tensors",
    "ShapesDataModule": "shapes",
    "ShapesDetectDataModule": "detection",
    "TensorBatches": "tensors",
    "YoloDataModule": "detection",
    "batch_loader": "tensors",
    "render_shapes": "shapes",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'repablate.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"repablate.data.{_MODULES[name]}"), name)


def __dir__() -> list[str]:
    return __all__

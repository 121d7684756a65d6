"""repablate.data -- LightningDataModules; every default works offline.

Each exposes ``num_classes``, ``in_channels`` and ``image_size`` (a run checks them against the config's
``data_shape``) and takes ``batch_size`` and ``seed``. Classification data lives in memory as tensors and is
served a batch at a time (see ``repablate.data.tensors``).
"""

from repablate.data.detection import ShapesDetectDataModule, YoloDataModule
from repablate.data.digits import DigitsDataModule
from repablate.data.shapes import SHAPES, ShapesDataModule, render_shapes
from repablate.data.tensors import InMemoryDataModule, SeededBatchSampler, TensorBatches, batch_loader
from repablate.data.vision import CIFARDataModule, ImageFolderDataModule

__all__ = [
    "SHAPES",
    "CIFARDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "InMemoryDataModule",
    "SeededBatchSampler",
    "ShapesDataModule",
    "ShapesDetectDataModule",
    "TensorBatches",
    "YoloDataModule",
    "batch_loader",
    "render_shapes",
]

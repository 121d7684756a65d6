"""Procedurally generated shapes: 3x32x32 classification whose difficulty is one knob in [0, 1].

At difficulty 0 a white shape of nearly fixed size sits near the centre of a black image; raising it scales,
all linearly, the size, position and rotation jitter, the background and foreground colour jitter (down to a
low contrast), Gaussian pixel noise and clutter (random line segments drawn over the shape). Every split is
a deterministic function of ``data_seed``, its split name and the sizes, so it is generated identically on any
machine; the random draws do not depend on ``difficulty``, which only scales them, so one sample at two
difficulties is the same scene made harder.
"""

from __future__ import annotations

import math

import torch

from repablate.data.tensors import InMemoryDataModule, TensorBatches, check_positive_int, check_seed, derived_seed

SHAPES = ("disk", "square", "triangle", "ring", "cross", "frame", "bar", "half_disk")
SIZE = 32
CLUTTER_SLOTS = 6  # each slot holds a line segment with probability 0.7 * difficulty


def _shape_masks(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean masks of every shape in unit shape coordinates (u, v), stacked on a new dim 1."""
    radius, box = torch.sqrt(u * u + v * v), torch.maximum(u.abs(), v.abs())
    return torch.stack(
        [
            radius <= 1,
            box <= 0.8,
            (v >= -0.5) & (math.sqrt(3) * u.abs() + v <= 1),
            (radius >= 0.55) & (radius <= 1),
            ((u.abs() <= 0.28) & (v.abs() <= 1)) | ((v.abs() <= 0.28) & (u.abs() <= 1)),
            (box <= 0.85) & (box >= 0.5),
            (u.abs() <= 1) & (v.abs() <= 0.35),
            (radius <= 1) & (v >= 0),
        ],
        dim=1,
    )


def _segment_distance(x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Distance of grid points (x, y) to segments start-end, shapes (n, k, 2) -> (n, k, SIZE, SIZE)."""
    direction = end - start
    length2 = (direction * direction).sum(-1).clamp_min(1e-6)[..., None, None]
    px, py = x - start[..., 0, None, None], y - start[..., 1, None, None]
    t = ((px * direction[..., 0, None, None] + py * direction[..., 1, None, None]) / length2).clamp(0, 1)
    return torch.hypot(px - t * direction[..., 0, None, None], py - t * direction[..., 1, None, None])


def render_shapes(
    n: int, difficulty: float, num_classes: int, seed: int, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (float32, n x 3 x 32 x 32, roughly in [0, 1] plus noise) and labels (balanced classes)."""
    d = float(difficulty)
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    radius = 0.5 * (1 + (0.1 + 0.3 * d) * (2 * uniform(n) - 1))
    centre = (0.05 + 0.9 * d) * (1 - radius)[:, None] * (2 * uniform(n, 2) - 1)
    angle = d * math.pi * (2 * uniform(n) - 1)
    background = d * uniform(n, 3)
    # The foreground keeps a contrast of at least 1 - 0.6 d from the background, signed away from it.
    sign = torch.where(background.mean(1, keepdim=True) < 0.5, 1.0, -1.0)
    foreground = (background + sign * (1 - 0.6 * d) + 0.2 * d * torch.randn(n, 3, generator=g)).clamp(0, 1)
    segments = 2 * uniform(n, CLUTTER_SLOTS, 4) - 1
    segment_on = uniform(n, CLUTTER_SLOTS) < 0.7 * d
    segment_colour = (background[:, None] + sign[:, None] * (1 - 0.6 * d) * uniform(n, CLUTTER_SLOTS, 1)).clamp(0, 1)
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=g))

    axis = (torch.arange(SIZE) + 0.5) / SIZE * 2 - 1  # pixel centres in [-1, 1]
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    images = torch.empty(n, 3, SIZE, SIZE)
    for lo in range(0, n, chunk):
        s = slice(lo, min(lo + chunk, n))
        dx, dy = x - centre[s, 0, None, None], y - centre[s, 1, None, None]
        cos, sin, r = angle[s].cos()[:, None, None], angle[s].sin()[:, None, None], radius[s][:, None, None]
        u, v = (cos * dx + sin * dy) / r, (cos * dy - sin * dx) / r
        mask = _shape_masks(u, v)[torch.arange(len(labels[s])), labels[s]]
        image = torch.where(mask[:, None], foreground[s, :, None, None], background[s, :, None, None])
        seg = segments[s]
        on_line = (_segment_distance(x, y, seg[..., :2], seg[..., 2:]) < 0.07) & segment_on[s, :, None, None]
        for k in range(CLUTTER_SLOTS):  # later segments over earlier ones
            image = torch.where(on_line[:, k, None], segment_colour[s, k, :, None, None], image)
        images[s] = image
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(noise_seed))
    return images + 0.2 * d * noise, labels


class ShapesDataModule(InMemoryDataModule):
    """Generated shape classification, 3 x 32 x 32, standardized per channel with the training split's stats.

    Args:
        batch_size, seed: training batch size and the seed of the training order.
        difficulty: in [0, 1]; 0 is nearly trivial, 1 is hard (see the module docstring).
        num_classes: how many of the shapes in ``SHAPES`` to use, 2 to 8.
        train_size, val_size, test_size: images per split.
        data_seed: seeds the generation, independently of ``seed``, so runs with different seeds share data.
    """

    in_channels = 3
    image_size = SIZE

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        difficulty: float = 0.5,
        num_classes: int = 6,
        train_size: int = 5000,
        val_size: int = 1000,
        test_size: int = 1000,
        data_seed: int = 0,
        eval_batch_size: int | None = None,
        device_resident: bool = True,
    ):
        super().__init__(batch_size, seed, eval_batch_size, device_resident)
        if isinstance(difficulty, bool) or not isinstance(difficulty, (int, float)) or not 0 <= difficulty <= 1:
            raise ValueError(f"difficulty={difficulty!r} is not allowed: it must be a number in [0, 1]")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes={num_classes!r} is not allowed: use 2 to {len(SHAPES)} ({SHAPES})")
        check_positive_int(train_size=train_size, val_size=val_size, test_size=test_size)
        check_seed(data_seed=data_seed)
        self.difficulty, self.num_classes, self.data_seed = float(difficulty), num_classes, data_seed
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}

    def build_splits(self) -> dict[str, TensorBatches]:
        generated = {
            name: render_shapes(size, self.difficulty, self.num_classes, derived_seed(self.data_seed, number))
            for number, (name, size) in enumerate(self.sizes.items())
        }
        train_images = generated["train"][0]
        mean = train_images.mean(dim=(0, 2, 3), keepdim=True)
        std = train_images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        return {name: TensorBatches((images - mean) / std, labels) for name, (images, labels) in generated.items()}

"""Image files as the datasets read them: which files count, and one reader for all of them.

``open_image`` is the one way a repablate dataset turns a file into pixels: EXIF orientation applied (as
YOLOv7 and Ultralytics see a photo, so its labels line up), then any mode made 8-bit RGB: 16-bit images are
scaled (65535 -> 255), not clipped; palette transparency is dropped as OpenCV drops it. ``probe_image`` runs
the same reader without keeping the pixels (JPEGs decoded at 1/8 scale, every byte still read), for the
dataset check.

Files and folders whose names start with ``.`` or ``_`` are system or tool leftovers (``__MACOSX``,
``._photo.jpg`` from macOS archives, ``.ipynb_checkpoints``, ``.DS_Store``) and are never read as data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# YOLOv7's list less .dng (camera raw, which Pillow does not decode); Ultralytics' .pfm and .heic are not read.
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp")
ORIENTATION = 0x0112  # the EXIF orientation tag; values 5-8 turn the image by 90 degrees


def is_hidden(name: str) -> bool:
    """A system or tool leftover, never data: the name starts with ``.`` or ``_``."""
    return name.startswith((".", "_"))


def is_image(path: str | Path) -> bool:
    """Has one of ``IMAGE_SUFFIXES`` (any case)."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_SUFFIXES


def walk_files(folder: str | os.PathLike) -> Iterator[tuple[str, bool]]:
    """Every file under ``folder`` as ``(path, hidden)``, in sorted order; ``hidden`` when its name or a folder
    between it and ``folder`` starts with ``.`` or ``_`` (nothing under a hidden folder is opened)."""
    folder = os.fspath(folder)
    for top, dirs, files in os.walk(folder):
        relative = os.path.relpath(top, folder)
        top_hidden = relative != "." and any(is_hidden(part) for part in relative.split(os.sep))
        dirs.sort()
        for name in sorted(files):
            yield os.path.join(top, name), top_hidden or is_hidden(name)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode. 16-bit greyscale (``I;16*``, and ``I``, which Pillow gives 16-bit PNGs and
    TIFFs) is scaled by 255/65535; float images (``F``) in [0, 1] are scaled by 255, others clipped to [0, 255]."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I"):
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        values = np.nan_to_num(values * 255 if values.size and values.max() <= 1 else values)
        return Image.fromarray(values.round().clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "PA" or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")  # what Pillow asks for palette transparency; the alpha is dropped below
    return image.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, turned upright by its EXIF orientation; errors name the file."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.getexif().get(ORIENTATION, 1) != 1:
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError) as error:  # Pillow: truncated, unknown format, bad header
        raise OSError(f"{path}: cannot read the image: {error}") from error


def probe_image(path: str | Path) -> tuple[int, int]:
    """Decode the image at ``path`` as ``open_image`` would, keeping no pixels; its upright (width, height).

    A JPEG is decoded at 1/8 scale (every byte of it is still read, so truncation is found). Raises what
    Pillow raises for a file it cannot read.
    """
    with Image.open(path) as image:
        width, height = image.size
        if image.format == "JPEG":
            image.draft("RGB", (1, 1))
        image.load()
        if image.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8):
            width, height = height, width
        to_rgb(image)
    return width, height

"""How long the dataset check takes on a 10,000-image YOLO dataset: the first time, and from its cache.

    python benchmarks/data_check.py [--images 10000] [--size 64] [--root DIR] [--rounds 3]

Writes a synthetic YOLO dataset (half JPEG, half PNG, ``--size`` pixels square, 1-3 boxes each, 10% background
images without a label file; 90% train, 10% val) under ``--root`` (default: a temporary folder, removed after),
then times ``YoloDataModule.check_data()`` -- the data YAML read, every folder listed, every file's size and
mtime read, and images decoded and label files parsed where the cache does not already hold them -- with a new
datamodule each time, as a new run would: first with no cache (every image decoded, every label parsed), then
``--rounds`` times from the cache. Prints the figures, the machine and its load. The bar: < 30 s the first
time, < 2 s cached, on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from repablate.data.detection import YoloDataModule


def make_dataset(root: Path, images: int, size: int, seed: int = 0) -> Path:
    """The synthetic set under ``root``; returns its data YAML."""
    rng = np.random.default_rng(seed)
    for index in range(images):
        split = "val" if index % 10 == 9 else "train"
        suffix = ".jpg" if index % 2 else ".png"
        image_dir, label_dir = root / "images" / split, root / "labels" / split
        if index < 10:
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(rng.normal(100, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(image_dir / f"{index:06d}{suffix}")
        if index % 10 == 3:
            continue  # a background image: no label file
        rows = []
        for _ in range(rng.integers(1, 4)):
            w, h = rng.uniform(0.1, 0.5, 2)
            cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
            rows.append(f"{rng.integers(0, 6)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        (label_dir / f"{index:06d}.txt").write_text("\n".join(rows) + "\n")
    data_yaml = root / "data.yaml"
    spec = {"path": ".", "train": "images/train", "val": "images/val", "names": [f"c{i}" for i in range(6)]}
    data_yaml.write_text(yaml.safe_dump(spec))
    return data_yaml


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform module knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed_check(data_yaml: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    result = YoloDataModule(data_yaml, num_classes=6, image_size=64).check_data()
    return time.perf_counter() - started, result.report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--root", type=Path, help="where to write the dataset (kept); default a temporary folder")
    parser.add_argument("--rounds", type=int, default=3, help="timed checks from the cache")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="repablate-data-check-"))
    try:
        started = time.perf_counter()
        data_yaml = make_dataset(root, args.images, args.size)
        print(f"wrote {args.images:,} images of {args.size}x{args.size} in {time.perf_counter() - started:.1f} s")
        cache = root / ".repablate_check-data.json"  # beside data.yaml, named after it
        cache.unlink(missing_ok=True)
        load = os.getloadavg()[0]
        first, report = timed_check(data_yaml)
        print(f"first check: {first:.2f} s (load average {load:.2f} before)")
        print(f"  {report['summary']['images']:,} images, {report['summary']['backgrounds']:,} backgrounds, "
              f"{report['summary']['objects']:,} objects, status {report['status']}; decoded "
              f"{report['cache']['images_decoded']:,} images, read {report['cache']['label_files_read']:,} label "
              "files")  # fmt: skip
        cached = []
        for _ in range(args.rounds):
            seconds, report = timed_check(data_yaml)
            assert report["cache"]["images_decoded"] == 0 and report["cache"]["label_files_read"] == 0
            cached.append(seconds)
        print(f"cached check: median {statistics.median(cached):.2f} s over {args.rounds} (all: "
              f"{', '.join(f'{s:.2f}' for s in cached)}); load average {os.getloadavg()[0]:.2f} after")  # fmt: skip
        print(f"cache file: {cache.stat().st_size / 1e6:.1f} MB")
        system = f"{platform.platform()}, Python {platform.python_version()}"
        print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, {system}")
        print(f"bar: first < 30 s {'met' if first < 30 else 'MISSED'}, cached < 2 s "
              f"{'met' if statistics.median(cached) < 2 else 'MISSED'}")  # fmt: skip
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

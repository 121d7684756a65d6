"""Time-budgeted YOLOv7-tiny training on the embedded shapes set: one row of the detection table per call.

    python benchmarks/detect_train.py --conv3x3 repconv --minutes 15 --out /tmp/detect_repconv.json

Trains with Lightning under ``max_time``, validates every epoch, and writes a JSON record: the mAP curve against
wall-clock training time, the first time mAP@0.5 reached 0.5, the final mAP of the training and the deployed
(fused) forms, and the machine. Figures go to docs/BENCHMARKS.md with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch

from repablate.data.detection import ShapesDetectDataModule
from repablate.models.yolov7_tiny import CONV3X3_CHOICES, YOLOv7Tiny
from repablate.nn import reparameterize
from repablate.train.detect import DetectionModule
from repablate.train.schedules import warmup_schedule


class CurveRecorder(pl.Callback):
    """Wall-clock training time (validation excluded) and mAP after every validation."""

    def __init__(self):
        self.curve, self.train_seconds, self._started = [], 0.0, None

    def on_train_epoch_start(self, trainer, pl_module):
        self._started = time.perf_counter()

    def on_validation_start(self, trainer, pl_module):
        if self._started is not None:
            self.train_seconds += time.perf_counter() - self._started
            self._started = None

    def on_validation_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics
        self.curve.append({"epoch": trainer.current_epoch, "step": trainer.global_step,
                           "train_seconds": round(self.train_seconds, 1),
                           "map50": float(metrics["val/map50"]), "map": float(metrics["val/map"])})
        print(json.dumps(self.curve[-1]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conv3x3", choices=CONV3X3_CHOICES, default="repconv")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget (max_time)")
    parser.add_argument("--epochs", type=int, default=30, help="the schedule's length (cut short by --minutes)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True)

    data = ShapesDetectDataModule(image_size=args.image_size, num_train=args.num_train, batch_size=args.batch_size,
                                  seed=args.seed, cache_dir=args.cache_dir)
    model = YOLOv7Tiny(nc=data.num_classes, conv3x3=args.conv3x3)
    module = DetectionModule(
        model, partial(torch.optim.AdamW, lr=args.lr, weight_decay=5e-4),
        partial(warmup_schedule, decay="cosine", warmup_epochs=1.0, eta_min=args.lr / 20),
        num_classes=data.num_classes, image_size=args.image_size,
    )
    recorder = CurveRecorder()
    trainer = pl.Trainer(max_epochs=args.epochs, max_time={"minutes": args.minutes}, accelerator="cpu",
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False, num_sanity_val_steps=0, callbacks=[recorder])
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    if recorder._started is not None:  # stopped by max_time mid-epoch: count that last stretch
        recorder.train_seconds += time.perf_counter() - recorder._started
    final = module.evaluate(module.model, data.val_dataloader())
    deployed = module.evaluate(reparameterize(module.model), data.val_dataloader())
    reached = next((point for point in recorder.curve if point["map50"] >= 0.5), None)
    record = {
        "conv3x3": args.conv3x3, "image_size": args.image_size, "batch_size": args.batch_size, "lr": args.lr,
        "epochs_planned": args.epochs, "minutes_budget": args.minutes, "seed": args.seed,
        "train_params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(recorder.train_seconds, 1), "wall_seconds": round(time.perf_counter() - started, 1),
        "steps": trainer.global_step, "final": final, "deployed": deployed,
        "first_map50_at_0.5": reached, "curve": recorder.curve,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{args.threads} threads",
    }
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "curve"}))


if __name__ == "__main__":
    main()

"""``+experiment=yolov7_tiny_table``: its rows compose to the intended models, and a run goes end to end the
way a user starts it (``python -m repablate``) under fast_dev_run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from torch import nn

from repablate.models.yolov7_tiny import YOLOv7Tiny
from repablate.nn import RepConv

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("variant", "repconvs", "identities"), [("plain", 0, 0), ("repconv", 19, 16), ("repconv_n", 19, 0)]
)
def test_table_rows_build_the_intended_models(compose_config, variant, repconvs, identities):
    cfg = compose_config("+experiment=yolov7_tiny_table", f"+variant={variant}")
    assert cfg.task.module._target_ == "repablate.train.detect.DetectionModule"
    assert cfg.data_shape.image_size == 64 and cfg.trainer.max_time == "00:00:15:00"
    # callbacks=ema: the default callbacks, then Lightning's EMA of the weights with decay 0.99.
    assert list(cfg.callbacks)[-2:] == ["deploy_check", "ema"] and cfg.callbacks.ema.decay == 0.99
    model = instantiate(cfg.model)
    blocks = [m for m in model.modules() if isinstance(m, RepConv)]
    assert len(blocks) == repconvs and sum(b.rbr_identity is not None for b in blocks) == identities
    assert model.detect.nc == cfg.data_shape.num_classes == 6
    leaky = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert leaky and not any(isinstance(m, nn.SiLU) for m in model.modules())  # tiny's activation everywhere


@pytest.mark.slow
def test_experiment_runs_under_fast_dev_run(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", REPABLATE_CACHE=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    overrides = [
        "+experiment=yolov7_tiny_table",
        "seed=0",
        "+variant=repconv",
        "trainer.fast_dev_run=true",
        "data.num_train=8",
        "data.num_val=4",
        "data.batch_size=4",
        "callbacks.deploy_check.measure_batch_size=1",
        "+callbacks.deploy_check.bench.warmup=1",
        "+callbacks.deploy_check.bench.min_run_time=0.01",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "repablate", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (results,) = (tmp_path / "multirun" / "yolov7_tiny_table").glob("*/*/results.json")
    record = json.loads(results.read_text())
    assert record["status"] == "completed" and record["task"] == "detect" and record["variant"] == "repconv"
    assert record["equivalence/max_rel"] < 1e-4
    assert record["deploy_form/val/map50"] == pytest.approx(record["train_form/val/map50"], abs=0.005)
    # Fused, the RepConv model has exactly the size of the official tiny built deployed, and fewer FLOPs.
    official_deployed = sum(p.numel() for p in YOLOv7Tiny(nc=6, deploy=True).parameters())
    assert record["deploy_form/params"] == official_deployed < record["train_form/params"]
    assert record["deploy_form/flops"] < record["train_form/flops"]
    assert (results.parent / "checkpoints" / "deploy.pt").is_file()

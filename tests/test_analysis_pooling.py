"""A table row averages replicates: runs that differ in nothing but their seed (and the bookkeeping that follows
from the seed or the run directory). Anything else is refused with the keys that differ, unless pooled on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from repablate.analysis import (
    BOOKKEEPING_KEYS,
    PoolingError,
    ablation_table,
    accuracy_vs_latency,
    check_pooling,
    collect_runs,
    forms_comparison,
    is_bookkeeping,
    load_branch_gradients,
    to_markdown,
    write_report,
)
from tests.test_analysis import ACC, run_cli

# The config keys that differed between seed 0 and seed 1 of one real configuration (a two-seed multirun of
# +variant=repconv with the default loggers, results.json compared key by key).
REAL_BOOKKEEPING_KEYS = (
    "callbacks.branch_gradients.csv_path",
    "callbacks.checkpoint.dirpath",
    "callbacks.deploy_check.checkpoint_path",
    "data.seed",
    "logger.csv.save_dir",
    "logger.wandb.name",
    "logger.wandb.save_dir",
    "paths.run_dir",
    "seed",
    "trainer.default_root_dir",
)


def record(run_dir: Path, variant: str, seed: int, lr: float = 0.1, acc: float = 0.9, **extra) -> dict:
    """A results.json shaped like a real one: the run's keys, the config keys that matter, the bookkeeping keys
    that differ between seeds, and metrics for the table and the figures."""
    return {
        "status": "completed",
        "error": None,
        "variant": variant,
        "seed": seed,
        "run_dir": str(run_dir),
        "config/variant": variant,
        "config/seed": seed,
        "config/data.seed": seed,
        "config/optimizer.lr": lr,
        "config/trainer.max_epochs": 1,
        "config/ckpt_path": None,
        "config/paths.run_dir": str(run_dir),
        "config/paths.data_dir": "data",
        "config/trainer.default_root_dir": str(run_dir),
        "config/callbacks.checkpoint.dirpath": f"{run_dir}/checkpoints",
        "config/callbacks.branch_gradients.csv_path": f"{run_dir}/branch_gradients.csv",
        "config/callbacks.deploy_check.checkpoint_path": f"{run_dir}/checkpoints/deploy.pt",
        "config/logger.csv.save_dir": str(run_dir),
        "config/logger.wandb.save_dir": str(run_dir),
        "config/logger.wandb.name": f"{variant}-s{seed}",
        "config/logger.wandb.group": variant,
        ACC: acc,
        "deploy_form/latency_ms": 2.0 + seed / 10,
        "train_form/latency_ms": 3.0 + seed / 10,
        "train_form/flops": 2.2e7,
        "deploy_form/flops": 2e7,
        **extra,
    }


def write_sweep(sweep_dir: Path, jobs: list[tuple[str, int, float]], **extra) -> Path:
    """One job directory per (variant, seed, lr), Hydra-style, with results.json and a branch_gradients.csv."""
    for number, (variant, seed, lr) in enumerate(jobs):
        run_dir = sweep_dir / f"{number}_{variant}_s{seed}"
        (run_dir / ".hydra").mkdir(parents=True)
        overrides = [f"+variant={variant}", f"seed={seed}", f"optimizer.lr={lr}"]
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        acc = 0.9 - 0.4 * (lr > 1) + 0.01 * seed
        (run_dir / "results.json").write_text(json.dumps(record(run_dir, variant, seed, lr, acc, **extra)))
        (run_dir / "branch_gradients.csv").write_text("step,layer,branch,grad_norm,share\n0,s1,dense,1.0,1.0\n")
    return sweep_dir


@pytest.fixture
def lr_sweep(tmp_path) -> Path:
    """The reported case: one variant swept over optimizer.lr=0.1,1000, two seeds each."""
    return write_sweep(tmp_path / "lr", [("repconv", s, lr) for lr in (0.1, 1000) for s in (0, 1)])


# --- refusing, splitting, pooling on purpose ------------------------------------------------------------------


def test_a_row_never_averages_different_learning_rates(lr_sweep):
    runs = collect_runs(lr_sweep)
    with pytest.raises(PoolingError) as refused:
        ablation_table(runs, metrics=[ACC])
    message = str(refused.value)
    assert "row 'repconv' (4 runs)" in message
    assert "optimizer.lr = 0.1 (2 runs) | 1000 (2 runs)" in message
    assert "--by variant,optimizer.lr" in message and "--pool optimizer.lr" in message
    assert refused.value.differing == {"optimizer.lr": ["0.1", "1000"]}
    assert isinstance(refused.value, ValueError)  # the command line reports it as bad input (exit 2)


def test_grouping_by_the_differing_key_gives_each_configuration_its_row(lr_sweep):
    runs = collect_runs(lr_sweep)
    table = ablation_table(runs, metrics=[ACC], by=["variant", "optimizer.lr"], baseline="repconv,0.1")
    assert list(table.index) == ["repconv,0.1", "repconv,1000"]
    assert table[(ACC, "n")].tolist() == [2, 2]
    assert table.loc["repconv,0.1", (ACC, "mean")] == pytest.approx(0.905)
    assert table.loc["repconv,1000", (ACC, "mean")] == pytest.approx(0.505)
    assert table.attrs["pooled"] == {}


@pytest.mark.parametrize("pool", [["optimizer.lr"], ["config/optimizer.lr"], ["optimizer.*"], True])
def test_pooling_on_purpose_averages_and_says_so(lr_sweep, pool):
    runs = collect_runs(lr_sweep)
    table = ablation_table(runs, metrics=[ACC], pool=pool)
    assert table[(ACC, "n")].tolist() == [4]
    assert table.attrs["pooled"] == {"optimizer.lr": ["0.1", "1000"]}
    assert "pooled on purpose: optimizer.lr (0.1, 1000)" in to_markdown(table, runs)


def test_pool_names_must_exist(lr_sweep):
    runs = collect_runs(lr_sweep)
    with pytest.raises(ValueError, match="unknown column 'optimiser.lr'"):
        ablation_table(runs, metrics=[ACC], pool=["optimiser.lr"])
    with pytest.raises(ValueError, match=r"pool pattern 'optimiser\.\*' matches no config key"):
        ablation_table(runs, metrics=[ACC], pool=["optimiser.*"])


def test_grouping_by_another_key_refuses_to_average_variants(tmp_path):
    runs = collect_runs(write_sweep(tmp_path, [(v, s, 0.1) for v in ("plain", "repconv") for s in (0, 1)]))
    with pytest.raises(PoolingError, match=r"row '0.1' \(4 runs\): variant = plain \(2 runs\) \| repconv \(2 runs\)"):
        ablation_table(runs, metrics=[ACC], by=["optimizer.lr"])
    table = ablation_table(runs, metrics=[ACC], by=["optimizer.lr"], pool=["variant"])
    assert list(table.index) == ["0.1"] and table[(ACC, "n")].tolist() == [4]
    assert table.attrs["pooled"] == {"variant": ["plain", "repconv"]}
    by_variant = ablation_table(runs, metrics=[ACC])  # variant differs between rows, not within: nothing to refuse
    assert by_variant[(ACC, "n")].tolist() == [2, 2]


def test_a_key_present_in_some_runs_only_is_a_difference(tmp_path):
    write_sweep(tmp_path / "old", [("repconv", 0, 0.1)])
    write_sweep(tmp_path / "new", [("repconv", 1, 0.1)], **{"config/trainer.gradient_clip_val": 1.0})
    with pytest.raises(PoolingError, match=r"trainer.gradient_clip_val = 1 \(1 run\) \| <absent> \(1 run\)"):
        ablation_table(collect_runs(tmp_path), metrics=[ACC])


def test_only_completed_runs_are_checked(tmp_path):
    """A failed job with another configuration never enters a row, so it cannot mix one."""
    sweep = write_sweep(tmp_path, [("repconv", s, lr) for lr in (0.1, -1) for s in (0, 1)])
    for path in sweep.glob("*/results.json"):
        if json.loads(path.read_text())["config/optimizer.lr"] < 0:
            path.write_text(json.dumps({**json.loads(path.read_text()), "status": "failed", "error": "ValueError: lr"}))
    assert ablation_table(collect_runs(sweep), metrics=[ACC])[(ACC, "n")].tolist() == [2]


# --- the bookkeeping keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", REAL_BOOKKEEPING_KEYS)
def test_keys_that_follow_the_seed_or_the_run_directory_are_ignored(key):
    assert is_bookkeeping(key)


@pytest.mark.parametrize(
    "key",
    [
        "optimizer.lr",
        "lr_scale",
        "trainer.max_epochs",
        "trainer.gradient_clip_val",
        "data.root",
        "data.batch_size",
        "block.use_1x1",
        "model._target_",
        "threads",
        "callbacks.deploy_check.bench.warmup",
        "callbacks.branch_gradients.every_n_steps",
        "variant",
        "init._target_",
        "deterministic",
    ],
)
def test_keys_that_change_a_run_are_compared(key):
    assert not is_bookkeeping(key)


def test_every_ignored_pattern_says_why():
    assert BOOKKEEPING_KEYS and all(isinstance(why, str) and len(why) > 10 for why in BOOKKEEPING_KEYS.values())


def test_seeds_of_one_configuration_pool_despite_their_bookkeeping(tmp_path):
    write_sweep(tmp_path / "a", [("repconv", s, 0.1) for s in (0, 1)])
    resumed_elsewhere = {
        "config/hydra.job.num": 7,
        "config/analysis.by": '["variant"]',
        "config/logger.wandb.offline": False,
        "config/ckpt_path": "x.ckpt",
    }
    write_sweep(tmp_path / "b", [("repconv", 2, 0.1)], **resumed_elsewhere)
    runs = collect_runs(tmp_path)
    assert check_pooling(runs, ["variant"]) == {}
    assert ablation_table(runs, metrics=[ACC])[(ACC, "n")].tolist() == [3]


# --- figures and the report pool the same way -------------------------------------------------------------------


def test_figures_refuse_what_the_table_refuses(lr_sweep, tmp_path):
    runs = collect_runs(lr_sweep)
    for draw in (accuracy_vs_latency, forms_comparison):
        with pytest.raises(PoolingError, match="optimizer.lr"):
            draw(runs)
    with pytest.raises(PoolingError, match="optimizer.lr"):
        load_branch_gradients(runs)  # its figure and the notebook average the runs of each variant
    figure = accuracy_vs_latency(runs, by=["variant", "optimizer.lr"])
    legend = figure.axes[0].get_legend()
    assert legend.get_title().get_text() == "variant,optimizer.lr"
    assert sorted(t.get_text() for t in legend.get_texts()) == ["repconv,0.1", "repconv,1000"]
    assert len(accuracy_vs_latency(runs, pool=["optimizer.lr"]).axes[0].get_legend().get_texts()) == 1
    assert load_branch_gradients(runs, pool=True)["run_dir"].nunique() == 4


def test_report_refuses_or_splits_or_pools(lr_sweep, tmp_path):
    runs = collect_runs(lr_sweep)
    with pytest.raises(PoolingError):
        write_report(runs, tmp_path / "refused", metrics=[ACC])
    assert not (tmp_path / "refused").exists()  # nothing half-written
    split = write_report(runs, tmp_path / "split", by=["variant", "optimizer.lr"], metrics=[ACC])
    assert not split.skipped and len(split.table) == 2
    pooled = write_report(runs, tmp_path / "pooled", metrics=[ACC], pool=["optimizer.lr"], draw_figures=False)
    assert "pooled on purpose: optimizer.lr (0.1, 1000)" in pooled.files["markdown"].read_text()


@pytest.mark.slow
def test_cli_refuses_with_the_fix_and_pools_when_told(lr_sweep, tmp_path):
    refused = run_cli(str(lr_sweep), "--metrics", ACC, "--out", str(tmp_path / "a"), "--no-figures")
    assert refused.returncode == 2 and "optimizer.lr = 0.1 (2 runs) | 1000 (2 runs)" in refused.stderr
    assert "--by variant,optimizer.lr" in refused.stderr
    split = run_cli(
        str(lr_sweep), "--by", "variant,optimizer.lr", "--metrics", ACC, "--out", str(tmp_path / "b"), "--no-figures"
    )
    assert split.returncode == 0, split.stderr
    assert list(pd.read_csv(tmp_path / "b" / "table.csv", index_col=0).index) == ["repconv,0.1", "repconv,1000"]
    for flags in (["--pool", "optimizer.lr"], ["--pool-all"]):
        pooled = run_cli(str(lr_sweep), *flags, "--metrics", ACC, "--out", str(tmp_path / "c"), "--no-figures")
        assert pooled.returncode == 0, pooled.stderr
        assert "pooled on purpose: optimizer.lr (0.1, 1000)" in pooled.stdout
        assert pd.read_csv(tmp_path / "c" / "table.csv", index_col=0)[f"{ACC} n"].tolist() == [4]

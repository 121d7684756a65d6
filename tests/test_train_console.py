"""What a run prints: the summary that closes every run, and a console with each log line once."""

from __future__ import annotations

import logging
import warnings

from repablate.train.console import quiet_console, quiet_wandb, run_summary

COMPLETED = {
    "status": "completed",
    "variant": "repconv",
    "seed": 3,
    "wall_time_s": 12.34,
    "train_form/test/acc": 0.9778,
    "deploy_form/test/acc": 0.97777,
    "train_form/params": 37034,
    "deploy_form/params": 32874,
    "ratio/params": 1.1265,
    "train_form/flops": 21.6e6,
    "deploy_form/flops": 19.5e6,
    "ratio/flops": 1.108,
    "train_form/latency_ms": 1.83,
    "deploy_form/latency_ms": 0.818,
    "ratio/latency_ms": 2.237,
    "equivalence/max_rel": 3.9e-7,
    "equivalence/max_abs": 6.7e-6,
}


def test_summary_of_a_completed_run_compares_the_forms_and_ends_on_the_results_path():
    lines = run_summary(COMPLETED, "/runs/x/results.json").splitlines()
    assert lines[0] == "repconv seed 3: completed in 12.3 s"
    assert lines[1].split() == ["training", "form", "deployed", "ratio"]
    assert lines[2].split() == ["test", "accuracy", "0.9778", "0.9778"]
    assert lines[3].split() == ["params", "37,034", "32,874", "1.13x"]
    assert lines[4].split() == ["FLOPs", "21.6", "M", "19.5", "M", "1.11x"]
    assert lines[5].split() == ["latency", "ms", "1.83", "0.818", "2.24x"]
    assert lines[6] == "  equivalence: max relative error 3.9e-07 (max abs 6.7e-06)"
    assert lines[-1] == "  results: /runs/x/results.json"
    assert len({len(line) for line in [lines[1], *lines[3:6]]}) == 1  # one table, right-aligned
    assert len(lines[2]) == lines[1].index("deployed") + len("deployed")  # no ratio for a metric


def test_summary_of_a_detection_run_shows_its_map():
    record = {
        **{k: v for k, v in COMPLETED.items() if "/test/" not in k},
        "train_form/test/map50": 0.61,
        "deploy_form/test/map50": 0.61,
        "train_form/test/map": 0.4,
        "deploy_form/test/map": 0.4,
    }
    lines = run_summary(record, "r.json").splitlines()
    assert [line.split()[:2] for line in lines[2:4]] == [["test", "mAP@0.5"], ["test", "mAP@0.5:0.95"]]
    assert "accuracy" not in "\n".join(lines)


def test_summary_of_a_run_that_did_not_complete_says_how_it_ended():
    diverged = {
        "status": "diverged",
        "variant": "plain",
        "seed": 0,
        "wall_time_s": 2.0,
        "diverged_at_step": 17,
        "error": "TrainingDiverged: ...",
        "epochs": 1,
        "train_form/test/acc": None,
    }
    assert run_summary(diverged, "r.json").splitlines() == [
        "plain seed 0: diverged at step 17 in 2.0 s",
        "  results: r.json",
    ]
    failed = {"status": "failed", "variant": "plain", "seed": 0, "error": "ConfigError: ..."}  # no wall time yet
    assert run_summary(failed, "r.json").splitlines() == ["plain seed 0: failed", "  results: r.json"]


def test_quiet_console_routes_lightnings_lines_through_the_root_handlers_once():
    import lightning  # noqa: F401

    lightning_logger = logging.getLogger("lightning")
    own = logging.StreamHandler()
    lightning_logger.addHandler(own)  # as Lightning adds its own on import
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    root, keep = logging.getLogger(), Keep()
    root.addHandler(keep)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            quiet_console()
            quiet_console()  # once is enough; again changes nothing
        assert own not in lightning_logger.handlers and lightning_logger.propagate
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: try our cloud")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/x'")
        assert records == ["GPU available: False, used: False"]
    finally:
        root.removeHandler(keep)
        root.setLevel(level)
        lightning_logger.removeHandler(own)


def test_quiet_wandb_drops_only_an_anonymous_argument_nobody_asked_for():
    class Logger:
        def __init__(self, anonymous):
            self._wandb_init = {"project": "p", "anonymous": anonymous}

    unasked, asked = Logger(None), Logger("allow")
    quiet_wandb([unasked, asked, object()])
    assert unasked._wandb_init == {"project": "p"} and asked._wandb_init["anonymous"] == "allow"

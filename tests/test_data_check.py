"""The dataset check (repablate.data.check) and the one image reader (repablate.data.images): every problem under
every policy, the tolerance, the report, the cache, the settings, the command line; 16-bit, EXIF, palette and
truncated images. Fixture datasets are built small in each test."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from repablate.data.check import (
    DEFAULT_POLICY,
    PROBLEMS,
    TOLERANCE,
    CheckSettings,
    Entry,
    check_dataset,
    main,
    parse_labels,
)
from repablate.data.images import is_hidden, open_image, probe_image, to_rgb

REPO = Path(__file__).resolve().parents[1]


def yolo_set(root: Path, train: dict[str, str], val: dict[str, str] | None = None, names=("x", "y")) -> Path:
    """images/{split}/<name>.png (64x32) with labels/{split}/<name>.txt holding the given text (None: no file)."""
    val = val if val is not None else {"v": "0 0.5 0.5 0.2 0.2"}
    for split, files in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            Image.new("RGB", (64, 32), (90, 20, 200)).save(root / "images" / split / f"{name}.png")
            if text is not None:
                (root / "labels" / split / f"{name}.txt").write_text(text + "\n")
    data_yaml = root / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": list(names)}))
    return data_yaml


def entries(root: Path, split: str = "train") -> list[Entry]:
    images = sorted((root / "images" / split).glob("*.png"))
    return [Entry(p, label=root / "labels" / split / f"{p.stem}.txt") for p in images]


def run_check(root: Path, policy: dict | None = None, **settings):
    return check_dataset(
        {"train": entries(root), "val": entries(root, "val")},
        source=str(root),
        settings=CheckSettings.from_config({"policy": policy or {}, **settings}),
        num_classes=2,
        cache_file=None,
    )


# --- label lines --------------------------------------------------------------------------------------------


def test_parse_labels_reads_boxes_and_names_each_bad_line():
    rows = parse_labels("0 0.5 0.5 0.2 0.2\n\n1 0.1 0.2 0.3 0.4  \n0 0.5 0.5 0.2\nx 1 2 3 4\n0 nan 0.5 0.1 0.1\n")
    assert rows[0] == [1, 0.0, 0.5, 0.5, 0.2, 0.2] and rows[1] == [3, 1.0, 0.1, 0.2, 0.3, 0.4]  # blank line 2
    assert [row[0] for row in rows] == [1, 3, 4, 5, 6]
    assert "4 fields" in rows[2][1] and "not 5 numbers" in rows[3][1] and "not finite" in rows[4][1]
    polygon = parse_labels("0 0.1 0.1 0.9 0.1 0.9 0.9")
    assert "polygon" in polygon[0][1]


CASES = [  # line, problem
    ("2 0.5 0.5 0.2 0.2", "bad_class"),
    ("0.5 0.5 0.5 0.2 0.2", "bad_class"),
    ("-1 0.5 0.5 0.2 0.2", "bad_class"),
    ("0 0.5 0.5 0.2", "malformed"),
    ("0 0.5 0.5 inf 0.2", "malformed"),
    ("0 1.3 0.5 1.6 0.2", "out_of_bounds"),  # the centre and the size outside the image
    ("0 0.95 0.5 0.2 0.2", "out_of_bounds"),  # the centre inside, an edge 0.05 outside
    ("0 0.5 0.5 0 0.2", "empty_box"),
    ("0 0.5 0.5 0.2 -0.1", "empty_box"),
    ("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2", "duplicate"),
]


@pytest.mark.parametrize("text, problem", CASES)
def test_every_problem_fails_by_default_naming_file_line_and_problem(tmp_path, text, problem):
    yolo_set(tmp_path, {"a": text, "b": "1 0.5 0.5 0.2 0.2"})
    result = run_check(tmp_path)
    assert result.failed and [p.problem for p in result.problems] == [problem]
    found = result.problems[0]
    assert found.file == str(tmp_path / "labels" / "train" / "a.txt")
    assert found.line == (2 if problem == "duplicate" else 1) and found.action == "error"
    with pytest.raises(ValueError, match=rf"(?s)a\.txt:{found.line}: {problem}: .*data\.check\.policy\.{problem}="):
        result.raise_if_failed()


@pytest.mark.parametrize("text, problem", CASES)
def test_warn_and_drop_leaves_the_image_out_and_keeps_the_others(tmp_path, text, problem):
    yolo_set(tmp_path, {"a": text, "b": "1 0.5 0.5 0.2 0.2"})
    result = run_check(tmp_path, {problem: "warn-and-drop"})
    assert not result.failed and result.problems[0].action == "image dropped"
    assert [Path(p).name for p in result.splits["train"].images] == ["b.png"]
    assert result.report["splits"]["train"]["dropped"] == 1 and result.report["summary"]["corrupt"] == 1


def test_fix_clips_out_of_bounds_boxes_to_the_image(tmp_path):
    yolo_set(tmp_path, {"a": "0 0.95 0.5 0.2 0.2\n1 0.5 -0.2 0.2 0.6"})
    result = run_check(tmp_path, {"out_of_bounds": "fix"})
    assert not result.failed and [p.action for p in result.problems] == ["clipped", "clipped"]
    # x 0.85..1.05 -> 0.85..1; y -0.5..0.1 -> 0..0.1
    expected = np.array([[0, 0.925, 0.5, 0.15, 0.2], [1, 0.5, 0.05, 0.2, 0.1]], dtype=np.float32)
    assert np.allclose(result.splits["train"].labels[0], expected)
    assert result.report["splits"]["train"]["fixed"] == 2


def test_a_box_wholly_outside_the_image_is_empty_once_clipped(tmp_path):
    yolo_set(tmp_path, {"a": "0 1.3 0.5 0.2 0.2", "b": "0 0.5 0.5 0.2 0.2"})
    result = run_check(tmp_path, {"out_of_bounds": "fix"})
    assert [(p.problem, p.action) for p in result.problems] == [("out_of_bounds", "clipped"), ("empty_box", "error")]
    dropped = run_check(tmp_path, {"out_of_bounds": "fix", "empty_box": "warn-and-drop"})
    assert not dropped.failed and len(dropped.splits["train"].images) == 1


def test_fix_keeps_one_copy_of_a_duplicated_line(tmp_path):
    yolo_set(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2"})
    result = run_check(tmp_path, {"duplicate": "fix"})
    assert [(p.line, p.detail) for p in result.problems] == [(3, "repeats line 1"), (4, "repeats line 1")]
    assert np.array_equal(
        result.splits["train"].labels[0], np.float32([[0, 0.5, 0.5, 0.2, 0.2], [1, 0.3, 0.3, 0.1, 0.1]])
    )


def test_edges_within_the_tolerance_are_clipped_without_a_report(tmp_path):
    yolo_set(tmp_path, {"a": "0 0.5 0.5 1.0008 0.2"})  # edges at -0.0004 and 1.0004
    result = run_check(tmp_path)
    assert not result.failed and not result.problems and result.report["summary"]["within_tolerance"] == 1
    assert np.allclose(result.splits["train"].labels[0], [[0, 0.5, 0.5, 1.0, 0.2]])
    assert run_check(tmp_path, tolerance=0).problems[0].problem == "out_of_bounds"
    assert TOLERANCE == 1e-3


def test_backgrounds_objects_and_unreadable_images_are_counted(tmp_path):
    yolo_set(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n1 0.2 0.2 0.1 0.1", "b": None, "c": "", "d": "0 0.5 0.5 0.2 0.2"})
    (tmp_path / "images" / "train" / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = run_check(tmp_path, {"unreadable": "warn-and-drop"})
    train = result.report["splits"]["train"]
    assert (train["images"], train["kept"], train["backgrounds"], train["objects"], train["corrupt"]) == (4, 3, 2, 2, 1)
    assert result.problems[0].file.endswith("d.png") and result.problems[0].problem == "unreadable"
    assert "train: 4 images, 2 backgrounds, 2 objects, 1 corrupt (unreadable 1); 1 dropped" in result.summary()


def test_a_split_without_labels_or_objects_cannot_pass(tmp_path):
    yolo_set(tmp_path, {"a": None, "b": None})
    result = run_check(tmp_path)
    assert result.failed and result.problems[-1].problem == "no_labels"
    assert "labels/train/a.txt" in result.problems[-1].detail
    yolo_set(tmp_path / "empty", {"a": ""})
    assert run_check(tmp_path / "empty").problems[-1].problem == "no_objects"


# --- the report and the cache -------------------------------------------------------------------------------


def test_the_report_lists_every_problem_and_is_strict_json(tmp_path):
    yolo_set(tmp_path / "d", {"a": "0 1.3 0.5 1.6 0.2\n0 0.5 0.5 0 0.1", "b": "0 0.5 0.5 0.2 0.2"})
    report = tmp_path / "run" / "dataset_report.json"
    result = check_dataset(
        {"train": entries(tmp_path / "d"), "val": entries(tmp_path / "d", "val")},
        source="set",
        settings=CheckSettings(),
        num_classes=2,
        report_path=report,
    )
    written = json.loads(report.read_text())
    assert written == json.loads(json.dumps(result.report)) and written["status"] == "failed"
    assert written["summary"]["problems"] == {"out_of_bounds": 1, "empty_box": 1}
    assert written["summary"]["images"] == 3 and written["summary"]["corrupt"] == 1
    assert [(p["line"], p["problem"], p["action"]) for p in written["problems"]] == [
        (1, "out_of_bounds", "error"),
        (2, "empty_box", "error"),
    ]
    assert written["policy"] == DEFAULT_POLICY and written["tolerance"] == TOLERANCE
    assert [p.name for p in report.parent.iterdir()] == ["dataset_report.json"]  # no temporary file left


def test_the_cache_rereads_only_changed_files(tmp_path):
    yolo_set(tmp_path, {f"i{n}": "0 0.5 0.5 0.2 0.2" for n in range(5)})
    settings = CheckSettings()
    cache = settings.cache_file(tmp_path)
    assert cache == tmp_path / ".repablate_check.json"

    def check(policy=None):
        return check_dataset(
            {"train": entries(tmp_path)},
            source="s",
            settings=CheckSettings.from_config({"policy": policy or {}}),
            num_classes=2,
            cache_file=cache,
        )

    first = check().report["cache"]
    assert (first["images_decoded"], first["label_files_read"]) == (5, 5)
    assert json.loads(cache.read_text())["version"] == 1
    again = check().report["cache"]
    assert (again["images_decoded"], again["label_files_read"]) == (0, 0)
    (tmp_path / "labels" / "train" / "i2.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "train" / "i4.png")
    changed = check()
    assert (changed.report["cache"]["images_decoded"], changed.report["cache"]["label_files_read"]) == (1, 1)
    assert changed.problems[0].problem == "duplicate"
    # The policy is applied after the cache: changing it needs no re-read and changes the verdict.
    fixed = check({"duplicate": "fix"})
    assert not fixed.failed and fixed.report["cache"]["images_decoded"] == 0
    cache.write_text("{not json")  # a damaged cache is ignored and rewritten
    assert check().report["cache"]["images_decoded"] == 5 and json.loads(cache.read_text())["images"]


def test_the_cache_goes_under_repablate_cache_when_the_dataset_is_read_only(tmp_path, monkeypatch):
    monkeypatch.setenv("REPABLATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("repablate.data.check.os.access", lambda path, mode: False)
    where = CheckSettings().cache_file(tmp_path / "data")
    assert where.parent == tmp_path / "cache" / "dataset_check" and where.name.startswith("data-")
    assert CheckSettings(cache_dir=str(tmp_path / "c")).cache_file(tmp_path / "data").parent == tmp_path / "c"
    assert CheckSettings(cache=False).cache_file(tmp_path) is None


# --- settings and configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "check, message",
    [
        ({"policy": {"bad_class": "fix"}}, "bad_class='fix' is not allowed: use error or warn-and-drop"),
        ({"policy": {"out_of_bounds": "clip"}}, "use error or warn-and-drop or fix"),
        ({"policy": {"typo": "error"}}, "policy.typo is not allowed"),
        ({"tolerance": -1}, "tolerance=-1"),
        ({"workers": 0}, "workers=0"),
        ({"polcy": {}}, "data.check.polcy is not allowed"),
    ],
)
def test_bad_settings_are_refused_naming_what_is_allowed(check, message):
    with pytest.raises(ValueError, match=message):
        CheckSettings.from_config(check)


def test_the_configs_spell_out_the_code_defaults(compose_config, tmp_path):
    cfg = compose_config(
        "task=detect", "model=yolov7_tiny", "data=yolo", "data.data_yaml=x", "data_shape.num_classes=2"
    )
    from omegaconf import OmegaConf

    check = OmegaConf.to_container(cfg.data.check)
    assert check["policy"] == DEFAULT_POLICY and set(DEFAULT_POLICY) == set(PROBLEMS)
    assert CheckSettings.from_config(check) == CheckSettings()
    assert cfg.data.report_path == str(tmp_path / "run" / "dataset_report.json")
    folder = compose_config("data=imagefolder", "data.root=x", "data.check.policy.unreadable=warn-and-drop")
    assert CheckSettings.from_config(folder.data.check).policy["unreadable"] == "warn-and-drop"


# --- python -m repablate.data.check -------------------------------------------------------------------------


def test_the_command_line_checks_a_data_config_alone(tmp_path, capsys):
    data_yaml = yolo_set(tmp_path / "d", {"a": "0 1.3 0.5 1.6 0.2", "b": "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2"})
    report = tmp_path / "report.json"
    # No data_shape.num_classes: the check takes it from the data YAML's names.
    assert main(["data=yolo", f"data.data_yaml={data_yaml}", "--report", str(report)]) == 1
    out = capsys.readouterr().out
    assert "a.txt:1: out_of_bounds" in out and "b.txt:2: duplicate" in out and "failed" in out
    assert json.loads(report.read_text())["summary"]["problems"] == {"out_of_bounds": 1, "duplicate": 1}
    fixed = ["data.check.policy.out_of_bounds=fix", "data.check.policy.duplicate=fix"]
    assert main(["data=yolo", f"data.data_yaml={data_yaml}", *fixed]) == 0
    assert "passed" in capsys.readouterr().out
    assert main(["data=yolo", f"data.data_yaml={tmp_path / 'none.yaml'}"]) == 2
    assert "none.yaml" in capsys.readouterr().err
    assert main(["data=nosuch"]) == 2
    assert main(["data=digits"]) == 0 and "nothing to check" in capsys.readouterr().out


def test_python_dash_m_runs_the_check(tmp_path):
    data_yaml = yolo_set(tmp_path / "d", {"a": "0 0.5 0.5 0.2 0.2"})
    done = subprocess.run(
        [sys.executable, "-m", "repablate.data.check", "data=yolo", f"data.data_yaml={data_yaml}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "train: 1 images, 0 backgrounds, 1 objects, 0 corrupt" in done.stdout


# --- the image reader ---------------------------------------------------------------------------------------


def _png16(path: Path, values: np.ndarray) -> None:
    """A 16-bit PNG written by hand (Pillow writes no 16-bit RGB): greyscale (h, w) or RGB (h, w, 3)."""
    colour = 2 if values.ndim == 3 else 0
    height, width = values.shape[:2]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values.reshape(height, -1))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("rgb", [False, True])
def test_16_bit_pngs_are_scaled_not_clipped(tmp_path, rgb):
    values = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    values[0, :3] = [0, 257 * 100, 65535]
    _png16(tmp_path / "a.png", np.stack([values] * 3, -1) if rgb else values)
    pixels = np.asarray(open_image(tmp_path / "a.png"))
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert pixels[0, :3, 0].tolist() == [0, 100, 255]
    assert (pixels == 255).mean() < 0.01  # clipping made 99.8% of them 255
    assert np.abs(pixels[..., 0].astype(int) - values / 257).max() <= 1


def test_other_modes_become_8_bit_rgb():
    grey = to_rgb(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)))  # mode F in [0, 1]
    assert np.asarray(grey)[0, 0].tolist() == [128, 128, 128]
    palette = Image.new("P", (4, 4))
    palette.info["transparency"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow warns when palette transparency is converted straight to RGB
        assert to_rgb(palette).mode == "RGB"
    assert to_rgb(Image.new("CMYK", (2, 2))).mode == "RGB" and to_rgb(Image.new("LA", (2, 2))).mode == "RGB"


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((50, 100, 3), dtype=np.uint8)
    stored[:, :50] = (255, 0, 0)  # left half red, right half blue, as stored
    stored[:, 50:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the stored left half is the top
    Image.fromarray(stored).save(tmp_path / "a.jpg", exif=exif.tobytes(), quality=95)
    upright = np.asarray(open_image(tmp_path / "a.jpg"))
    assert upright.shape == (100, 50, 3) and probe_image(tmp_path / "a.jpg") == (50, 100)
    assert upright[20, 25, 0] > 200 and upright[80, 25, 2] > 200


def test_unreadable_files_raise_naming_the_file(tmp_path):
    good = tmp_path / "a.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "b.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (truncated, tmp_path / "missing.png"):
        with pytest.raises(OSError, match=str(path.name)):
            open_image(path)
        with pytest.raises(OSError):
            probe_image(path)
    assert probe_image(good) == (64, 64)
    assert all(is_hidden(name) for name in ("._a.jpg", "__MACOSX", ".ipynb_checkpoints", ".DS_Store"))
    assert not is_hidden("a.jpg")

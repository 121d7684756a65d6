"""repablate.results: flattening of the config, and the one atomic writer (bytes, text, a stream callback, JSON)."""

from __future__ import annotations

import json
import math
import stat

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from repablate.results import RUN_STATUSES, STATUSES, flatten, write_atomically, write_json

keys = st.text("abcxyz_", min_size=1, max_size=4)
leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
trees = st.recursive(
    leaves | st.lists(st.integers(), max_size=3),
    lambda children: st.dictionaries(keys, children, min_size=1, max_size=3),
    max_leaves=12,
)


def _leaves(tree, path=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*path, key))
    else:
        yield path, tree


@given(st.dictionaries(keys, trees, min_size=1, max_size=4))
def test_flatten_keeps_every_leaf_under_its_dotted_path(config):
    flat = flatten(config)
    expected = {"config/" + ".".join(path): json.dumps(v) if isinstance(v, list) else v for path, v in _leaves(config)}
    assert flat == expected


def test_statuses_a_run_writes_come_first():
    assert STATUSES[: len(RUN_STATUSES)] == RUN_STATUSES == ("completed", "failed", "diverged", "interrupted")
    assert STATUSES[len(RUN_STATUSES) :] == ("missing", "invalid")


def test_json_is_strict_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "run" / "results.json"
    write_json(path, {"a/b": 1.5, "nan": math.nan, "inf": -math.inf, "path": tmp_path, "ok": True})
    write_json(path, {"a/b": 2.5})  # replaces, never appends
    assert json.loads(path.read_text(), parse_constant=lambda c: 1 / 0) == {"a/b": 2.5}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
    write_json(path, {"nan": math.nan, "path": tmp_path, "nested": {"x": (1, math.inf)}})
    assert json.loads(path.read_text()) == {"nan": None, "path": str(tmp_path), "nested": {"x": [1, None]}}


@pytest.mark.parametrize("content", [b"\x00bytes", "text, ünïcode", lambda stream: stream.write(b"streamed")])
def test_every_kind_of_content_lands_whole_and_readable_by_all(content, tmp_path):
    path = write_atomically(tmp_path / "deep" / "file.bin", content)
    expected = content(_Sink()) if callable(content) else content
    assert path.read_bytes() == (expected.encode() if isinstance(expected, str) else expected)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


class _Sink:
    def write(self, data):
        return data


def test_torch_save_through_the_stream_loads_back(tmp_path):
    checkpoint = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "deploy": True}
    path = write_atomically(tmp_path / "deploy.pt", lambda stream: torch.save(checkpoint, stream))
    loaded = torch.load(path, weights_only=True)
    assert loaded["deploy"] is True and torch.equal(loaded["state_dict"]["w"], checkpoint["state_dict"]["w"])


def test_a_failed_write_keeps_the_old_file_and_no_temporary_one(tmp_path):
    target = write_atomically(tmp_path / "run" / "results.json", "old")

    def half_then_crash(stream):
        stream.write(b"new, but only half")
        raise KeyboardInterrupt  # BaseExceptions too: a Ctrl+C mid-write leaves the old file

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, half_then_crash)
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]

"""results.json writing: flattening of the config and the atomic, strict-JSON write."""

from __future__ import annotations

import json
import math

from hypothesis import given
from hypothesis import strategies as st

from repablate.train.results import flatten, write_json_atomically

keys = st.text("abcxyz_", min_size=1, max_size=4)
leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
trees = st.recursive(leaves | st.lists(st.integers(), max_size=3), lambda children: st.dictionaries(keys, children,
                     min_size=1, max_size=3), max_leaves=12)


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


def test_write_is_strict_json_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "run" / "results.json"
    write_json_atomically({"a/b": 1.5, "nan": math.nan, "inf": -math.inf, "path": tmp_path, "ok": True}, path)
    write_json_atomically({"a/b": 2.5}, path)  # replaces, never appends
    assert json.loads(path.read_text(), parse_constant=lambda c: 1 / 0) == {"a/b": 2.5}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
    write_json_atomically({"nan": math.nan, "path": tmp_path}, path)
    assert json.loads(path.read_text()) == {"nan": None, "path": str(tmp_path)}

"""The parameter layout (nn2run.params) from both sides: what nn2c's emitter writes and what
nn2run's Model reads back, and hand-made map entries resolved as the module documents."""

from __future__ import annotations

import numpy as np
import pytest

import nn2run
from nn2run import format as fmt
from nn2run import params
from support.models import build_model


def _entries(path) -> tuple[dict, dict]:
    nnb = fmt.read(str(path))
    header = dict(nnb.header)
    tensors = {k: np.array(v) for k, v in nnb.tensors.items()}
    nnb.close()
    return header, tensors


def test_a_key_the_emitter_writes_resolves_in_the_model_to_the_same_logical_array(tmp_path):
    path, _, logical = build_model(tmp_path / "m.nnb", "lstm", 5, 2, 4, seed=3)
    header, tensors = _entries(path)
    m = nn2run.load(path)
    assert set(header["params"]) == set(logical)
    for key, entry in header["params"].items():
        assert params.key(entry["name"], entry["layer"]) == key          # name and layer as data
        got = m.param(entry["name"], entry["layer"] or 0)
        np.testing.assert_array_equal(got, logical[key])
        stored = tensors[entry["tensor"]]
        if entry["kind"] == "matrix":       # columns of the stored tensor, transposed
            np.testing.assert_array_equal(stored[:, entry["start"]:entry["stop"]], logical[key].T)
        else:
            np.testing.assert_array_equal(stored[entry["start"]:entry["stop"]], logical[key])
    w_f = header["params"]["W_f@0"]
    assert (w_f["layer"], w_f["name"]) == (0, "W_f")
    assert w_f["tensor"] == header["params"]["W_i@0"]["tensor"]        # stacked side by side
    assert header["params"]["W_y"]["layer"] is None                   # the readout's


HAND_MADE = {
    "A@1": {"tensor": "l1.A|B", "kind": "matrix", "start": 0, "stop": 2, "name": "A", "layer": 1},
    "B@1": {"tensor": "l1.A|B", "kind": "matrix", "start": 2, "stop": 5, "name": "B", "layer": 1},
    "b": {"tensor": "readout.b", "kind": "vector", "start": 1, "stop": 3, "name": "b", "layer": None},
}
SHAPES = {"l1.A|B": (3, 5), "readout.b": (4,)}


def test_a_hand_made_entry_resolves_as_documented():
    stored = np.arange(15.0).reshape(3, 5)          # (cols of A and B, A's rows + B's rows)
    vec = np.array([10.0, 20.0, 30.0, 40.0])
    slots = params.read_map(HAND_MADE, SHAPES)
    a, b, bias = slots["A@1"], slots["B@1"], slots["b"]
    assert (a.name, a.layer, a.shape((3, 5))) == ("A", 1, (2, 3))
    np.testing.assert_array_equal(a.view(stored), [[0, 5, 10], [1, 6, 11]])
    np.testing.assert_array_equal(b.view(stored), [[2, 7, 12], [3, 8, 13], [4, 9, 14]])
    np.testing.assert_array_equal(bias.view(vec), [20, 30])
    assert params.find(slots, "b", layer=1) is bias                     # the readout has no layer
    assert params.find(slots, "A", layer=0) is None
    assert params.write_map(slots.values()) == HAND_MADE
    fresh = np.zeros((3, 5))
    a.put(fresh, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(fresh[:, :2], [[1, 4], [2, 5], [3, 6]])
    with pytest.raises(params.LayoutError, match="shape"):
        a.put(fresh, np.zeros((3, 2)))


def test_an_entry_without_name_and_layer_is_read_from_its_key():
    legacy = {k: {f: v for f, v in e.items() if f not in ("name", "layer")} for k, e in HAND_MADE.items()}
    assert params.read_map(legacy, SHAPES) == params.read_map(HAND_MADE, SHAPES)


@pytest.mark.parametrize("key, change, word", [
    ("A@1", {"layer": 0}, "says 'A@0'"),
    ("A@1", {"name": "C"}, "says 'C@1'"),
    ("A@1", {"layer": "1"}, "bad name or layer"),
    ("b", {"layer": -1}, "bad name or layer"),
    ("A@1", {"stop": 6}, "range outside"),
    ("b", {"kind": "matrix"}, "range outside"),
])
def test_an_entry_that_contradicts_itself_is_refused(key, change, word):
    bad = {**HAND_MADE, key: {**HAND_MADE[key], **change}}
    with pytest.raises(params.LayoutError, match=word):
        params.read_map(bad, SHAPES)


def test_a_legacy_key_without_a_layer_number_is_refused():
    entry = {f: v for f, v in HAND_MADE["A@1"].items() if f not in ("name", "layer")}
    with pytest.raises(params.LayoutError, match="names no layer"):
        params.read_map({"A@x": entry}, SHAPES)


def test_a_file_whose_map_lacks_name_and_layer_still_loads(tmp_path):
    path, _, logical = build_model(tmp_path / "m.nnb", "gru", 4, 2, 5, seed=2)
    header, tensors = _entries(path)
    header["params"] = {k: {f: v for f, v in e.items() if f not in ("name", "layer")}
                        for k, e in header["params"].items()}
    fmt.write(str(path), header, tensors)
    m = nn2run.load(path)
    for slot in m.param_slots():
        np.testing.assert_array_equal(m.param(slot.name, slot.layer or 0), logical[slot.key])
    assert {s.key for s in m.param_slots()} == set(logical)


def test_a_bad_entry_in_a_file_is_a_format_error(tmp_path):
    path, _, _ = build_model(tmp_path / "m.nnb", "rnn", 4, 1, 5)
    header, tensors = _entries(path)
    key = next(iter(header["params"]))
    header["params"][key] = {**header["params"][key], "layer": 7}
    fmt.write(str(path), header, tensors)
    with pytest.raises(nn2run.NNBFormatError, match="its entry says"):
        nn2run.load(path)

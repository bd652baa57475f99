"""Language-model files whose container is sound but whose model is not: one handcrafted
file per failure mode (the container's own cases are in tests/test_format.py). Each is
refused by nn2run.load with one NNBFormatError line, and by the command line with one
line and exit status 2."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import nn2run
from support.hostile import edit_header, reseal, split
from support.models import build_model


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "lstm.nnb"
    build_model(path, "lstm", 8, 2, 5, seed=1)
    return path.read_bytes()


def _constant(value):
    def change(h):
        h["program"]["code"][3][2] = ["k", value]     # add r5 ← r2, (a constant)
    return change


def _retype(name, dtype):
    def change(h):
        h["tensors"][name]["dtype"] = dtype       # the same bytes, read as integers
    return change


def _instruction(pc, ins):
    def change(h):
        h["program"]["code"][pc] = ins
    return change


CASES = {
    "softmax of a constant": (_instruction(5, ["softmax", 7, ["k", 1.0]]), "softmax takes a register of width 24"),
    "log_softmax of a vector": (_instruction(33, ["logsoftmax", 37, ["t", "readout.b_y"]]),
                                "logsoftmax takes a register"),
    "weights stored as i32": (_retype("readout.W_y", "i32"), "tensor 'readout.W_y' holds integers"),
    "a gather table stored as i32": (_retype("l0.W_f|W_i|W_o|W_c", "i32"), "holds integers"),
    "a constant past float32": (_constant(1e39), "constant must be a finite float32 number"),
    "a huge integer constant": (_constant(10 ** 90), "constant must be a finite float32 number"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_model_is_refused_with_its_reason(tmp_path, blob, case, run_cli):
    change, fragment = CASES[case]
    path = tmp_path / "bad.nnb"
    path.write_bytes(edit_header(blob, change))
    with pytest.raises(nn2run.NNBFormatError, match=fragment):
        nn2run.load(path)
    r = run_cli("nn2run", path, "-n", "5", "--seed", "1")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and fragment in r.stderr, r.stderr


def test_the_largest_float32_constant_loads_and_runs(tmp_path, blob):
    path = tmp_path / "big.nnb"
    path.write_bytes(edit_header(blob, _constant(3.4e38)))
    with nn2run.load(path) as m:
        logits, _ = m.step(np.array([1]), m.initial_state(1))
    assert logits.shape == (1, 5)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("tensor", ["readout.W_y", "l0.b_f|b_i|b_o|b_c"])
def test_a_weight_that_is_not_finite_is_refused_when_the_data_is_verified(tmp_path, blob, run_cli,
                                                                          tensor, value):
    with nn2run.load(_with_value(tmp_path, blob, tensor, value)) as m:   # not read: not checked
        assert m.vocab
    with pytest.raises(nn2run.NNBFormatError, match=f"tensor '{re.escape(tensor)}' holds NaN or infinite"):
        nn2run.load(tmp_path / "bad.nnb", verify=True)
    r = run_cli("nn2run", tmp_path / "bad.nnb", "-n", "5")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert f"tensor '{tensor}' holds NaN or infinite values" in r.stderr


def test_a_seq2seq_weight_that_is_not_finite_is_refused(tmp_path, run_cli):
    from support.seq2seq import build
    build(tmp_path / "s2s.nnb")
    path = _with_value(tmp_path, (tmp_path / "s2s.nnb").read_bytes(), None, np.nan)
    r = run_cli("nn2run", "translate", path, input="abc\n")
    assert r.returncode == 2 and r.stdout == "" and "holds NaN or infinite values" in r.stderr, r.stderr


def _with_value(tmp_path, blob, tensor, value):
    """The file with the first value of `tensor` (or of its first float tensor) set to `value`,
    its data digest recomputed."""
    _, text, data = split(blob)
    entries = json.loads(text)["tensors"]
    tensor = tensor or next(n for n, e in entries.items() if e["dtype"] == "f32" and e["nbytes"])
    data = bytearray(data)
    at = entries[tensor]["offset"]
    data[at:at + 4] = np.float32(value).tobytes()
    path = tmp_path / "bad.nnb"
    path.write_bytes(reseal(blob, data=bytes(data)))
    return path



def test_a_sigmoid_of_a_constant_runs(tmp_path, blob):
    """σ of a register is rewritten when the model is bound; of a number it runs as written
    (σ of a vector parameter: tests/test_cells.py)."""
    path = tmp_path / "s.nnb"
    path.write_bytes(edit_header(blob, _instruction(5, ["sigmoid", 7, ["k", 2.0]])))
    with nn2run.load(path) as m:
        logits, _ = m.step(np.array([1, 2]), m.initial_state(2))
    assert np.isfinite(logits).all()


def test_info_and_dis_escape_what_a_terminal_would_act_on(tmp_path, blob, run_cli):
    # the kernel source, provenance and state names are the file's words: a hostile file's
    # escape sequences and bidi controls are shown as escapes, never sent to the terminal
    def change(h):
        h["source"]["text"] = "hₜ = tanh(W xₜ)\u202e # reversed\n"
        h.setdefault("provenance", {})["corpus"] = "\x1b]0;owned\x07\x1b[2J"
    path = tmp_path / "odd.nnb"
    path.write_bytes(edit_header(blob, change))
    r = run_cli("nn2run", path, "--info", "--dis")
    assert r.returncode == 0, r.stderr
    assert "\\x1b]0;owned\\x07\\x1b[2J" in r.stdout and "tanh(W xₜ)\\u202e # reversed" in r.stdout
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]", r.stdout)

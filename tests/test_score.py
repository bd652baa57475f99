"""`nn2run score` and `nn2run.score.score`: mean bits per character of each line, checked
against a float64 NumPy Elman network written here from the model's parameters; and the
checksum of the tensor data, verified by the command line unless --no-verify."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest

import nn2run
from nn2run.score import score
from support.models import BIN, build_model

VOCAB = "abcde"                      # build_model's first five characters; no newline, so start is id 0


@pytest.fixture
def rnn(tmp_path):
    return build_model(tmp_path / "r.nnb", "rnn", 6, 2, 5, seed=3)[0]


def reference_bits(m, ids: list[int]) -> float:
    """Mean -log2 p of each id, read after the start token, in float64:
    hₜ = tanh(W_h xₜ + U_h hₜ₋₁ + b_h) per layer (xₜ one-hot, then the layer below's hₜ),
    logits = W_y hₜ + b_y."""
    p = {}
    for key in m.param_names():
        name, _, layer = key.partition("@")
        p[key] = np.asarray(m.param(name, int(layer or 0)), np.float64)
    h = [np.zeros(m.hidden) for _ in range(m.layers)]
    total = 0.0
    for prev, target in zip([0] + ids[:-1], ids):
        x = np.eye(len(m.vocab))[prev]
        for layer in range(m.layers):
            h[layer] = np.tanh(p[f"W_h@{layer}"] @ x + p[f"U_h@{layer}"] @ h[layer] + p[f"b_h@{layer}"])
            x = h[layer]
        z = p["W_y"] @ x + p["b_y"]
        log_p = z - z.max() - np.log(np.exp(z - z.max()).sum())
        total -= log_p[target] / math.log(2)
    return total / len(ids)


LINES = ["abcab", "e", "dcbaabcdeeda", "ba"]


def test_score_matches_a_float64_reference_for_lines_of_different_lengths_in_one_batch(rnn):
    m = nn2run.load(rnn)
    ids = [[VOCAB.index(c) for c in line] for line in LINES]
    got = score(m, ids)
    assert [n for _, n in got] == [len(line) for line in LINES]
    np.testing.assert_allclose([b for b, _ in got], [reference_bits(m, i) for i in ids], rtol=1e-5)


def test_score_of_an_empty_line_is_nan_and_bad_ids_are_refused(rnn):
    m = nn2run.load(rnn)
    (bits, n), = score(m, [[]])
    assert math.isnan(bits) and n == 0
    with pytest.raises(ValueError, match="token id 5 is outside"):
        score(m, [[0, 5]])


def _score_cli(model, text: str, *args):
    return subprocess.run([str(BIN / "nn2run"), "score", str(model), *args], input=text.encode(),
                          capture_output=True, timeout=120)


def test_score_command_prints_bits_a_tab_and_the_line(rnn):
    m = nn2run.load(rnn)
    r = _score_cli(rnn, "".join(line + "\n" for line in LINES))
    assert r.returncode == 0 and r.stderr == b""
    rows = [row.split("\t") for row in r.stdout.decode().splitlines()]
    assert [line for _, line in rows] == LINES
    for (bits, line) in rows:
        assert float(bits) == pytest.approx(reference_bits(m, [VOCAB.index(c) for c in line]), abs=1e-4)


def test_score_keeps_input_order_across_batches_and_strips_crlf(rnn):
    m = nn2run.load(rnn)
    lines = [VOCAB[i % 5] * (1 + i % 7) + VOCAB[(i * 3) % 5] for i in range(300)]   # > one 256-line batch
    r = _score_cli(rnn, "".join(line + "\r\n" for line in lines))
    rows = [row.split("\t") for row in r.stdout.decode().splitlines()]
    assert [line for _, line in rows] == lines
    for k in (0, 255, 256, 299):
        want = reference_bits(m, [VOCAB.index(c) for c in lines[k]])
        assert float(rows[k][0]) == pytest.approx(want, abs=1e-4)


def test_score_jsonl_gives_one_object_per_line(rnn):
    m = nn2run.load(rnn)
    r = _score_cli(rnn, "abcab\n\nba\n", "--jsonl")
    objs = [json.loads(row) for row in r.stdout.decode().splitlines()]
    assert [(o["line"], o["tokens"], o["text"]) for o in objs] == [(1, 5, "abcab"), (2, 0, ""), (3, 2, "ba")]
    assert objs[1]["bits_per_token"] is None
    assert objs[0]["bits_per_token"] == pytest.approx(reference_bits(m, [0, 1, 2, 0, 1]), abs=1e-5)


def test_score_names_the_line_with_an_unknown_character(rnn):
    r = _score_cli(rnn, "abc\nabZ\n")
    assert r.returncode == 1 and "Traceback" not in r.stderr.decode()
    assert r.stderr.decode().startswith("nn2run: line 2: ") and "'Z'" in r.stderr.decode()


@pytest.mark.parametrize("args", [[], ["--jsonl"]])
def test_the_lines_before_an_unknown_character_are_scored_and_printed(rnn, args):
    m = nn2run.load(rnn)
    r = _score_cli(rnn, "abc\n\nba\nabZ\nb\n", *args)
    assert r.returncode == 1 and r.stderr.decode().splitlines() == [r.stderr.decode().strip()]
    assert r.stderr.decode().startswith("nn2run: line 4: ")
    rows = r.stdout.decode().splitlines()
    if args:
        rows = [(str(o["bits_per_token"]), o["text"]) for o in map(json.loads, rows)]
    else:
        rows = [row.split("\t") for row in rows]
    assert [line for _, line in rows] == ["abc", "", "ba"]
    for (bits, line) in (rows[0], rows[2]):
        assert float(bits) == pytest.approx(reference_bits(m, [VOCAB.index(c) for c in line]), abs=1e-4)


# --- the checksum of the tensor data ------------------------------------------------------
@pytest.fixture
def corrupt(tmp_path):
    """A model whose first data byte (the low byte of a float) was changed after writing."""
    from nn2run.format import read
    path = build_model(tmp_path / "c.nnb", "rnn", 6, 1, 5, seed=3)[0]
    nnb = read(str(path))
    start = nnb._data_range[0]
    nnb.close()
    blob = bytearray(path.read_bytes())
    blob[start] ^= 0x01
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.parametrize("before, after", [([], ["-n", "3"]), (["score"], [])])
def test_the_command_line_verifies_the_tensor_data_by_default(corrupt, before, after):
    r = subprocess.run([str(BIN / "nn2run"), *before, str(corrupt), *after], input=b"ab\n",
                       capture_output=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.decode() == f"nn2run: cannot load {corrupt}: data checksum mismatch (the tensor data is corrupt)\n"


@pytest.mark.parametrize("flag, code", [("--no-verify", 0), ("--verify", 2)])
def test_no_verify_skips_the_check_and_verify_is_accepted(corrupt, flag, code):
    r = subprocess.run([str(BIN / "nn2run"), str(corrupt), flag, "-n", "3"], capture_output=True, timeout=120)
    assert r.returncode == code, r.stderr
    assert len(r.stdout) == (3 if code == 0 else 0)


def test_the_python_api_verifies_only_when_asked(corrupt):
    nn2run.load(corrupt).close()                       # the default: verify=False
    with pytest.raises(nn2run.NNBFormatError, match="checksum"):
        nn2run.load(corrupt, verify=True)

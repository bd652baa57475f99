"""`nn2run translate` through subprocess pipelines (expected translations from the Python
API, which tests/test_seq2seq_runtime.py checks against a reference)."""

from __future__ import annotations

import subprocess

import pytest

import nn2run
from support import seq2seq as s2s
from support.models import BIN, build_model

NN2RUN = str(BIN / "nn2run")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path, _ = s2s.build(tmp_path_factory.mktemp("cli") / "m.nnb", seed=4)
    return path


@pytest.fixture(scope="module")
def model(model_path):
    with nn2run.load(model_path) as m:
        yield m


def run(*args, stdin: str = ""):
    return subprocess.run([NN2RUN, *map(str, args)], input=stdin.encode("utf-8"), capture_output=True, timeout=60)


LINES = ["abc", "hgfedcbaabc", "a", "ddd", "bcdefgh", "h", "abab", "gggggggggggg", "ca"]


@pytest.mark.parametrize("batch", [1, 2, 4, 32])
def test_one_line_out_per_line_in_in_order_whatever_the_batch(model_path, model, batch):
    r = run("translate", model_path, "--batch", batch, stdin="\n".join(LINES) + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split("\n") == [model.translate([t])[0] for t in LINES] + [""]
    assert r.stderr == b""


def test_beam_options_and_n_best_with_scores(model_path, model):
    r = run("translate", model_path, "--beam", 3, "--n-best", 2, "--with-score", "--length-penalty", 0.5,
            stdin="\n".join(LINES[:4]) + "\n")
    assert r.returncode == 0, r.stderr
    want = model.translate(LINES[:4], beam=3, n_best=2, length_penalty=0.5)
    for line, hyps in zip(r.stdout.decode().splitlines(), want):
        fields = line.split("\t")
        assert fields[::2] == [h for h, _ in hyps]
        assert [float(x) for x in fields[1::2]] == pytest.approx([sc for _, sc in hyps], abs=1e-4)


def test_max_len_and_a_last_line_without_newline(model_path):
    r = run("translate", model_path, "--max-len", 2, stdin="abc\nhgfedcba")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode().split("\n")
    assert len(out) == 3 and out[2] == "" and all(len(t) <= 2 for t in out[:2])


def test_empty_lines_give_empty_lines(model_path, model):
    r = run("translate", model_path, stdin="\nabc\n\n\nh\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split("\n") == ["", model.translate(["abc"])[0], "", "", model.translate(["h"])[0], ""]


def test_unknown_characters_give_an_empty_line_one_message_and_exit_1(model_path, model):
    lines = ["abc", "aQb", "hh", "xyz!", "a" * 13, "bad"]
    r = run("translate", model_path, "--batch", 2, stdin="\n".join(lines) + "\n")
    assert r.returncode == 1
    expect = [model.translate([lines[0]])[0], "", model.translate(["hh"])[0], "", "", model.translate(["bad"])[0]]
    assert r.stdout.decode().split("\n") == expect + [""]
    err = r.stderr.decode().splitlines()
    assert len(err) == 3, err
    assert "line 2" in err[0] and "'Q'" in err[0]
    assert "line 4" in err[1] and all(f"'{c}'" in err[1] for c in "xyz!")
    assert "line 5" in err[2] and "limit of 12" in err[2]
    assert "Traceback" not in r.stderr.decode()


def test_each_line_is_answered_before_the_next_is_written(model_path, model):
    """A pipeline that writes a line and waits for its answer (flushed per line)."""
    proc = subprocess.Popen([NN2RUN, "translate", str(model_path), "--batch", "8"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for text in ["abc", "h", "gfe"]:
            proc.stdin.write(text.encode() + b"\n")
            proc.stdin.flush()
            assert proc.stdout.readline().decode() == model.translate([text])[0] + "\n"
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_option_errors_are_one_line(model_path):
    for args in (["--n-best", 3, "--beam", 2], ["--beam", 0], ["--batch", 0], ["--max-len", 0],
                 ["--length-penalty", -1], ["--length-penalty", 1e308], ["--beam", 10 ** 8]):
        r = run("translate", model_path, *args, stdin="abc\n")
        assert r.returncode == 2 and r.stdout == b""
        assert len(r.stderr.decode().splitlines()) == 1 and r.stderr.startswith(b"nn2run: ")


def test_translate_refuses_a_language_model_and_generate_a_seq2seq_model(tmp_path, model_path):
    lm, _, _ = build_model(tmp_path / "lm.nnb", "lstm", 8, 1, 5)
    r = run("translate", lm, stdin="abc\n")
    assert r.returncode == 2 and b"not a seq2seq model" in r.stderr
    r = run(model_path, "--prime", "abc")
    assert r.returncode == 2 and b"use nn2run translate" in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_info_and_dis_show_every_program(model_path):
    r = run(model_path, "--info")
    assert r.returncode == 0, r.stderr
    info = r.stdout.decode()
    assert "seq2seq" in info and "limits: sources up to 12 tokens, outputs up to 10" in info
    assert "encoder kernel rnn" in info and "decoder kernel seq2seq/bahdanau" in info and "W_a@2" in info
    r = run(model_path, "--dis")
    assert r.returncode == 0, r.stderr
    dis = r.stdout.decode()
    assert "; encoder" in dis and "; prepare" in dis and "; step" in dis
    assert "softmaxj r24" in dis and "sumj     r44" in dis and "starts at r5" in dis
    assert "(J×8)" in dis


def test_many_lines_across_reads_keep_their_order(model_path, model):
    import random
    rng = random.Random(3)
    lines = ["".join(rng.choice(s2s.SOURCE) for _ in range(rng.randrange(0, 13))) for _ in range(3000)]
    r = run("translate", model_path, "--batch", 16, stdin="\r\n".join(lines) + "\r\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split("\n")[:-1] == model.translate(lines)

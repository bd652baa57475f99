"""Both command lines as a user runs them: output, exit status, and failure messages."""

from __future__ import annotations

import os

import pytest

from support.models import build_model


@pytest.fixture
def model(tmp_path):
    return build_model(tmp_path / "m.nnb", "gru", 16, 2, 9, seed=2)[0]


def test_nn2run_prints_prime_then_n_generated_characters(run_cli, model):
    r = run_cli("nn2run", model, "--prime", "abc", "-n", "40", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("abc") and len(r.stdout) == 43
    assert r.stderr == ""


def test_nn2run_same_seed_same_text_other_seed_other_text(run_cli, model):
    a = run_cli("nn2run", model, "--prime", "ab", "-n", "60", "--seed", "7").stdout
    b = run_cli("nn2run", model, "--prime", "ab", "-n", "60", "--seed", "7").stdout
    c = run_cli("nn2run", model, "--prime", "ab", "-n", "60", "--seed", "8").stdout
    assert a == b and a != c


def test_nn2run_reads_the_prime_from_stdin(run_cli, model):
    r = run_cli("nn2run", model, "--prime", "-", "-n", "5", "--greedy", input="cab")
    assert r.returncode == 0 and r.stdout.startswith("cab") and len(r.stdout) == 8


def test_nn2run_unknown_prime_characters_exit_1_naming_them(run_cli, model):
    r = run_cli("nn2run", model, "--prime", "abZ!", "-n", "5")
    assert r.returncode == 1
    assert "'Z'" in r.stderr and "'!'" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_nn2run_lines_continues_every_stdin_line(run_cli, model):
    r = run_cli("nn2run", model, "--lines", "-n", "10", "--seed", "1", input="ab\ncab\nb\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [l[:len(p)] for l, p in zip(lines, ["ab", "cab", "b"])] == ["ab", "cab", "b"]
    assert len(lines) == 3


def test_nn2run_info_shows_equations_parameters_and_provenance(run_cli, model):
    r = run_cli("nn2run", model, "--info")
    assert r.returncode == 0
    for word in ("ĥₜ = φ_h", "W_z@0", "16×9", "provenance", "2 layer(s)"):
        assert word in r.stdout


def test_nn2run_dis_prints_one_instruction_a_line(run_cli, model):
    r = run_cli("nn2run", model, "--dis")
    body = [l for l in r.stdout.splitlines() if not l.startswith(";")]
    assert r.returncode == 0 and body
    assert all(l.split()[0].isdigit() for l in body)
    assert any(" gather " in l for l in body) and any(" matmul " in l for l in body)


@pytest.mark.parametrize("content", [b"", b"garbage" * 40, b"\x89NNB\r\n\x1a\n" + b"\0" * 200])
def test_nn2run_refuses_a_bad_file_with_one_line_and_exit_2(run_cli, tmp_path, content):
    bad = tmp_path / "bad.nnb"
    bad.write_bytes(content)
    r = run_cli("nn2run", bad)
    assert r.returncode == 2
    assert r.stderr.startswith(f"nn2run: cannot load {bad}: ") and r.stderr.count("\n") == 1


def test_nn2run_output_into_a_closed_pipe_ends_quietly(model):
    import subprocess

    from support.models import BIN
    r = subprocess.run(["bash", "-c", f"{BIN}/nn2run {model} -n 200000 | head -c 20"],
                       capture_output=True, text=True, timeout=60)
    assert len(r.stdout) == 20 and r.stderr == ""


def test_nn2c_check_lstm_prints_states_parameters_order_and_program(run_cli):
    r = run_cli("nn2c", "check", "lstm", "--hidden", "32", "--vocab", "10")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for word in ("states   cₜ₋₁ (H), hₜ₋₁ (H)", "W_f      H×X      32×10", "U_f      H×H      32×32",
                 "W_y      V×H      10×32", "equations in evaluation order", "program (optimized"):
        assert word in out, word
    assert out.index("fₜ = ") < out.index("cₜ = ") < out.index("hₜ = ")


def test_nn2c_check_refuses_more_layers_than_nn2run_loads_at_once(run_cli):
    r = run_cli("nn2c", "check", "lstm", "--layers", "100000", timeout=30)     # was minutes of work
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "nn2c: --layers must be ≤ 1024 (the most nn2run loads), got 100000\n"


def test_nn2c_check_reports_a_typo_with_file_line_column_and_caret(run_cli, tmp_path):
    k = tmp_path / "bad.eq"
    k.write_text("hₜ = tanh(W xₜ + U hₜ₋₁ + b\n", encoding="utf-8")
    r = run_cli("nn2c", "check", k)
    assert r.returncode == 1
    first, line, caret = r.stderr.splitlines()[:3]
    assert first.startswith(f"{k}:1:28:") and "unclosed '(' opened at 1:10" in first
    assert line.strip() == "hₜ = tanh(W xₜ + U hₜ₋₁ + b"
    assert caret.index("^") == len(line)          # where the ')' is missing
    assert "Traceback" not in r.stderr


def test_nn2c_train_then_nn2run_end_to_end(run_cli, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcabd " * 400, encoding="utf-8")
    out = tmp_path / "tiny.nnb"
    r = run_cli("nn2c", "train", corpus, "-o", out, "--hidden", "16", "--layers", "1", "--seq-len", "16",
                "--batch", "8", "--steps", "30", "--eval-every", "10")
    assert r.returncode == 0, r.stderr
    assert out.exists() and (tmp_path / "tiny.nnb.ckpt").exists()
    assert r.stdout == ""                          # messages go to stderr
    g = run_cli("nn2run", out, "--prime", "ab", "-n", "20")
    assert g.returncode == 0 and len(g.stdout) == 22
    info = run_cli("nn2run", out, "--info").stdout
    assert "corpus_sha256" in info and "val_loss" in info


def test_nn2c_samples_lists_the_bundled_kernels(run_cli):
    r = run_cli("nn2c", "samples")
    names = {l.split()[0] for l in r.stdout.splitlines()}
    assert {"lstm", "gru", "rnn", "torchgru", "mgu"} <= names


def test_nn2run_prime_from_stdin_that_is_not_utf8_is_one_line(run_cli, model):
    import subprocess

    from support.models import BIN
    r = subprocess.run([str(BIN / "nn2run"), str(model), "--prime", "-", "-n", "3"], input=b"\xff\xfeab",
                       capture_output=True, timeout=60)
    assert r.returncode == 1 and r.stderr.decode() == "nn2run: the prime is not UTF-8 text\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
@pytest.mark.parametrize("command", [
    ["check", "lstm"], ["samples"], ["quantize", "MODEL", "--dtype", "f16", "-o", "OUT"],
    ["export", "MODEL", "--onnx", "OUT"],
    ["train", "CORPUS", "-o", "OUT", "--hidden", "8", "--layers", "1", "--seq-len", "8", "--batch", "4",
     "--steps", "2", "--eval-every", "2", "--sample", "20"]])
def test_nn2c_into_a_full_stdout_is_one_line_and_exit_1(model, tmp_path, command):
    import subprocess

    from support.models import BIN
    if command[0] == "export":
        pytest.importorskip("onnx")
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcabd " * 100, encoding="utf-8")
    paths = {"MODEL": model, "OUT": tmp_path / "out", "CORPUS": corpus}
    with open("/dev/full", "wb") as full:
        r = subprocess.run([str(BIN / "nn2c"), *(str(paths.get(a, a)) for a in command)], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    said = [line for line in r.stderr.splitlines() if line.startswith("nn2c: ")]
    assert r.returncode == 1 and "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    assert len(said) == 1 and "cannot write" in said[0] and "No space left on device" in said[0], r.stderr

"""`nn2run` as a user drives it: binary data, line endings, full disks, Ctrl-C, option conflicts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from support.models import BIN, build_model


def write_model(path, codec, kernel="rnn", hidden=8, seed=0):
    """A random-weight model with the given codec (build_model's vocabulary is fixed)."""
    from nn2c.compiler.emit import logical_shapes, pack
    from nn2c.compiler.pipeline import compile_kernel
    from nn2c.compiler.pipeline import write_model as write
    compiled = compile_kernel(kernel, hidden, 1, len(codec.vocab))
    specs = compiled.network.tensors()
    rng = np.random.default_rng(seed)
    logical = {k: rng.uniform(-2, 2, s).astype(np.float32) for k, s in logical_shapes(specs).items()}
    write(path, compiled, pack(specs, logical), codec, {"test": True})
    return path


@pytest.fixture
def model(tmp_path):
    return build_model(tmp_path / "m.nnb", "gru", 16, 2, 9, seed=2)[0]


@pytest.fixture
def byte_model(tmp_path):
    from nn2run.codec import ByteCodec
    return write_model(tmp_path / "b.nnb", ByteCodec())


@pytest.fixture
def lf_model(tmp_path):
    """A char model whose vocabulary has LF, CR and backslash besides letters."""
    from nn2run.codec import CharCodec
    return write_model(tmp_path / "lf.nnb", CharCodec(list("\n\r\\abc")))


def run(*args, input: bytes | None = None, timeout: float = 120):
    return subprocess.run([str(BIN / "nn2run"), *map(str, args)], input=input, capture_output=True,
                          timeout=timeout)


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.startswith("nn2run: ") and text.count("\n") == 1 and "Traceback" not in text, text
    return text


# --- byte models round-trip binary data -------------------------------------------------
def test_codecs_say_whether_they_decode_to_bytes_or_text():
    from nn2run.codec import ByteCodec, CharCodec
    assert ByteCodec.binary and not CharCodec.binary
    assert ByteCodec().decoder()(0xE9) == b"\xe9"
    assert CharCodec(list("aé")).decoder()(1) == "é"
    assert ByteCodec().encode(b"\xff\x00") == [255, 0] and ByteCodec().encode("é") == [0xC3, 0xA9]


def test_a_byte_model_writes_the_sampled_bytes_raw(byte_model):
    import nn2run
    from nn2run.generate import generate
    from nn2run.sample import Sampler, SamplerConfig
    r = run(byte_model, "-p", "x", "-n", "3000", "--seed", "4")
    assert r.returncode == 0, r.stderr
    m = nn2run.load(byte_model)
    ids = [int(nxt[0]) for _, nxt in generate(m, [[ord("x")]], 3000, Sampler(SamplerConfig(), 4))]
    assert r.stdout == b"x" + bytes(ids)
    assert max(ids) >= 0x80                       # the bytes a UTF-8 decoder would replace


def test_a_byte_model_reads_a_raw_binary_prime_from_stdin_exactly(byte_model):
    prime = b"\xff\x00\x80\xfe\n"
    r = run(byte_model, "--prime", "-", "-n", "5", "--seed", "1", input=prime)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(prime) and len(r.stdout) == len(prime) + 5


def test_a_command_line_prime_of_a_byte_model_is_text_encoded_as_utf8(byte_model):
    r = run(byte_model, "--prime", "é", "-n", "2", "--seed", "1")
    assert r.returncode == 0 and r.stdout.startswith("é".encode()) and len(r.stdout) == 4


def test_lines_of_a_byte_model_are_bytes_with_lf_cr_and_backslash_escaped(byte_model):
    r = run(byte_model, "--lines", "-n", "0", input=b"\xff\\a\rb\r\n\x80\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"\xff\\\\a\\rb\n\x80\n"


def test_a_char_model_writes_whole_utf8_characters(tmp_path):
    import nn2run
    from nn2run.generate import generate
    from nn2run.sample import Sampler, SamplerConfig
    path = build_model(tmp_path / "u.nnb", "rnn", 8, 1, 40, seed=5)[0]     # ids ≥ 26 are U+011A… (2 bytes)
    r = run(path, "-p", "a", "-n", "500", "--seed", "9")
    m = nn2run.load(path)
    ids = [int(nxt[0]) for _, nxt in generate(m, [[0]], 500, Sampler(SamplerConfig(), 9))]
    assert max(ids) >= 26
    assert r.stdout.decode("utf-8") == "a" + "".join(m.vocab[i] for i in ids)


# --- prime and line conventions -------------------------------------------------------
def test_a_stdin_prime_loses_one_trailing_newline(model):
    r = run(model, "--prime", "-", "-n", "5", "--seed", "1", input=b"cab\n")   # echo "cab" | ...
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"cab") and len(r.stdout) == 8


def test_a_line_terminator_is_never_part_of_the_line_crlf_works_on_an_lf_model(model):
    r = run(model, "--lines", "-n", "4", "--seed", "1", input=b"ab\r\ncab\r\nb")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().split("\n")
    assert lines[-1] == "" and [len(l) for l in lines[:-1]] == [6, 7, 5]
    assert [l[:len(p)] for l, p in zip(lines, ["ab", "cab", "b"])] == ["ab", "cab", "b"]


def test_cr_inside_a_line_is_escaped_in_lines_output(lf_model):
    r = run(lf_model, "--lines", "-n", "0", input=b"a\rb\\c\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"a\\rb\\\\c\n"


def test_an_unknown_character_in_lines_names_the_line_and_the_characters(model):
    r = run(model, "--lines", "-n", "3", input=b"ab\ncab\nbZ!\n")
    assert r.returncode == 1 and r.stdout == b""
    err = one_line(r.stderr)
    assert "line 3" in err and "'Z'" in err and "'!'" in err


def test_lines_with_prime_is_refused_and_help_says_so(model):
    r = run(model, "--lines", "--prime", "ab", "-n", "3", input=b"ab\n")
    assert r.returncode == 2 and r.stdout == b""
    assert "--prime" in one_line(r.stderr)
    assert "--prime is refused with --lines" in " ".join(run(model, "--help").stdout.decode().split())


# --- sampling options -------------------------------------------------------------------
@pytest.mark.parametrize("args", [["-t", "0.5"], ["--top-k", "3"], ["--top-p", "0.9"]])
def test_greedy_with_an_explicit_sampling_option_is_one_line(model, args):
    r = run(model, "--greedy", *args, "-n", "3")
    assert r.returncode == 2 and r.stdout == b"" and "--greedy" in one_line(r.stderr)


@pytest.mark.parametrize("args", [["-t", "inf"], ["-t", "nan"], ["-t", "-1"], ["-t", "0"], ["--top-p", "nan"],
                                  ["--top-k", "-2"], ["--top-p", "-0.5"]])
def test_non_finite_or_negative_sampling_values_are_one_line(model, args):
    r = run(model, *args, "-n", "3")
    assert r.returncode == 2 and r.stdout == b""
    one_line(r.stderr)


# --- stdout that cannot be written --------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
@pytest.mark.parametrize("args, stdin", [(["-n", "10000"], None), (["--info"], None), (["--dis"], None),
                                         (["--lines", "-n", "50"], b"ab\ncab\n")])
def test_a_full_stdout_is_one_line_and_exit_1(model, args, stdin):
    with open("/dev/full", "wb") as full:
        r = subprocess.run([str(BIN / "nn2run"), str(model), *args], input=stdin, stdout=full,
                           stderr=subprocess.PIPE, timeout=120)
    assert r.returncode == 1
    assert one_line(r.stderr) == "nn2run: cannot write to stdout: No space left on device\n"


@pytest.mark.parametrize("args", [["--lines", "-n", "100000"], ["--info"]])
def test_a_closed_pipe_stays_quiet(model, args):
    r = subprocess.run(["bash", "-c", f"printf 'ab\\ncab\\n' | {BIN}/nn2run {model} {' '.join(args)} | head -c 3"],
                       capture_output=True, timeout=120)
    assert len(r.stdout) == 3 and r.stderr == b""


@pytest.mark.parametrize("args, closed, words", [
    (["MODEL", "-n", "5"], ">&-", "cannot write to stdout: it is closed"),
    (["MODEL", "--info"], ">&-", "cannot write to stdout: it is closed"),
    (["MODEL", "--prime", "-"], "<&-", "cannot read stdin: it is closed"),
    (["MODEL", "--lines"], "<&-", "cannot read stdin: it is closed"),
    (["score", "MODEL"], "<&-", "cannot read stdin: it is closed"),
    (["translate", "SEQ2SEQ"], "<&-", "cannot read stdin: it is closed"),
    (["translate", "SEQ2SEQ"], ">&-", "cannot write to stdout: it is closed")])
def test_a_stdin_or_stdout_closed_at_start_is_one_line(model, tmp_path, args, closed, words):
    from support import seq2seq as s2s
    paths = {"MODEL": model, "SEQ2SEQ": s2s.build(tmp_path / "s.nnb", seed=1)[0] if "SEQ2SEQ" in args else None}
    command = " ".join(str(paths.get(a) or a) for a in args)
    r = subprocess.run(["bash", "-c", f"{BIN}/nn2run {command} {closed}"], capture_output=True, timeout=120)
    assert r.returncode == 1 and one_line(r.stderr) == f"nn2run: {words}\n"


# --- Ctrl-C -------------------------------------------------------------------------------
def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc to see the run has started")
def test_ctrl_c_during_lines_prints_every_line_so_far_then_exits_130(model, tmp_path):
    (tmp_path / "in.txt").write_bytes(b"ab\ncab\nb\n")
    with open(tmp_path / "in.txt", "rb") as stdin:
        p = subprocess.Popen([str(BIN / "nn2run"), str(model), "--lines", "-n", "100000000", "--seed", "1"],
                             stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _cpu_seconds(p.pid) < 2.0 and time.monotonic() < deadline:   # well past start-up: generating
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == b"nn2run: interrupted\n"
    lines = out.decode().split("\n")
    assert lines[-1] == "" and len(lines) == 4
    assert all(l.startswith(prime) and len(l) > len(prime) + 10 for l, prime in zip(lines, ["ab", "cab", "b"]))


def test_lines_run_in_batches_whose_output_comes_before_stdin_ends(model):
    # each batch of LINES_BATCH lines is generated and written as soon as it is read: memory
    # stays bounded whatever the input's length, and a pipeline sees output as it is made
    from nn2run.cli import LINES_BATCH
    p = subprocess.Popen([str(BIN / "nn2run"), str(model), "--lines", "-n", "5", "--greedy"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        p.stdin.write(b"ab\n" * LINES_BATCH)
        p.stdin.flush()                             # stdin stays open
        first = []
        reader = threading.Thread(target=lambda: first.extend(p.stdout.readline() for _ in range(LINES_BATCH)),
                                  daemon=True)
        reader.start()
        reader.join(timeout=60)
        assert len(first) == LINES_BATCH, "no output until stdin ended"
        p.stdin.write(b"cab\n")
        p.stdin.close()
        rest = p.stdout.read()
        assert p.wait(timeout=60) == 0
    finally:
        p.kill()
        p.wait()
    single = run(model, "--prime", "ab", "-n", "5", "--greedy").stdout
    assert first == [single + b"\n"] * LINES_BATCH
    assert rest == run(model, "--prime", "cab", "-n", "5", "--greedy").stdout + b"\n"


@pytest.mark.parametrize("command", [[], ["score"], ["translate"]])
def test_ctrl_c_while_the_model_is_loaded_exits_130_in_one_line(model, monkeypatch, command):
    from click.testing import CliRunner

    import nn2run.cli
    import nn2run.model

    def interrupted(*args, **kwargs):           # a big file's SHA-256 takes a while
        raise KeyboardInterrupt
    monkeypatch.setattr(nn2run.model, "load", interrupted)
    result = CliRunner().invoke(nn2run.cli.main, [*command, str(model)], input="ab\n")
    assert result.exit_code == 130 and result.stderr == "nn2run: interrupted\n"


# --- JSON lines and the terminal ----------------------------------------------------------
def test_jsonl_generation_prints_one_object_with_prime_and_text(model):
    plain = run(model, "--prime", "ab", "-n", "20", "--seed", "3").stdout.decode()
    r = run(model, "--prime", "ab", "-n", "20", "--seed", "3", "--jsonl")
    assert r.returncode == 0 and r.stdout.endswith(b"\n") and r.stdout.count(b"\n") == 1
    assert json.loads(r.stdout) == {"prime": "ab", "text": plain[2:]}


def test_jsonl_lines_prints_one_object_per_input_line(model):
    plain = run(model, "--lines", "-n", "6", "--seed", "3", input=b"ab\nc\n").stdout.decode().splitlines()
    r = run(model, "--lines", "-n", "6", "--seed", "3", "--jsonl", input=b"ab\nc\n")
    objs = [json.loads(l) for l in r.stdout.decode().splitlines()]
    assert objs == [{"line": 1, "prime": "ab", "text": plain[0][2:]}, {"line": 2, "prime": "c", "text": plain[1][1:]}]


def test_jsonl_of_a_byte_model_keeps_every_byte(byte_model):
    r = run(byte_model, "--prime", "-", "-n", "300", "--seed", "2", "--jsonl", input=b"\xff\x01")
    raw = run(byte_model, "--prime", "-", "-n", "300", "--seed", "2", input=b"\xff\x01").stdout
    obj = json.loads(r.stdout)
    assert r.stdout.isascii()
    assert (obj["prime"] + obj["text"]).encode("utf-8", "surrogateescape") == raw


def test_generated_text_ends_with_a_newline_on_a_terminal_but_not_in_a_pipe(model):
    import pty
    piped = run(model, "--prime", "ab", "-n", "10", "--seed", "1").stdout
    assert not piped.endswith(b"\n")
    leader, follower = pty.openpty()
    p = subprocess.Popen([str(BIN / "nn2run"), str(model), "--prime", "ab", "-n", "10", "--seed", "1"],
                         stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    got = b""
    while True:
        try:
            chunk = os.read(leader, 1024)
        except OSError:                            # the terminal closed
            break
        if not chunk:
            break
        got += chunk
    p.wait(timeout=60)
    os.close(leader)
    assert got.replace(b"\r\n", b"\n") == piped + b"\n"


# --- the subcommand group -------------------------------------------------------------------
def test_generate_is_the_default_command(model):
    a = run(model, "-p", "ab", "-n", "10", "--seed", "5")
    b = run("generate", model, "-p", "ab", "-n", "10", "--seed", "5")
    c = run("-p", "ab", model, "-n", "10", "--seed", "5")
    assert a.returncode == 0 and a.stdout == b.stdout == c.stdout and len(a.stdout) == 12


def test_a_lazily_registered_command_is_imported_only_when_named(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from nn2run.cli import main
    (tmp_path / "nn2_extra_cmd.py").write_text(
        "import click\n@click.command()\ndef hello():\n    click.echo('hello from extra')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    main.add_lazy_command("hello", "nn2_extra_cmd:hello")
    try:
        import sys
        assert "nn2_extra_cmd" not in sys.modules
        assert "hello" in CliRunner().invoke(main, ["--help"]).output
        assert CliRunner().invoke(main, ["hello"]).output == "hello from extra\n"
    finally:
        main._lazy.pop("hello")
        main.commands.pop("hello", None)


def test_a_negative_seed_is_refused_in_one_line(model):
    """Python's random takes abs() of a negative seed: --seed -1 would give --seed 1's text."""
    r = run(model, "-n", "5", "--seed", "-1")
    assert r.returncode == 2 and r.stdout == b""
    assert one_line(r.stderr) == "nn2run: seed must be a non-negative integer, got -1\n"

"""Bad input of every kind is one clear line (`nn2c: ...` / `nn2run: ...`), a non-zero exit
and no traceback; huge corpora are streamed, huge outputs keep memory flat."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from click.testing import CliRunner

import nn2run.atomic as atomic
import nn2run.format as fmt
from nn2c.cli import main as nn2c_main
from nn2c.train.corpus import read_corpus
from support.models import BIN, build_model

SMALL = ["--hidden", "8", "--layers", "1", "--seq-len", "8", "--batch", "4", "--device", "cpu",
         "--eval-every", "10"]


def train(*args):
    """nn2c train in process; the result of a run that did not raise anything unexpected."""
    result = CliRunner().invoke(nn2c_main, ["train", *map(str, args)])
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    return result


def assert_one_line(stderr: str, tool: str, *words: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: "), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def said(stderr: str) -> list[str]:
    """The lines nn2c says about a failure (progress lines aside); never a traceback."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("nn2c:")]


def write_text(path, n_words=1500, seed=1) -> str:
    rng = random.Random(seed)
    words = "the cat sat on a mat and dog ran far away".split()
    path.write_text(" ".join(rng.choice(words) for _ in range(n_words)), encoding="utf-8")
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    return write_text(tmp_path / "corpus.txt")


# ---------------------------------------------------------------- corpora
@pytest.mark.parametrize("make, words", [
    (lambda p: None, ["no such file"]),
    (lambda p: p.mkdir(), ["is a directory"]),
    (lambda p: p.write_bytes(b""), ["is empty"]),
    (lambda p: p.write_text("hello world " * 2), ["too short", "--batch", "--seq-len"]),
    (lambda p: p.write_bytes("caf\u00e9 ".encode("latin-1") * 100), ["not UTF-8", "--codec byte"]),
    (lambda p: p.write_bytes(bytes(range(256)) * 4), ["binary", "NUL", "--codec byte"]),
    (lambda p: os.mkfifo(p), ["is a FIFO, not a regular file", "save it to a file"]),   # nobody writes: no wait
], ids=["missing", "directory", "empty", "shorter-than-a-batch", "not-utf8", "binary", "fifo"])
def test_a_corpus_that_cannot_be_trained_on_is_one_line(tmp_path, make, words):
    path = tmp_path / "corpus.txt"
    make(path)
    result = train(path, "-o", tmp_path / "m.nnb", "--steps", 5, *SMALL)
    assert result.exit_code == 1
    assert_one_line(result.stderr, "nn2c", str(path), *words)
    assert not (tmp_path / "m.nnb").exists() and not (tmp_path / "m.nnb.ckpt").exists()


def test_a_corpus_piped_to_dev_stdin_is_not_called_empty(tmp_path, corpus):
    out = tmp_path / "m.nnb"
    with open(corpus, "rb") as text:
        cat = subprocess.Popen(["cat"], stdin=text, stdout=subprocess.PIPE)
        r = subprocess.run([str(BIN / "nn2c"), "train", "/dev/stdin", "-o", str(out), *SMALL, "--steps", "2"],
                           stdin=cat.stdout, capture_output=True, text=True, timeout=120)
        cat.stdout.close()
        cat.wait()
    assert r.returncode == 1 and not out.exists()
    assert_one_line(r.stderr, "nn2c", "/dev/stdin is a FIFO, not a regular file", "save it to a file")


def test_binary_data_trains_with_the_byte_codec_the_message_suggests(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4000)))
    result = train(path, "-o", tmp_path / "m.nnb", "--steps", 5, "--codec", "byte", *SMALL)
    assert result.exit_code == 0, result.stderr
    assert len(read_corpus(str(path), "byte").codec.vocab) == 256


def test_a_corpus_in_a_subprocess_prints_no_traceback(tmp_path, run_cli):
    path = tmp_path / "latin1.txt"
    path.write_bytes("na\u00efve ".encode("latin-1") * 200)
    result = run_cli("nn2c", "train", path, "-o", tmp_path / "m.nnb", *SMALL)
    assert result.returncode == 1
    assert result.stderr == (f"nn2c: {path} is not UTF-8 text (bad byte at offset 2); "
                             "train on raw bytes with --codec byte\n")


def test_a_big_corpus_is_memory_mapped_and_encoded_without_a_copy_of_the_text(tmp_path):
    path = tmp_path / "big.txt"
    line = "".join(random.Random(0).choice("abcdefgh ijklmn\u00e9\n") for _ in range(1 << 16))
    path.write_text(line * 160, encoding="utf-8")     # ~11 MB, 10.5 M characters
    size = path.stat().st_size
    tracemalloc.start()
    try:
        corpus = read_corpus(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert corpus.ids.dtype == np.uint8 and len(corpus.ids) == len(line) * 160
    assert "".join(corpus.codec.vocab[i] for i in corpus.ids[:200]) == line[:200]
    # the ids (1 byte a character) and one chunk's work; the old reader peaked at 9x the file
    assert peak < len(corpus.ids) + 8_000_000, (peak, size)


def test_a_big_corpus_trains_one_step_in_bounded_memory(tmp_path, corpus):
    assert train(corpus, "-o", tmp_path / "warm.nnb", "--steps", 1, *SMALL).exit_code == 0  # lazy imports
    path = tmp_path / "big.txt"
    path.write_text(("the cat sat on the mat. " * 1000 + "\n") * 400, encoding="utf-8")  # ~10 MB
    size = path.stat().st_size
    tracemalloc.start()
    try:
        result = train(path, "-o", tmp_path / "m.nnb", "--steps", 1, "--val-frac", "0.001", *SMALL)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.exit_code == 0, result.stderr
    # the ids (1 byte a character) and a few MB of work; an int64 copy of the corpus would be 8x
    assert peak < size + 8_000_000, (peak, size)


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("option, value, words", [
    ("--hidden", 0, ["--hidden must be > 0"]),
    ("--layers", 0, ["--layers must be > 0"]),
    ("--seq-len", 0, ["--seq-len must be > 0"]),
    ("--batch", -4, ["--batch must be > 0"]),
    ("--steps", 0, ["--steps must be > 0"]),
    ("--checkpoint-every", 0, ["--checkpoint-every must be > 0"]),
    ("--lr", 0, ["--lr"]),
    ("--val-frac", 1, ["--val-frac"]),
    ("--sample", -1, ["--sample must be ≥ 0"]),
    ("--layers", 1025, ["--layers must be ≤ 1024"]),
])
def test_a_bad_training_option_is_one_line(tmp_path, corpus, option, value, words):
    result = train(corpus, "-o", tmp_path / "m.nnb", *SMALL, option, value)
    assert result.exit_code == 1
    assert_one_line(result.stderr, "nn2c", *words)


@pytest.mark.parametrize("task", ["lm", "seq2seq"])
def test_a_model_too_big_for_the_file_format_is_one_line(tmp_path, corpus, monkeypatch, task):
    import nn2run.header
    monkeypatch.setattr(nn2run.header, "MAX_CONTAINERS", 40)      # as a very deep model's header exceeds it
    if task == "lm":
        result = train(corpus, "-o", tmp_path / "m.nnb", *SMALL, "--steps", 2, "--eval-every", 2)
    else:
        pairs = tmp_path / "p.tsv"
        pairs.write_text("".join(f"{w}\t{w[::-1]}\n" for w in open(corpus).read().split()[:200]), encoding="utf-8")
        result = train("--task", "seq2seq", pairs, "-o", tmp_path / "m.nnb", "--hidden", 4, "--batch", 8,
                       "--steps", 2, "--eval-every", 2, "--device", "cpu")
    assert result.exit_code == 1
    line, = said(result.stderr)
    assert line.startswith(f"nn2c: cannot write {tmp_path / 'm.nnb.ckpt'}: refusing to write: header has too many")
    assert line.endswith("; nothing was written") and not (tmp_path / "m.nnb").exists()


def test_device_cuda_without_a_gpu_is_one_line(tmp_path, corpus):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = train(corpus, "-o", tmp_path / "m.nnb", *SMALL, "--device", "cuda")
    assert result.exit_code == 1
    assert_one_line(result.stderr, "nn2c", "--device cuda", "no CUDA GPU")


# ---------------------------------------------------------------- output
def test_output_in_a_missing_directory_is_refused_before_training(tmp_path, corpus):
    result = train(corpus, "-o", tmp_path / "nope" / "m.nnb", *SMALL)
    assert result.exit_code == 1
    assert_one_line(result.stderr, "nn2c", "cannot write", "does not exist")


def test_output_that_is_a_directory_is_refused(tmp_path, corpus):
    (tmp_path / "out").mkdir()
    result = train(corpus, "-o", tmp_path / "out", *SMALL)
    assert result.exit_code == 1
    assert_one_line(result.stderr, "nn2c", "cannot write", "is a directory")


def test_output_in_a_read_only_directory_is_refused(tmp_path, corpus):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a 0500 directory is writable")
        result = train(corpus, "-o", folder / "m.nnb", *SMALL)
    finally:
        folder.chmod(0o700)
    assert result.exit_code == 1
    assert_one_line(result.stderr, "nn2c", "cannot write", "not writable")


@pytest.mark.parametrize("flag", ["-o", "--checkpoint"])
def test_writing_over_the_corpus_is_refused(tmp_path, corpus, flag):
    before = open(corpus, "rb").read()
    other = ["--checkpoint", tmp_path / "c.ckpt"] if flag == "-o" else ["-o", tmp_path / "m.nnb"]
    result = train(corpus, flag, corpus, *other, *SMALL)
    assert result.exit_code == 1
    assert_one_line(result.stderr, "nn2c", "is the corpus")
    assert open(corpus, "rb").read() == before


@pytest.mark.parametrize("kernel_flag, flag", [
    ("--kernel", "-o"), ("--kernel", "--checkpoint"), ("--kernel", "--log"),
    ("--encoder", "-o"), ("--encoder", "--checkpoint"), ("--decoder", "-o"), ("--decoder", "--checkpoint")])
def test_writing_over_a_kernel_file_is_refused(tmp_path, corpus, kernel_flag, flag):
    from nn2c.lang.kernels import samples_dir
    sample = "seq2seq/bahdanau.eq" if kernel_flag == "--decoder" else "gru.eq"
    kernel = tmp_path / "k.eq"
    kernel.write_bytes((samples_dir() / sample).read_bytes())
    before = kernel.read_bytes()
    if kernel_flag == "--kernel":
        task = [corpus, *SMALL, "--steps", 2]
    else:
        pairs = tmp_path / "p.tsv"
        pairs.write_text("ab\tba\n" * 100, encoding="utf-8")
        task = ["--task", "seq2seq", pairs, "--steps", 2]
    other = {"-o": ["--checkpoint", tmp_path / "c.ckpt"]}.get(flag, ["-o", tmp_path / "m.nnb"])
    result = train(*task, kernel_flag, kernel, flag, kernel, *other)
    assert result.exit_code == 1
    assert_one_line(result.stderr, "nn2c", f"is the kernel {kernel}")
    assert kernel.read_bytes() == before


def test_checkpoint_and_output_at_the_same_path_are_refused(tmp_path, corpus):
    out = tmp_path / "m.nnb"
    result = train(corpus, "-o", out, "--checkpoint", out, *SMALL)
    assert result.exit_code == 1
    assert_one_line(result.stderr, "nn2c", "--checkpoint and --output are the same file")
    assert not out.exists()


class FullDisk:
    """`os` as nn2run.atomic (the writer of .nnb files) sees it, with a disk that fills after `room` bytes of writes."""

    def __init__(self, room: int):
        self.room = room

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        if len(data) > self.room:
            written = os.write(fd, bytes(data[:self.room]))   # a partial file, as a full disk leaves
            self.room = 0
            if written:
                return written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return os.write(fd, data)


def test_a_full_disk_leaves_no_partial_file_and_says_so_in_one_line(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(atomic, "os", FullDisk(room=1000))
    result = train(corpus, "-o", tmp_path / "m.nnb", "--steps", 20, *SMALL)
    assert result.exit_code == 1
    assert said(result.stderr) == [f"nn2c: cannot write {tmp_path / 'm.nnb.ckpt'}: No space left on device; "
                                   "nothing was written"]
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt"]


def test_a_full_disk_at_a_later_checkpoint_keeps_the_previous_one_whole(tmp_path, corpus, monkeypatch):
    disk = FullDisk(room=10 ** 9)
    monkeypatch.setattr(atomic, "os", disk)
    import nn2c.train.trainer
    real = nn2c.train.trainer.save_checkpoint

    def save(path, *args):                   # the disk fills up just before the second checkpoint
        if args[-1].step == 20:
            disk.room = 5000
        real(path, *args)

    monkeypatch.setattr(nn2c.train.trainer, "save_checkpoint", save)
    result = train(corpus, "-o", tmp_path / "m.nnb", "--steps", 30, "--checkpoint-every", 10, *SMALL)
    assert result.exit_code == 1
    ckpt = tmp_path / "m.nnb.ckpt"
    assert said(result.stderr) == [f"nn2c: cannot write {ckpt}: No space left on device; the last good "
                                   f"checkpoint is {ckpt} (step 10)"]
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt", "m.nnb.ckpt"]
    with fmt.read(ckpt, verify_data=True) as f:
        assert f.header["checkpoint"]["step"] == 10


def test_a_full_disk_when_writing_the_model_keeps_the_previous_model_whole(tmp_path, corpus, monkeypatch):
    out = tmp_path / "m.nnb"
    assert train(corpus, "-o", out, "--steps", 10, *SMALL).exit_code == 0
    before = out.read_bytes()
    disk = FullDisk(room=10 ** 9)
    monkeypatch.setattr(atomic, "os", disk)
    import nn2c.train.trainer
    real = nn2c.train.trainer.write_model

    def write(path, *args, **kwargs):        # the disk fills up after the last checkpoint
        disk.room = 3000
        real(path, *args, **kwargs)

    monkeypatch.setattr(nn2c.train.trainer, "write_model", write)
    result = train(corpus, "-o", out, "--steps", 20, *SMALL)
    assert result.exit_code == 1
    assert said(result.stderr) == [f"nn2c: cannot write {out}: No space left on device; the last good "
                                   f"checkpoint is {out}.ckpt (step 20)"]
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt", "m.nnb", "m.nnb.ckpt"]


# ---------------------------------------------------------------- nn2run
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A small model over the vocabulary a..e."""
    path = tmp_path_factory.mktemp("model") / "m.nnb"
    build_model(path, "lstm", 8, 1, 5)
    return path


def test_unknown_prime_characters_are_named(model, run_cli):
    result = run_cli("nn2run", model, "--prime", "abZz!", "-n", 5)
    assert result.returncode == 1 and result.stdout == ""
    assert_one_line(result.stderr, "nn2run", "'Z'", "'z'", "'!'")


def test_a_model_with_an_empty_vocabulary_cannot_be_loaded(tmp_path, model, run_cli):
    with fmt.read(model) as f:
        header, tensors = dict(f.header), {k: np.array(v) for k, v in f.tensors.items()}
    header["codec"] = {**header["codec"], "vocab": []}
    fmt.write(tmp_path / "empty.nnb", header, tensors)
    result = run_cli("nn2run", tmp_path / "empty.nnb", "-n", 5)
    assert result.returncode == 2 and result.stdout == ""
    assert_one_line(result.stderr, "nn2run", "cannot load", "vocabulary")


def test_prime_dash_reads_the_prime_from_stdin(model, run_cli):
    result = run_cli("nn2run", model, "--prime", "-", "-n", 10, "--seed", 3, input="abcab")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("abcab") and len(result.stdout) == 15
    assert set(result.stdout) <= set("abcde")


@pytest.mark.parametrize("args, words", [
    (["-n", "-1"], ["-n must be ≥ 0"]),
    (["--temperature", "0"], ["temperature must be > 0"]),
    (["--temperature", "-1"], ["temperature must be > 0"]),
    (["--top-p", "0"], ["top-p must be in (0, 1]"]),
    (["--top-p", "1.5"], ["top-p must be in (0, 1]"]),
    (["--top-k", "0"], ["top-k must be ≥ 1"]),
])
def test_a_bad_sampling_option_is_one_line(model, run_cli, args, words):
    result = run_cli("nn2run", model, *args)
    assert result.returncode == 2 and result.stdout == ""
    assert_one_line(result.stderr, "nn2run", *words)


def test_top_p_of_one_is_allowed(model, run_cli):
    result = run_cli("nn2run", model, "--top-p", "1", "-n", 5, "--prime", "a")
    assert result.returncode == 0 and len(result.stdout) == 6


def test_a_tiny_top_p_keeps_the_most_likely_token(model, run_cli):
    greedy = run_cli("nn2run", model, "--greedy", "-n", 30, "--prime", "a")
    result = run_cli("nn2run", model, "--top-p", "1e-300", "-n", 30, "--prime", "a", "--seed", 1)
    assert result.returncode == 0 and result.stdout == greedy.stdout


def test_a_reader_that_goes_away_ends_generation_quietly(model):
    cmd = f"set -o pipefail; '{BIN / 'nn2run'}' '{model}' -n 1000000 | head -c 20"
    result = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert len(result.stdout) == 20
    assert result.stderr == ""


def _max_rss_kb(args) -> int:
    """Peak RSS of one nn2run process (measured from a fresh parent, so no other child counts)."""
    probe = ("import resource, subprocess, sys\n"
             "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True)\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", probe, str(BIN / "nn2run"), *map(str, args)],
                         capture_output=True, text=True, timeout=300, check=True)
    return int(out.stdout)


@pytest.mark.parametrize("n", [100_000, pytest.param(1_000_000, marks=pytest.mark.slow)])
def test_generating_a_long_text_keeps_memory_flat(model, n):
    short = _max_rss_kb([model, "-n", 1000, "--seed", 1])
    long = _max_rss_kb([model, "-n", n, "--seed", 1])
    assert long - short < 4096, (short, long)      # KiB: the text is streamed, not kept

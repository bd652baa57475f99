"""`nn2c train` as a new user meets it: outputs that are not plain files, symlinks, sizes that
cannot fit, kernels that overflow, options out of range, validation off, resuming from
elsewhere or with nothing left to do, BOMs and CRLF corpora, and `nn2c samples`."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import nn2run
import nn2run.format as fmt
from nn2c.cli import main as nn2c_main
from nn2c.train.corpus import CorpusError, read_corpus
from support.models import build_model
from support.runs import one_line

SMALL = ["--hidden", "8", "--layers", "1", "--seq-len", "8", "--batch", "4", "--device", "cpu",
         "--eval-every", "10"]


def invoke(*args):
    result = CliRunner().invoke(nn2c_main, list(map(str, args)))
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    assert "Traceback" not in result.stderr
    return result


def train(*args):
    return invoke("train", *args)



def last_line(result) -> str:
    assert result.exit_code == 0, result.stderr
    return result.stderr.splitlines()[-1]


def words(n: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    vocab = "the cat sat on a mat and dog ran far away".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(words(1500), encoding="utf-8")
    return path


@pytest.fixture
def no_training(monkeypatch):
    """Training must not start: reaching the trainer is an error of the test."""
    import nn2c.train.session

    def refuse(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(nn2c.train.session, "Trainer", refuse)


def tensors(path) -> dict:
    with fmt.read(path, verify_data=True) as f:
        return {name: np.array(t) for name, t in f.tensors.items()}


# ---------------------------------------------------------------- outputs that are not files
def make_fifo(path):
    os.mkfifo(path)


def make_socket(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    return s


def make_char_device(path):
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))      # what /dev/null is
    except PermissionError:
        pytest.skip("making a device node needs root")


KINDS = [(make_fifo, "a FIFO", stat.S_ISFIFO), (make_socket, "a socket", stat.S_ISSOCK),
         (make_char_device, "a character device", stat.S_ISCHR), (os.mkdir, "a directory", stat.S_ISDIR)]


@pytest.mark.parametrize("flag", ["-o", "--checkpoint"])
@pytest.mark.parametrize("make, kind, still", KINDS, ids=["fifo", "socket", "chardev", "dir"])
def test_an_output_that_is_not_a_regular_file_is_refused_before_training(tmp_path, corpus, no_training,
                                                                          flag, make, kind, still):
    node = tmp_path / "node"
    keep = make(node)
    result = train(corpus, flag, node, *SMALL)
    one_line(result, f"cannot write {node}: it is {kind}, not a regular file")
    assert still(os.lstat(node).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "node"]
    if keep is not None:
        keep.close()


def test_a_symlink_through_to_a_fifo_is_refused_too(tmp_path, corpus, no_training):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link.nnb").symlink_to(tmp_path / "fifo")
    one_line(train(corpus, "-o", tmp_path / "link.nnb", *SMALL), "it is a FIFO")
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)


@pytest.mark.parametrize("existing", [True, False], ids=["target-exists", "dangling"])
def test_a_symlinked_output_writes_its_target_and_keeps_the_link(tmp_path, corpus, existing):
    store, work = tmp_path / "store", tmp_path / "work"
    store.mkdir(), work.mkdir()
    real, link = store / "real.nnb", work / "link.nnb"
    if existing:
        real.write_bytes(b"an older model")
        real.chmod(0o600)
    link.symlink_to(os.path.relpath(real, work))
    result = train(corpus, "-o", link, "--steps", 5, *SMALL)
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == os.path.relpath(real, work)
    assert nn2run.load(real).header["provenance"]["steps"] == 5
    assert stat.S_IMODE(real.stat().st_mode) == (0o600 if existing else 0o644)
    assert sorted(p.name for p in store.iterdir()) == ["real.nnb"]               # no temp file left
    assert sorted(p.name for p in work.iterdir()) == ["link.nnb", "link.nnb.ckpt"]


def test_the_temp_file_of_a_write_through_a_symlink_lies_beside_the_target(tmp_path, monkeypatch):
    import tempfile
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "link").symlink_to(tmp_path / "b" / "real")
    folders, real_mkstemp = [], tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: (folders.append(kw["dir"]), real_mkstemp(**kw))[1])
    fmt.write(tmp_path / "a" / "link", {"x": 1}, {})
    assert folders == [str(tmp_path / "b")]
    assert fmt.read(tmp_path / "b" / "real").header == {"x": 1}


def test_the_writer_refuses_what_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match="it is a FIFO"):
        fmt.write(tmp_path / "fifo", {}, {})
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


# ---------------------------------------------------------------- stale temp files
KILLED_WRITE = """
import os, signal, sys
from nn2run.atomic import write_atomic

def chunks():
    yield b"half of a new file"
    os.kill(os.getpid(), signal.SIGKILL)      # killed in the middle of the write

write_atomic(sys.argv[1], chunks())
"""


def temps(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_temp_file_left_by_a_killed_write_is_removed_by_the_next_write(tmp_path):
    from nn2run import atomic
    path = tmp_path / "m.nnb"
    path.write_bytes(b"the old file")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(path)], env=env, timeout=60)
    assert r.returncode == -signal.SIGKILL
    stale = temps(tmp_path)
    assert len(stale) == 1 and re.fullmatch(r"\.m\.nnb\.[a-z0-9_]{8}\.tmp", stale[0]), stale
    assert path.read_bytes() == b"the old file"
    (tmp_path / ".other.nnb.abcdefgh.tmp").write_bytes(b"another file's")     # not ours to remove
    atomic.write_atomic(path, [b"the new file"])
    assert path.read_bytes() == b"the new file"
    assert temps(tmp_path) == [".other.nnb.abcdefgh.tmp"]


def test_the_temp_file_of_a_live_writer_is_left_alone(tmp_path):
    import fcntl

    from nn2run import atomic
    path, live = tmp_path / "m.nnb", tmp_path / ".m.nnb.k3y_ab12.tmp"
    fd = os.open(live, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)          # as a writer holds its temp file until the rename
        atomic.write_atomic(path, [b"mine"])
        assert live.exists() and path.read_bytes() == b"mine"
    finally:
        os.close(fd)
    atomic.write_atomic(path, [b"again"])       # its writer is gone now
    assert not live.exists() and temps(tmp_path) == []


# ---------------------------------------------------------------- sizes that cannot fit
def lstm_parameters(hidden: int, layers: int, vocab: int) -> int:
    """The `lstm` sample: four gates a layer, each W (H×X), U (H×H), b (H); readout V×H + V."""
    gates = sum(4 * (hidden * (vocab if layer == 0 else hidden) + hidden * hidden + hidden)
                for layer in range(layers))
    return gates + vocab * hidden + vocab


def test_a_model_too_big_for_memory_is_one_line_before_anything_is_allocated(tmp_path, corpus, monkeypatch):
    import nn2c.train.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("weights were allocated")
    monkeypatch.setattr(nn2c.train.trainer, "init_tensors", refuse)
    vocab = len(set(corpus.read_text(encoding="utf-8")))
    result = train(corpus, "-o", tmp_path / "m.nnb", "--hidden", 1_000_000, "--layers", 2, "--device", "cpu")
    params = lstm_parameters(1_000_000, 2, vocab)
    need = one_line(result, "a 2×1000000 lstm needs about", f"({params:,} parameters × 32 bytes",
                    "of memory is available", "smaller --hidden")
    gib = float(re.search(r"needs about ([\d,.]+) GiB", need).group(1).replace(",", ""))
    assert gib >= params * 32 / 2 ** 30 * 0.999
    assert list(tmp_path.iterdir()) == [corpus]


def test_the_memory_limit_is_what_the_machine_has(tmp_path, corpus, monkeypatch):
    import nn2c.train.memory
    monkeypatch.setattr(nn2c.train.memory, "available_memory", lambda: 2 ** 20)
    result = train(corpus, "-o", tmp_path / "m.nnb", "--steps", 2, *SMALL, "--hidden", 64)
    one_line(result, "a 1×64 lstm needs about", "1.0 MiB of memory is available")
    monkeypatch.setattr(nn2c.train.memory, "available_memory", lambda: 2 ** 30)
    assert train(corpus, "-o", tmp_path / "m.nnb", "--steps", 2, *SMALL, "--hidden", 64).exit_code == 0


# ---------------------------------------------------------------- a kernel that overflows
OVERFLOWS = "hₜ = exp(W xₜ + U hₜ₋₁ + b)\n"


@pytest.mark.parametrize("seq_len, step", [(16, 1), (6, 2)])     # 2: the state overflows in the second window
def test_a_loss_non_finite_with_the_initial_weights_blames_the_kernel_not_the_rate(tmp_path, corpus, seq_len, step):
    kernel = tmp_path / "exp.eq"
    kernel.write_text(OVERFLOWS, encoding="utf-8")
    result = train(corpus, "-o", tmp_path / "m.nnb", "--kernel", kernel, "--steps", 5, *SMALL,
                   "--seq-len", seq_len, "--lr", "1e-6")
    line = one_line(result, f"the loss became inf at step {step}", "initial weights",
                    f"kernel {kernel} overflows as written", "--lr is not the cause")
    assert "lower --lr" not in line


# ---------------------------------------------------------------- options and names
@pytest.mark.parametrize("option, value, fragment", [
    ("--seed", -1, "--seed must be an integer from 0 to 2^63-1, got -1"),
    ("--seed", 2 ** 63, "--seed must be an integer"),
    ("--hidden", -3, "--hidden must be > 0"),
    ("--layers", -1, "--layers must be > 0"),
    ("--seq-len", -1, "--seq-len must be > 0"),
    ("--batch", 0, "--batch must be > 0"),
    ("--steps", -5, "--steps must be > 0"),
    ("--epochs", 0, "--epochs must be a finite number > 0"),
    ("--epochs", "inf", "--epochs must be a finite number > 0"),
    ("--lr", "inf", "--lr must be a finite number > 0"),
    ("--lr", "nan", "--lr must be a finite number > 0"),
    ("--clip", -1, "--clip must be a finite number > 0"),
    ("--clip", "nan", "--clip must be a finite number > 0"),
    ("--eval-every", 0, "--eval-every must be > 0"),
    ("--val-frac", -0.1, "--val-frac must be in [0, 1)"),
    ("--val-frac", "nan", "--val-frac must be in [0, 1)"),
    ("--dropout", 1, "--dropout must be in [0, 1)"),
    ("--dropout", "nan", "--dropout must be in [0, 1)"),
    ("--max-minutes", 0, "--max-minutes must be a finite number > 0"),
    ("--max-minutes", "nan", "--max-minutes must be a finite number > 0"),
    ("--checkpoint-every", -1, "--checkpoint-every must be > 0"),
])
def test_an_option_out_of_range_is_one_line_naming_it(tmp_path, corpus, no_training, option, value, fragment):
    one_line(train(corpus, "-o", tmp_path / "m.nnb", *SMALL, option, value), fragment)


def test_an_unknown_kernel_is_one_nn2c_line(tmp_path, corpus):
    for result in (train(corpus, "-o", tmp_path / "m.nnb", "-k", "nonexist", *SMALL), invoke("check", "nonexist")):
        one_line(result, "nn2c: nonexist: no kernel file or sample by this name; "
                         "samples: elman, gru, jordan, lnlstm, lstm")


def test_check_on_a_model_file_says_so_and_points_to_nn2run_info(tmp_path):
    model = build_model(tmp_path / "model.nnb", "rnn", 8, 1, 5)[0]
    one_line(invoke("check", model), f"{model}: this is an nn2 model file (.nnb), not a kernel",
             f"`nn2run --info {model}`")


# ---------------------------------------------------------------- what the run says it wrote
def test_validation_off_says_the_file_holds_the_final_weights(tmp_path, corpus):
    out = tmp_path / "m.nnb"
    line = last_line(train(corpus, "-o", out, "--steps", 12, *SMALL, "--val-frac", 0))
    assert "validation off (--val-frac 0): the file holds the final weights, step 12" in line
    assert "best" not in line
    prov = nn2run.load(out).header["provenance"]
    assert prov["best_step"] is None and prov["best_val_loss"] is None and prov["weights"].startswith("final")
    ckpt = tensors(str(out) + ".ckpt")          # the checkpoint's own tensors are the last step's weights
    for name, t in tensors(out).items():
        assert t.tobytes() == ckpt[name].tobytes(), name


def test_a_val_frac_too_small_for_the_corpus_is_refused_saying_why(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(words(3000)[:3000], encoding="utf-8")
    result = train(corpus, "-o", tmp_path / "m.nnb", *SMALL, "--seq-len", 64, "--val-frac", 0.01)
    one_line(result, "--val-frac 0.01 holds out 30 of the 3,000 tokens", "less than one validation window (65",
             "--val-frac 0 to train without validation")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]


def test_a_finished_run_names_the_checkpoint_it_keeps(tmp_path, corpus):
    out = tmp_path / "m.nnb"
    line = last_line(train(corpus, "-o", out, "--steps", 3, *SMALL))
    assert line.startswith(f"wrote {out}: ") and line.endswith(f"; checkpoint {out}.ckpt kept for --resume")
    assert (tmp_path / "m.nnb.ckpt").is_file()


@pytest.mark.parametrize("length, said", [(["--steps", 10], "--steps 10"), (["--steps", 4], "--steps 4"),
                                          (["--epochs", "0.001"], "--epochs 0.001 (1 step)")])
def test_resume_with_nothing_left_to_train_says_so_in_one_line(tmp_path, corpus, length, said):
    out = tmp_path / "m.nnb"
    assert train(corpus, "-o", out, "--steps", 10, *SMALL).exit_code == 0
    before = tensors(out)
    result = train(corpus, "-o", out, "--resume", *length)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [
        (f"nothing left to train: {out}.ckpt is at step 10, {said}; wrote {out}: 1×8 lstm, vocabulary "
        f"{len(set(corpus.read_text()))}; val loss "
        f"{nn2run.load(out).header['provenance']['best_val_loss']:.4f} (best, step 10), train loss "
        f"{nn2run.load(out).header['provenance']['train_loss']:.4f} (from the checkpoint)")]
    for name, t in tensors(out).items():
        assert t.tobytes() == before[name].tobytes(), name


def test_resume_from_another_directory_finds_the_corpus_and_says_where_a_missing_one_came_from(
        tmp_path, monkeypatch):
    (tmp_path / "run").mkdir(), (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run" / "r.txt").write_text(words(1500), encoding="utf-8")
    monkeypatch.chdir(tmp_path / "run")
    assert train("r.txt", "-o", "m.nnb", "--steps", 5, *SMALL).exit_code == 0
    out = tmp_path / "run" / "m.nnb"
    assert nn2run.load(out).header["provenance"]["corpus"] == str(tmp_path / "run" / "r.txt")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert last_line(train("-o", out, "--resume", "--steps", 8)).startswith(f"wrote {out}: ")
    moved = tmp_path / "elsewhere" / "moved.txt"
    (tmp_path / "run" / "r.txt").rename(moved)
    one_line(train("-o", out, "--resume", "--steps", 10),
             f"--resume: the corpus {tmp_path / 'run' / 'r.txt'}, recorded in {out}.ckpt, is not there",
             "give the corpus on the command line")
    assert last_line(train(moved, "-o", out, "--resume", "--steps", 10)).startswith(f"wrote {out}: ")
    assert nn2run.load(out).header["provenance"]["steps"] == 10


# ---------------------------------------------------------------- corpora: BOM, CRLF
def test_a_leading_byte_order_mark_is_not_a_token(tmp_path):
    text = words(400)
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_bytes(text.encode("utf-8"))
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    a, b = read_corpus(str(plain)), read_corpus(str(marked))
    assert "\ufeff" not in b.codec.vocab and b.codec.vocab == sorted(set(text))
    assert np.array_equal(a.ids, b.ids)
    assert b.sha256 != a.sha256                 # the file is identified as it is, mark included
    assert len(read_corpus(str(marked), "byte").ids) == len(text) + 3      # raw bytes keep it
    (tmp_path / "mark.txt").write_bytes(b"\xef\xbb\xbf")
    with pytest.raises(CorpusError, match="nothing but a byte-order mark"):
        read_corpus(str(tmp_path / "mark.txt"))


def test_a_crlf_corpus_is_noted_once_at_training_time(tmp_path):
    crlf, lf = tmp_path / "crlf.txt", tmp_path / "lf.txt"
    lines = [words(12, seed=s) for s in range(150)]
    crlf.write_bytes("\r\n".join(lines).encode("utf-8"))
    lf.write_bytes("\n".join(lines).encode("utf-8"))
    result = train(crlf, "-o", tmp_path / "a.nnb", "--steps", 2, *SMALL)
    notes = [l for l in result.stderr.splitlines() if l.startswith("nn2c:")]
    assert notes == [(f"nn2c: note: {crlf} has Windows line endings (CRLF): '\\r' is a token of the vocabulary "
                     "and generated text will have it too; convert the file (e.g. dos2unix) to train without it")]
    assert "\r" in nn2run.load(tmp_path / "a.nnb").codec.vocab
    result = train(lf, "-o", tmp_path / "b.nnb", "--steps", 2, *SMALL)
    assert result.exit_code == 0 and "nn2c: note" not in result.stderr


# ---------------------------------------------------------------- nn2c samples
def test_samples_shows_each_description_to_the_end_of_its_first_sentence():
    from nn2c.lang.kernels import sample_names, samples_dir
    result = invoke("samples")
    assert result.exit_code == 0
    entries = re.split(r"\n(?=\S)", result.stdout.strip())
    assert [e.split()[0] for e in entries] == sample_names()
    for entry in entries:
        name, text = entry.split(None, 1)
        text = " ".join(text.split())
        comment = " ".join(l.lstrip("#").strip() for l in
                           (samples_dir() / f"{name}.eq").read_text(encoding="utf-8").splitlines()
                           if l.startswith("#"))
        assert comment.startswith(text) and text.endswith("."), (name, text)
        assert comment[len(text):len(text) + 1] in ("", " "), (name, text)
    mgu = next(e for e in entries if e.startswith("mgu"))
    assert " ".join(mgu.split()).endswith("the GRU with one forget gate fₜ doing the work of both zₜ and rₜ.")


@pytest.mark.parametrize("source, first", [
    ("# Gated unit (Cho et al. 2014).\n# Notation as in X.\n", "Gated unit (Cho et al. 2014)."),
    ("# A cell, unlike gru.eq in\n# two ways. Second sentence.\n", "A cell, unlike gru.eq in two ways."),
    ("# no full stop here\n# nor here\n\nh = 1\n", "no full stop here"),
    ("hₜ = tanh(W xₜ)\n", ""),
])
def test_description_is_the_first_sentence_of_the_leading_comment(source, first):
    from nn2c.lang.kernels import description
    assert description(source) == first

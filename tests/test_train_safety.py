"""Training can be trusted with a long run: checkpoints are atomic, a run killed at any moment
resumes to exactly the weights of an uninterrupted one, Ctrl-C saves and says where, and a
loss that stops being finite stops the run without spoiling the last good checkpoint."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from click.testing import CliRunner

import nn2run
import nn2run.format as fmt
from nn2c.cli import main as nn2c_main
from support.runs import checkpoint_step, finish, nn2c, wait_for_checkpoint, write_corpus

STEPS = 600
# A tiny model, checkpointed often: ~1-2 ms a step on one core, so a run lasts about a second.
TINY = ["--hidden", "12", "--layers", "1", "--seq-len", "8", "--batch", "4", "--device", "cpu",
        "--eval-every", "50", "--checkpoint-every", "10", "--seed", "7"]







def tensors(path) -> dict:
    with fmt.read(path, verify_data=True) as f:
        return {name: np.array(t) for name, t in f.tensors.items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"tensor {name} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its corpus, model tensors and final checkpoint tensors."""
    folder = tmp_path_factory.mktemp("reference")
    corpus = write_corpus(folder / "corpus.txt")
    out = folder / "ref.nnb"
    rc, _, err = finish(nn2c(corpus, "-o", out, "--steps", STEPS, *TINY))
    assert rc == 0, err
    assert checkpoint_step(str(out) + ".ckpt") == STEPS
    return corpus, tensors(out), tensors(str(out) + ".ckpt")


def test_sigkill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, reference):
    corpus, ref_model, ref_ckpt = reference
    out, ckpt = tmp_path / "m.nnb", tmp_path / "m.nnb.ckpt"
    proc = nn2c(corpus, "-o", out, "--steps", STEPS, *TINY)
    wait_for_checkpoint(ckpt, 50, proc)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc)[0] == -signal.SIGKILL
    killed_at = checkpoint_step(ckpt)
    assert 50 <= killed_at < STEPS and killed_at % 10 == 0
    fmt.read(ckpt, verify_data=True).close()          # whole, whatever moment the kill came at
    rc, _, err = finish(nn2c(corpus, "-o", out, "--steps", STEPS, *TINY, "--resume"))
    assert rc == 0, err
    assert checkpoint_step(ckpt) == STEPS
    assert_same_tensors(tensors(out), ref_model)
    assert_same_tensors(tensors(ckpt), ref_ckpt)       # weights, Adam's moments, state, RNG, best


def test_ctrl_c_saves_a_checkpoint_and_a_usable_model_then_resume_finishes_the_same_run(tmp_path, reference, run_cli):
    corpus, ref_model, ref_ckpt = reference
    out, ckpt = tmp_path / "m.nnb", tmp_path / "m.nnb.ckpt"
    proc = nn2c(corpus, "-o", out, "--steps", STEPS, *TINY)
    wait_for_checkpoint(ckpt, 50, proc)
    proc.send_signal(signal.SIGINT)
    rc, _, err = finish(proc)
    assert rc == 130, err
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if line.startswith("nn2c:")]
    assert len(said) == 1 and said[0] == err.splitlines()[-1]
    stopped = checkpoint_step(ckpt)
    assert 50 <= stopped < STEPS
    assert said[0] == (f"nn2c: interrupted at step {stopped}: checkpoint {ckpt}, best weights so far in {out}; "
                       "continue with --resume")
    gen = run_cli("nn2run", out, "--prime", "the ", "-n", 40, "--seed", 1)
    assert gen.returncode == 0 and gen.stderr == ""
    assert gen.stdout.startswith("the ") and len(gen.stdout) == 44
    rc, _, err = finish(nn2c(corpus, "-o", out, "--steps", STEPS, *TINY, "--resume"))
    assert rc == 0, err
    assert_same_tensors(tensors(out), ref_model)
    assert_same_tensors(tensors(ckpt), ref_ckpt)


# ---------------------------------------------------------------- in process (fast)
def said(stderr: str) -> list[str]:
    """The lines nn2c says about a failure (progress lines aside); never a traceback."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("nn2c:")]


def train(*args):
    result = CliRunner().invoke(nn2c_main, ["train", *map(str, args)])
    assert isinstance(result.exception, (SystemExit, type(None))), result.exception
    return result


SMALL = ["--hidden", "8", "--layers", "1", "--seq-len", "8", "--batch", "4", "--device", "cpu",
         "--eval-every", "10"]


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt", 1500)


def test_cpu_runs_with_the_same_seed_give_the_same_weights_and_another_seed_does_not(tmp_path, corpus):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        result = train(corpus, "-o", tmp_path / f"{name}.nnb", "--steps", 20, "--seed", seed, *SMALL)
        assert result.exit_code == 0, result.stderr
        runs[name] = tensors(tmp_path / f"{name}.nnb")
    assert_same_tensors(runs["a"], runs["b"])
    assert any(runs["a"][n].tobytes() != runs["c"][n].tobytes() for n in runs["a"])


def test_checkpoints_are_written_every_n_steps_and_at_the_end(tmp_path, corpus, monkeypatch):
    import nn2c.train.trainer
    saved, real = [], nn2c.train.trainer.save_checkpoint
    monkeypatch.setattr(nn2c.train.trainer, "save_checkpoint",
                        lambda path, *a: (saved.append(a[-1].step), real(path, *a)))
    result = train(corpus, "-o", tmp_path / "m.nnb", "--steps", 25, "--checkpoint-every", 10, *SMALL)
    assert result.exit_code == 0, result.stderr
    assert saved == [10, 20, 25]
    assert checkpoint_step(tmp_path / "m.nnb.ckpt") == 25
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


BLOWS_UP = "hₜ = tanh(W xₜ + U hₜ₋₁ + b) ⊙ exp(a)\n"   # Adam's first step moves `a` by ±lr


@pytest.mark.parametrize("lr, diverges", [(1e3, True), (1e-3, False)])
def test_a_loss_that_stops_being_finite_stops_the_run_and_keeps_the_last_good_checkpoint(
        tmp_path, corpus, lr, diverges):
    (tmp_path / "blow.eq").write_text(BLOWS_UP, encoding="utf-8")
    out, ckpt = tmp_path / "m.nnb", tmp_path / "m.nnb.ckpt"
    result = train(corpus, "-o", out, "--kernel", tmp_path / "blow.eq", "--lr", lr, "--steps", 20,
                   "--checkpoint-every", 1, *SMALL)
    if not diverges:            # the same kernel trains at a sane rate: the trigger is the rate
        assert result.exit_code == 0, result.stderr
        return
    assert result.exit_code == 1
    assert said(result.stderr) == [f"nn2c: the loss became nan at step 2 (--lr 1000); stopped: the last good "
                                   f"checkpoint is {ckpt} (step 1); try a lower --lr or --clip"]
    assert checkpoint_step(ckpt) == 1
    for name, t in tensors(ckpt).items():
        assert np.isfinite(t).all() if t.dtype.kind == "f" else True, name
    assert not out.exists()


def test_resume_refuses_an_option_that_differs_from_the_checkpoint(tmp_path, corpus):
    out = tmp_path / "m.nnb"
    assert train(corpus, "-o", out, "--steps", 10, *SMALL).exit_code == 0
    result = train(corpus, "-o", out, "--steps", 20, *SMALL, "--hidden", 16, "--resume")
    assert result.exit_code == 1
    assert said(result.stderr) == ["nn2c: --resume: --hidden 16 differs from the checkpoint's 8; "
                                   "leave it out, or train afresh without --resume"]
    assert checkpoint_step(tmp_path / "m.nnb.ckpt") == 10


def test_resume_without_options_continues_the_checkpoints_run(tmp_path, corpus):
    out = tmp_path / "m.nnb"
    assert train(corpus, "-o", out, "--steps", 10, *SMALL, "--checkpoint-every", 5).exit_code == 0
    result = train("-o", out, "--resume", "--steps", 15)   # corpus and model from the checkpoint
    assert result.exit_code == 0, result.stderr
    header = nn2run.load(out).header
    assert header["provenance"]["steps"] == 15 and header["model"]["hidden"] == 8
    assert header["provenance"]["hyperparameters"]["checkpoint_every"] == 5


def test_resume_on_another_corpus_is_refused(tmp_path, corpus):
    out = tmp_path / "m.nnb"
    assert train(corpus, "-o", out, "--steps", 10, *SMALL).exit_code == 0
    other = write_corpus(tmp_path / "other.txt", 1500, seed=2)
    result = train(other, "-o", out, "--steps", 20, "--resume")
    assert result.exit_code == 1
    assert said(result.stderr) == [f"nn2c: --resume: {other} is not the corpus this checkpoint was trained on"]


def test_resume_without_a_checkpoint_says_so(tmp_path, corpus):
    result = train(corpus, "-o", tmp_path / "m.nnb", "--resume", *SMALL)
    assert result.exit_code == 1
    assert said(result.stderr) == [f"nn2c: --resume: no checkpoint at {tmp_path / 'm.nnb.ckpt'}"]


def test_resume_refuses_a_kernel_that_changed_since_the_checkpoint(tmp_path, corpus):
    kernel, out = tmp_path / "k.eq", tmp_path / "m.nnb"
    kernel.write_text("hₜ = tanh(W xₜ + U hₜ₋₁ + b)\n", encoding="utf-8")
    assert train(corpus, "-o", out, "--kernel", kernel, "--steps", 10, *SMALL).exit_code == 0
    kernel.write_text("hₜ = relu(W xₜ + U hₜ₋₁ + b)\n", encoding="utf-8")     # same shapes, other function
    result = train(corpus, "-o", out, "--kernel", kernel, "--steps", 20, *SMALL, "--resume")
    assert result.exit_code == 1
    assert said(result.stderr) == [f"nn2c: --resume: kernel {kernel} has changed since {out}.ckpt was written; "
                                   "train afresh without --resume"]


def test_resume_from_a_damaged_checkpoint_or_a_plain_model_is_one_line(tmp_path, corpus):
    out, ckpt = tmp_path / "m.nnb", tmp_path / "m.nnb.ckpt"
    assert train(corpus, "-o", out, "--steps", 10, *SMALL).exit_code == 0
    result = train(corpus, "-o", tmp_path / "n.nnb", "--checkpoint", out, "--steps", 20, *SMALL, "--resume")
    assert result.exit_code == 1
    assert said(result.stderr) == [f"nn2c: {out} is a model, not a training checkpoint"]
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    result = train(corpus, "-o", out, "--steps", 20, *SMALL, "--resume")
    assert result.exit_code == 1
    assert said(result.stderr) == [f"nn2c: cannot resume from {ckpt}: data checksum mismatch "
                                   "(the tensor data is corrupt)"]


def test_ctrl_c_before_training_starts_exits_130_in_one_line(tmp_path, corpus, monkeypatch):
    import nn2c.train.session

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(nn2c.train.session, "Trainer", interrupted)
    result = train(corpus, "-o", tmp_path / "m.nnb", "--steps", 10, *SMALL)
    assert result.exit_code == 130
    assert said(result.stderr) == ["nn2c: interrupted; no checkpoint was written"]

"""The trainer's device path: windows sliced on the device, the loss read only every few steps
(divergence still caught at the step it happened, with the weights from before it), the
validation sum kept on the device, the GPU's RNG in checkpoints and a warning when a resume
changes device. The CUDA tests skip without a GPU; everything else runs on the CPU."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import nn2run.format as fmt
from nn2c.cli import main as nn2c_main
from nn2c.train.corpus import read_corpus
from nn2c.train.trainer import Batches, Diverged, TrainConfig, Trainer, evaluate

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BLOWS_UP = "hₜ = tanh(W xₜ + U hₜ₋₁ + b) ⊙ exp(a)\n"   # Adam's first step moves `a` by ±lr


def write_corpus(path, n_words=1500, seed=1):
    rng = random.Random(seed)
    words = "the cat sat on a mat and dog ran far away to see its friend".split()
    path.write_text(" ".join(rng.choice(words) for _ in range(n_words)), encoding="utf-8")
    return path


def train(*args):
    result = CliRunner().invoke(nn2c_main, ["train", *map(str, args)])
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    return result


def trainer(tmp_path, corpus, name="m", **options) -> Trainer:
    cfg = TrainConfig(**{"hidden": 8, "layers": 1, "seq_len": 8, "batch": 4, "steps": 20, "eval_every": 10,
                         "device": "cpu", **options})
    out = tmp_path / f"{name}.nnb"
    return Trainer(cfg, read_corpus(str(corpus)), str(out), str(out) + ".ckpt", stream=io.StringIO())


def test_windows_are_sliced_from_the_ids_in_place(tmp_path):
    """Row b of the batch is the b-th contiguous part of the stream; window k of it is
    tokens [k·T, k·T + T] of that part (x the first T, y the last T). On the CPU the ids are
    the corpus array itself, not a copy."""
    ids = np.random.default_rng(0).integers(0, 200, 1003).astype(np.uint8)
    rows, T = 4, 10
    b = Batches(ids, rows, T, torch.device("cpu"))
    assert b.data.data_ptr() == ids.ctypes.data
    per_row = len(ids) // rows
    assert len(b) == (per_row - 1) // T
    for k in (0, 5, len(b) - 1):
        x, y = b[k]
        want = np.stack([ids[r * per_row + k * T: r * per_row + k * T + T + 1] for r in range(rows)], 1)
        assert x.dtype == torch.int64 and x.is_contiguous() and y.is_contiguous()
        np.testing.assert_array_equal(x.numpy(), want[:-1])
        np.testing.assert_array_equal(y.numpy(), want[1:])
    part = Batches(ids, rows, T, torch.device("cpu"), part=(2, 4))
    np.testing.assert_array_equal(part[3][0].numpy(), b[3][0].numpy()[:, 2:4])


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_wide_ids_slice_the_same(dtype):
    ids = np.random.default_rng(1).integers(0, 60000, 500).astype(dtype)
    x, y = Batches(ids, 5, 7, torch.device("cpu"))[2]
    per_row = 100
    np.testing.assert_array_equal(x.numpy()[:, 1], ids[per_row + 14: per_row + 21])


def test_the_validation_loss_is_the_mean_over_every_token(tmp_path):
    """Against a float64 NumPy cross-entropy of the same logits, window by window."""
    corpus = write_corpus(tmp_path / "c.txt")
    t = trainer(tmp_path, corpus)
    got = evaluate(t.net, t.val, t.vocab)
    state, total, count = t.net.initial_state(t.val.rows), 0.0, 0
    with torch.no_grad():
        for k in range(len(t.val)):
            x, y = t.val[k]
            logits, state = t.net(x, state)
            z = logits.double().numpy().reshape(-1, t.vocab)
            logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
            total -= logp[np.arange(len(z)), y.numpy().reshape(-1)].sum()
            count += y.numel()
    assert got == pytest.approx(total / count, rel=1e-6)


@pytest.mark.parametrize("read_every", [1, 7])
def test_a_divergence_read_late_names_its_step_and_keeps_the_weights_from_before_it(tmp_path, monkeypatch,
                                                                                   read_every):
    """As a GPU run does, read the loss only every 7 steps: the loss becomes NaN at step 2,
    so steps 2-7 must leave the weights and Adam's state as step 1 left them."""
    import nn2c.train.trainer
    monkeypatch.setattr(nn2c.train.trainer, "READ_EVERY_CPU", read_every)
    corpus = write_corpus(tmp_path / "c.txt")
    kernel = tmp_path / "blow.eq"
    kernel.write_text(BLOWS_UP, encoding="utf-8")
    one = trainer(tmp_path, corpus, "one", kernel=str(kernel), lr=1e3, steps=1)
    one.step(None)                                   # the weights after step 1
    t = trainer(tmp_path, corpus, "late", kernel=str(kernel), lr=1e3, steps=20, checkpoint_every=100)
    with pytest.raises(Diverged, match=r"the loss became nan at step 2 \(--lr 1000\); stopped: no checkpoint"):
        t.run()
    for name, w in t.net.numpy_tensors().items():
        np.testing.assert_array_equal(w, one.net.numpy_tensors()[name])
    assert {int(s["step"]) for s in t.opt.state.values()} == {1}


def test_a_resume_on_another_device_warns_that_it_is_not_bit_exact(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    out, ckpt = tmp_path / "m.nnb", tmp_path / "m.nnb.ckpt"
    small = ["--hidden", 8, "--layers", 1, "--seq-len", 8, "--batch", 4, "--eval-every", 10]
    assert train(corpus, "-o", out, *small, "--steps", 10, "--device", "cpu").exit_code == 0
    with fmt.read(ckpt) as f:
        assert f.header["checkpoint"]["device"] == "cpu"
        assert "rng/cuda" not in f.tensors
        header, tensors = dict(f.header), {k: np.array(v) for k, v in f.tensors.items()}
    resumed = train("--resume", "-o", out, "--steps", 20, "--device", "cpu")
    assert resumed.exit_code == 0 and "warning" not in resumed.stderr
    header["checkpoint"] = {**header["checkpoint"], "device": "cuda"}
    fmt.write(ckpt, header, tensors)
    moved = train("--resume", "-o", out, "--steps", 30, "--device", "cpu")
    assert moved.exit_code == 0, moved.stderr
    warnings = [line for line in moved.stderr.splitlines() if line.startswith("nn2c: warning:")]
    assert len(warnings) == 1 and "trained on cuda and resumes on cpu" in warnings[0]
    assert "same device and torch build" in warnings[0]


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

@cuda
def test_cuda_windows_live_on_the_gpu(tmp_path):
    t = trainer(tmp_path, write_corpus(tmp_path / "c.txt"), device="cuda")
    assert t.train.data.is_cuda and t.train.data.dtype == torch.uint8
    x, y = t.train[3]
    assert x.is_cuda and y.is_cuda and x.dtype == torch.int64
    cpu = trainer(tmp_path, write_corpus(tmp_path / "c.txt"), "cpu")
    torch.testing.assert_close(x.cpu(), cpu.train[3][0], rtol=0, atol=0)
    torch.testing.assert_close(y.cpu(), cpu.train[3][1], rtol=0, atol=0)


@cuda
def test_cuda_training_follows_cpu_training_within_float_tolerance(tmp_path):
    """The same seed and steps on both devices: the same function up to rounding (TF32 off)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        corpus = write_corpus(tmp_path / "c.txt")
        on = {}
        for device in ("cpu", "cuda"):
            t = trainer(tmp_path, corpus, device, device=device, steps=10, lr=1e-3)
            summary = t.run()
            on[device] = (summary["train_loss"], t.net.numpy_tensors())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert on["cuda"][0] == pytest.approx(on["cpu"][0], abs=1e-3)
    for name, w in on["cpu"][1].items():
        np.testing.assert_allclose(on["cuda"][1][name], w, atol=1e-3, rtol=0, err_msg=name)


@cuda
def test_cuda_resume_with_dropout_matches_an_uninterrupted_run(tmp_path):
    """The GPU generator (dropout masks on CUDA) is saved and restored; on the same device and
    build the resumed run's weights are the uninterrupted run's (a tolerance only for
    non-deterministic kernels)."""
    corpus = write_corpus(tmp_path / "c.txt")
    small = ["--hidden", 16, "--layers", 2, "--seq-len", 8, "--batch", 4, "--eval-every", 10,
             "--dropout", 0.3, "--device", "cuda"]
    assert train(corpus, "-o", tmp_path / "ref.nnb", *small, "--steps", 30).exit_code == 0
    assert train(corpus, "-o", tmp_path / "m.nnb", *small, "--steps", 10).exit_code == 0
    with fmt.read(tmp_path / "m.nnb.ckpt") as f:
        assert f.header["checkpoint"]["device"] == "cuda" and "rng/cuda" in f.tensors
    result = train(corpus, "-o", tmp_path / "m.nnb", "--resume", "--steps", 30)
    assert result.exit_code == 0 and "warning" not in result.stderr, result.stderr
    with fmt.read(tmp_path / "ref.nnb.ckpt") as a, fmt.read(tmp_path / "m.nnb.ckpt") as b:
        for name in a.header["params"]:
            tensor = a.header["params"][name]["tensor"]
            np.testing.assert_allclose(np.array(b.tensors[tensor]), np.array(a.tensors[tensor]), atol=1e-6, rtol=1e-5)


@cuda
def test_cuda_checkpoint_resumed_on_the_cpu_warns_and_trains_on(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    small = ["--hidden", 8, "--layers", 1, "--seq-len", 8, "--batch", 4, "--eval-every", 10]
    assert train(corpus, "-o", tmp_path / "m.nnb", *small, "--steps", 10, "--device", "cuda").exit_code == 0
    result = train("--resume", "-o", tmp_path / "m.nnb", "--steps", 20, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert "trained on cuda and resumes on cpu" in result.stderr


def test_a_validation_loss_that_is_not_finite_stops_the_run_in_one_line(tmp_path):
    """Step 1 is finite, its update (lr 1000) is not: the validation after it says so."""
    corpus = write_corpus(tmp_path / "c.txt")
    kernel = tmp_path / "blow.eq"
    kernel.write_text(BLOWS_UP, encoding="utf-8")
    result = train(corpus, "-o", tmp_path / "m.nnb", "--kernel", kernel, "--lr", 1e3, "--steps", 5,
                   "--eval-every", 1, "--hidden", 8, "--layers", 1, "--seq-len", 8, "--batch", 4, "--device", "cpu")
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert lines[-1].startswith("nn2c: the validation loss became") and "at step 1 (--lr 1000)" in lines[-1]
    assert "no checkpoint was written yet" in lines[-1]

"""Training learns: on a generated corpus with known structure the validation loss ends far
below what a model that learned nothing (the unigram entropy) gets."""

from __future__ import annotations

import io
import math
import random
from collections import Counter

import pytest

import nn2run
from nn2c.train.corpus import read_corpus
from nn2c.train.trainer import TrainConfig, Trainer


def _corpus(path, n_words=6000, seed=0):
    rng = random.Random(seed)
    words = ["abc", "defgh", "ij", "klmno", "pqr"]
    text = " ".join(rng.choice(words) for _ in range(n_words))
    path.write_text(text, encoding="utf-8")
    return text


def _unigram_entropy(text: str) -> float:
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log(c / n) for c in counts.values())


@pytest.mark.parametrize("kernel", ["lstm", "gru"])
def test_training_reaches_a_loss_far_below_the_unigram_entropy(tmp_path, kernel):
    text = _corpus(tmp_path / "words.txt")
    cfg = TrainConfig(kernel=kernel, hidden=32, layers=1, seq_len=32, batch=16, steps=250, lr=1e-2,
                      eval_every=50, val_frac=0.1, device="cpu")
    trainer = Trainer(cfg, read_corpus(str(tmp_path / "words.txt")), str(tmp_path / "m.nnb"),
                      str(tmp_path / "m.ckpt"), stream=io.StringIO())
    summary = trainer.run()
    h = _unigram_entropy(text)
    # within a word every character is determined; only the word choice (log 5 per ~4.6 chars) is not
    assert summary["best_val_loss"] < 0.5 * h, (summary["best_val_loss"], h)
    m = nn2run.load(tmp_path / "m.nnb")
    assert m.header["provenance"]["best_val_loss"] == summary["best_val_loss"]


def test_cpu_runs_with_the_same_seed_give_the_same_weights(tmp_path):
    import numpy as np
    _corpus(tmp_path / "w.txt", 1500)
    outs = []
    for run in range(2):
        cfg = TrainConfig(hidden=16, layers=2, seq_len=16, batch=8, steps=20, eval_every=10, seed=3, device="cpu")
        out = tmp_path / f"m{run}.nnb"
        Trainer(cfg, read_corpus(str(tmp_path / "w.txt")), str(out), str(out) + ".ckpt", stream=io.StringIO()).run()
        outs.append(nn2run.load(out))
    for name, t in outs[0].tensors.items():
        np.testing.assert_array_equal(t, outs[1].tensors[name])


def _train(tmp_path, kernel, steps=250, hidden=32, name="m"):
    cfg = TrainConfig(kernel=kernel, hidden=hidden, layers=1, seq_len=32, batch=16, steps=steps, lr=1e-2,
                      eval_every=50, val_frac=0.1)
    trainer = Trainer(cfg, read_corpus(str(tmp_path / "words.txt")), str(tmp_path / f"{name}.nnb"),
                      str(tmp_path / f"{name}.ckpt"), stream=io.StringIO())
    return trainer.run()["best_val_loss"]


@pytest.mark.slow
def test_a_softmax_readout_trains_to_the_loss_of_the_same_cell_without_it(tmp_path):
    """Wikipedia's Elman network verbatim (σ_y = softmax) against rnn.eq, the same cell with
    the readout left to the compiler: the softmax is the distribution, not more logits."""
    text = _corpus(tmp_path / "words.txt")
    with_softmax, without = _train(tmp_path, "elman", name="e"), _train(tmp_path, "rnn", name="r")
    assert abs(with_softmax - without) < 0.05, (with_softmax, without)
    assert with_softmax < 0.6 * _unigram_entropy(text)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["lnlstm", "jordan"])
def test_the_normalized_lstm_and_the_jordan_network_learn(tmp_path, kernel):
    text = _corpus(tmp_path / "words.txt")
    loss = _train(tmp_path, kernel)
    assert loss < (0.5 if kernel == "lnlstm" else 0.8) * _unigram_entropy(text), loss

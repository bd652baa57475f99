"""The seq2seq trainer: pairs files, the torch model of a hand-built Bahdanau network against
a float64 NumPy reference, padding, training on a generated copy task, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nn2c.compiler.emit import unpack
from nn2c.train.seq2seq.model import Seq2SeqTorch
from nn2c.train.seq2seq.network import init_tensors
from tests.support.seq2seq_ir import seq2seq_network

VS, VT, H, L = 6, 9, 8, 2          # target: 7 characters, BEGIN 7, END 8


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _reference_gru(w: dict, layer: int, xs: np.ndarray, onehot: bool) -> np.ndarray:
    """torch.nn.GRU's layer (torchgru.eq) in float64 NumPy over one sequence: (T, in) -> (T, H)."""
    g = lambda n: w[f"{n}@{layer}"]            # noqa: E731
    h = np.zeros(H)
    out = []
    for x in xs:
        r = _sigmoid(g("W_ir") @ x + g("b_ir") + g("W_hr") @ h + g("b_hr"))
        z = _sigmoid(g("W_iz") @ x + g("b_iz") + g("W_hz") @ h + g("b_hz"))
        n = np.tanh(g("W_in") @ x + g("b_in") + r * (g("W_hn") @ h + g("b_hn")))
        h = (1 - z) * n + z * h
        out.append(h)
    return np.array(out)


def _reference(w: dict, src: list[int], tgt_in: list[int]):
    """Bahdanau's equations for one pair: (memory (J, H), attention (U, J), logits (U, Vt))."""
    x = np.eye(VS)[src]
    for k in range(L):
        x = _reference_gru(w, k, x, k == 0)
    memory = x
    d = lambda n: w[f"{n}@{L}"]                 # noqa: E731
    s = np.tanh(d("W_0") @ memory[-1] + d("b_0"))
    alphas, logits = [], []
    for tok in tgt_in:
        y = np.eye(VT)[tok]
        e = np.array([d("v_a") @ np.tanh(d("W_a") @ s + d("U_a") @ h) for h in memory])
        a = np.exp(e - e.max())
        a /= a.sum()
        c = a @ memory
        r = _sigmoid(d("W_ir") @ y + d("C_r") @ c + d("b_ir") + d("W_hr") @ s + d("b_hr"))
        z = _sigmoid(d("W_iz") @ y + d("C_z") @ c + d("b_iz") + d("W_hz") @ s + d("b_hz"))
        n = np.tanh(d("W_in") @ y + d("C_n") @ c + d("b_in") + r * (d("W_hn") @ s + d("b_hn")))
        s = (1 - z) * n + z * s
        alphas.append(a)
        logits.append(d("W_y") @ s + d("b_y"))
    return memory, np.array(alphas), np.array(logits)


def _model(seed=3, dtype=np.float64):
    net = seq2seq_network(VS, VT, H, L)
    tensors = init_tensors(net, seed)
    rng = np.random.default_rng(seed)          # biases away from 0, so they are exercised too
    tensors = {n: (a + rng.uniform(-0.3, 0.3, a.shape)).astype(dtype) for n, a in tensors.items()}
    return net, tensors, Seq2SeqTorch(net, tensors)


PAIRS = [([1, 2, 3, 4, 5], [7, 0, 1, 2, 3, 4, 5]), ([2, 0], [7, 6, 6]), ([5, 4, 3], [7, 1]),
         ([3], [7, 2, 3, 4, 5])]


def _batch(pairs):
    T, U = max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs)
    src = torch.zeros(T, len(pairs), dtype=torch.int64)
    tin = torch.zeros(U, len(pairs), dtype=torch.int64)
    for b, (s, t) in enumerate(pairs):
        src[:len(s), b] = torch.tensor(s)
        tin[:len(t), b] = torch.tensor(t)
    return src, torch.tensor([len(s) for s, _ in pairs]), tin


def test_teacher_forced_logits_match_numpy_reference_on_padded_batch():
    net, tensors, model = _model()
    w = {k: v.astype(np.float64) for k, v in unpack(net.tensors(), tensors).items()}
    src, lengths, tin = _batch(PAIRS)
    with torch.no_grad():
        logits = model(src, lengths, tin).numpy()
        memory, _, mask = model.encode(src, lengths)
    for b, (s, t) in enumerate(PAIRS):
        ref_memory, _, ref_logits = _reference(w, s, t)
        np.testing.assert_allclose(memory[b, :len(s)].numpy(), ref_memory, atol=1e-5, rtol=0)
        np.testing.assert_allclose(logits[:len(t), b], ref_logits, atol=1e-5, rtol=0)
    assert mask[:, :, 0].tolist() == [[j < len(s) for j in range(src.shape[0])] for s, _ in PAIRS]


def test_a_sentence_alone_equals_it_inside_a_padded_batch():
    _, _, model = _model(seed=5, dtype=np.float32)
    src, lengths, tin = _batch(PAIRS)
    with torch.no_grad():
        together = model(src, lengths, tin)
        for b, (s, t) in enumerate(PAIRS):
            alone = model(*_batch([(s, t)]))
            torch.testing.assert_close(together[:len(t), b], alone[:, 0], atol=1e-6, rtol=0)
    greedy = model.greedy(src, lengths, 7, 8, 6)
    assert greedy == [model.greedy(*_batch([(s, t)])[:2], 7, 8, 6)[0] for s, t in PAIRS]

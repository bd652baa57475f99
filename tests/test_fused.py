"""The fused time loop: its compiler-derived backward against torch autograd through the
plain per-step program (no hoisting, no fusion), for every sample kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nn2c
from nn2c.backend.fused import FusedLoop, supported
from nn2c.compiler.pipeline import compile_kernel
from nn2c.lang.parse import parse
from support.models import assert_matches_nn_lstm, assert_matches_plain_program, random_tensors


@pytest.fixture
def fused_loop(monkeypatch):
    """These tests are about the fused Python loop: keep the native one out of the way."""
    monkeypatch.setenv("NN2_NATIVE", "0")


@pytest.mark.parametrize("kernel", ["lstm", "gru", "rnn", "torchgru", "mgu"])
def test_fused_backward_matches_autograd_of_the_plain_program(kernel, fused_loop):
    compiled = compile_kernel(kernel, 12, 2, 7)
    assert all(supported(c) for c in compiled.network.cells)
    tensors = random_tensors(compiled.network, 1)
    ids = torch.randint(0, 7, (15, 3), generator=torch.Generator().manual_seed(0))
    net = assert_matches_plain_program(compiled.network, tensors, ids, 3, hoist=True, fused=True)
    assert net.loop_kind() == "fused"


@pytest.mark.parametrize("hoist, fused, native", [(True, False, "0"), (True, True, "0"), (True, True, "1")])
def test_a_term_made_of_parameters_alone_is_the_same_at_every_step(hoist, fused, native, monkeypatch):
    """exp(a) depends on no input: hoisted, it is one vector, broadcast over steps and streams."""
    monkeypatch.setenv("NN2_NATIVE", native)
    kernel = parse("hₜ = tanh(W xₜ + U hₜ₋₁ + b) ⊙ exp(a)\n", "scaled.eq")
    compiled = compile_kernel(kernel, 6, 2, 5)
    tensors = random_tensors(compiled.network, 3)
    ids = torch.randint(0, 5, (9, 4), generator=torch.Generator().manual_seed(0))
    assert_matches_plain_program(compiled.network, tensors, ids, 4, hoist=hoist, fused=fused)


def test_fused_lstm_weight_gradients_match_torch_nn_lstm(fused_loop):
    """Against an independent implementation: torch.nn.LSTM's own backward."""
    net = assert_matches_nn_lstm(hidden=10, vocab=6, steps=9, batch=2)
    assert net.loop_kind() == "fused"


def test_fused_loop_source_computes_weight_gradients_once_after_the_loop():
    loop = FusedLoop(compile_kernel("lstm", 8, 1, 5).network.cells[0])
    body, after = loop.backward_src.split("for t in range(T - 1, -1, -1):")
    assert "torch.cat(k" in after and ".t() @ torch.stack(gM" in after
    assert "addmm" in loop.forward_src


def test_no_torchscript_anywhere_in_the_compiler():
    """The loops are the fused Python loop and the native loop; TorchScript is not used."""
    sources = sorted(Path(nn2c.__file__).parent.rglob("*.py"))
    assert sources and not [p.name for p in sources if "torch.jit" in p.read_text(encoding="utf-8")]

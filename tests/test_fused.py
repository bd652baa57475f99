"""The fused time loop: its compiler-derived backward against torch autograd through the
plain per-step program (no hoisting, no fusion), for every sample kernel."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_matches_nn_lstm, assert_matches_plain_program

from nn2c.compiler import compile_kernel
from nn2c.fused import FusedLoop, supported
from nn2c.parse import parse
from nn2c.torch_backend import init_tensors


@pytest.fixture
def torchscript_loop(monkeypatch):
    """These tests are about the TorchScript loop: keep the native one out of the way."""
    monkeypatch.setenv("NN2_NATIVE", "0")


@pytest.mark.parametrize("kernel", ["lstm", "gru", "rnn", "torchgru", "mgu"])
def test_fused_backward_matches_autograd_of_the_plain_program(kernel, torchscript_loop):
    compiled = compile_kernel(kernel, 12, 2, 7)
    assert all(supported(c) for c in compiled.network.cells)
    tensors = init_tensors(compiled.network, 1)
    ids = torch.randint(0, 7, (15, 3), generator=torch.Generator().manual_seed(0))
    net = assert_matches_plain_program(compiled.network, tensors, ids, 3, hoist=True, fused=True)
    assert net.loop_kind() in ("torchscript", "python")


@pytest.mark.parametrize("hoist, fused, native", [(True, False, "0"), (True, True, "0"), (True, True, "1")])
def test_a_term_made_of_parameters_alone_is_the_same_at_every_step(hoist, fused, native, monkeypatch):
    """exp(a) depends on no input: hoisted, it is one vector, broadcast over steps and streams."""
    monkeypatch.setenv("NN2_NATIVE", native)
    kernel = parse("hₜ = tanh(W xₜ + U hₜ₋₁ + b) ⊙ exp(a)\n", "scaled.eq")
    compiled = compile_kernel(kernel, 6, 2, 5)
    tensors = init_tensors(compiled.network, 3)
    ids = torch.randint(0, 5, (9, 4), generator=torch.Generator().manual_seed(0))
    assert_matches_plain_program(compiled.network, tensors, ids, 4, hoist=hoist, fused=fused)


def test_fused_lstm_weight_gradients_match_torch_nn_lstm(torchscript_loop):
    """Against an independent implementation: torch.nn.LSTM's own backward."""
    net = assert_matches_nn_lstm(hidden=10, vocab=6, steps=9, batch=2)
    assert net.loop_kind() in ("torchscript", "python")


def test_fused_loop_source_computes_weight_gradients_once_after_the_loop():
    loop = FusedLoop(compile_kernel("lstm", 8, 1, 5).network.cells[0])
    body, after = loop.backward_src.split("for t in range(T - 1, -1, -1):")
    assert "torch.cat(k" in after and ".t() @ torch.stack(gM" in after
    assert "addmm" in loop.forward_src


def test_python_and_torchscript_loops_agree():
    """The loop runs in TorchScript when this torch can compile it; both must be one function."""
    cell = compile_kernel("gru", 8, 1, 5).network.cells[0]
    py, ts = FusedLoop(cell, script=False), FusedLoop(cell, script=True)
    if not ts.scripted:
        pytest.skip("this torch cannot compile TorchScript; the Python loop is used")
    gen = torch.Generator().manual_seed(0)
    E = [torch.randn(6, 2, e.width, generator=gen) for e in py.ext]
    P = [torch.randn(8, p.width, generator=gen) for p in py.params]
    S = [torch.randn(2, 8, generator=gen)]
    out_py, _, K_py = py.fwd(E, S, P, 6)
    out_ts, _, K_ts = ts.fwd(E, S, P, 6)
    torch.testing.assert_close(out_ts, out_py)
    g = torch.randn(out_py.shape, generator=gen)
    for a, b in zip(sum(py.bwd(K_py, g, [torch.zeros(2, 8)], E, P, 6), []),
                    sum(ts.bwd(K_ts, g, [torch.zeros(2, 8)], E, P, 6), [])):
        torch.testing.assert_close(a, b)

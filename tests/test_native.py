"""The native loop (generated C for the element-wise part of each step): its forward and
its backward against torch autograd through the plain per-step program, and against
torch.nn.LSTM; the fallbacks when it cannot run."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import assert_matches_nn_lstm, assert_matches_plain_program

from nn2c import native
from nn2c.compiler import compile_kernel
from nn2c.fused import FusedLoop
from nn2c.parse import parse
from nn2c.torch_backend import init_tensors

pytestmark = pytest.mark.skipif(not shutil.which("cc") or not native.enabled(),
                                reason="no C compiler (the native loop falls back to TorchScript)")


def _assert_native(net) -> None:
    assert net.loop_kind() == "native"
    assert net.loops and all(loop._native is not None for loop in net.loops)     # built and ran


@pytest.mark.parametrize("kernel", ["lstm", "gru", "rnn", "torchgru", "mgu"])
def test_native_loop_matches_autograd_of_the_plain_program(kernel):
    compiled = compile_kernel(kernel, 12, 2, 7)
    tensors = init_tensors(compiled.network, 1)
    ids = torch.randint(0, 7, (15, 3), generator=torch.Generator().manual_seed(0))
    _assert_native(assert_matches_plain_program(compiled.network, tensors, ids, 3))


EVERY_OP = """aₜ = relu(W_a·xₜ + U_a·hₜ₋₁ + b_a)
gₜ = exp(−(W_g·xₜ + U_g·hₜ₋₁))
sₜ = log(1 + exp(W_s·xₜ + U_s·hₜ₋₁))
hₜ = tanh(aₜ − gₜ ⊙ hₜ₋₁ + 0.5 ⊙ sₜ)
"""


def test_every_element_wise_op_and_constants_inside_the_loop():
    compiled = compile_kernel(parse(EVERY_OP, "ops.eq"), 6, 2, 5)
    ids = torch.randint(0, 5, (7, 3), generator=torch.Generator().manual_seed(0))
    _assert_native(assert_matches_plain_program(compiled.network, init_tensors(compiled.network, 2), ids, 3))


@pytest.mark.parametrize("text", [
    "hₜ = tanh(W xₜ + hₜ₋₁) + U hₜ₋₁\n",             # a state's next value is a product (+ x)
    "hₜ = W xₜ + U hₜ₋₁\n",                           # … and the input could be its accumulator
    "aₜ = W xₜ + U hₜ₋₁\nhₜ = tanh(R aₜ + aₜ)\n",     # a product of a product's result
    "aₜ = U hₜ₋₁\nhₜ = tanh(W xₜ + R (aₜ + hₜ₋₁))\n",
    "hₜ = tanh(exp(W xₜ) + U hₜ₋₁)\n",                # autograd keeps exp's output: no reuse
    "cₜ = tanh(W xₜ) ⊙ cₜ₋₁ + U hₜ₋₁\nhₜ = tanh(cₜ)\n",
])
def test_products_at_the_edges_of_the_step(text):
    compiled = compile_kernel(parse(text, "edge.eq"), 6, 2, 5)
    ids = torch.randint(0, 5, (6, 3), generator=torch.Generator().manual_seed(0))
    _assert_native(assert_matches_plain_program(compiled.network, init_tensors(compiled.network, 4), ids, 3))


def test_native_lstm_matches_torch_nn_lstm_at_training_sizes():
    """Against an independent implementation, at the sizes the trainer runs (64 steps, batch 32)."""
    _assert_native(assert_matches_nn_lstm(hidden=64, vocab=11, steps=64, batch=32))


def test_extreme_and_nan_pre_activations():
    """Saturation at ±1e4 and ±inf as torch's sigmoid/tanh give it, and NaN stays NaN (the
    trainer stops a run on a NaN loss)."""
    cell = compile_kernel("rnn", 5, 1, 3).network.cells[0]
    loop = FusedLoop(cell)
    x = torch.tensor([[-1e4, -90.0, -20.0, -0.3, 0.0], [1e-6, 0.5, 20.0, 90.0, 1e4],
                      [float("-inf"), float("inf"), float("nan"), 3.0, -3.0]])
    E = [x[None].clone()]
    P = [torch.zeros(5, 5)]
    out, _, _ = loop.implementation(E + P).fwd(E, [torch.zeros(3, 5)], P, 1)
    want = torch.tanh(x.double()).float()
    assert torch.isnan(out[0, 2, 2]) and torch.isnan(want[2, 2])
    torch.testing.assert_close(out[0], want, atol=2e-7, rtol=2e-6, equal_nan=True)


def test_native_tanh_is_within_a_few_ulp_over_the_useful_range():
    x = torch.linspace(-30, 30, 24000, dtype=torch.float64)
    rnn = compile_kernel("rnn", 8, 1, 3).network.cells[0]
    loop = FusedLoop(rnn)
    E = [x.float().reshape(1, -1, 8).clone()]
    P = [torch.zeros(8, 8)]
    out, _, _ = loop.implementation(E + P).fwd(E, [torch.zeros(E[0].shape[1], 8)], P, 1)
    err = (out.double().flatten() - torch.tanh(x)).abs()
    assert err.max() < 3e-7


def test_fallbacks_keep_the_torchscript_loop(monkeypatch):
    cell = compile_kernel("lstm", 6, 1, 4).network.cells[0]
    monkeypatch.setenv("NN2_NATIVE", "0")
    assert FusedLoop(cell).kind in ("torchscript", "python")
    monkeypatch.setenv("NN2_NATIVE", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    loop = FusedLoop(cell)
    P = [torch.zeros(6, 24)]
    impl = loop.implementation([torch.zeros(2, 1, 24)] + P)
    assert impl is loop and "no C compiler" in loop.native_error
    assert loop.kind in ("torchscript", "python")


def test_a_softmax_inside_the_loop_is_left_to_torchscript():
    kernel = parse("aₜ = softmax(W·xₜ + U·hₜ₋₁ + b)\nhₜ = aₜ ⊙ hₜ₋₁\n", "attn.eq")
    cell = compile_kernel(kernel, 6, 1, 4).network.cells[0]
    assert native.supported(cell) == "softmax inside the loop"
    assert FusedLoop(cell).kind in ("torchscript", "python")


def test_a_built_loop_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("NN2_CACHE", str(tmp_path / "cache"))
    cell = compile_kernel("gru", 10, 1, 4).network.cells[0]
    loop = FusedLoop(cell)
    native.NativeLoop(cell, loop.ext, loop.params)
    built = sorted((tmp_path / "cache").glob("loop-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(native.NativeUnavailable):
        other = FusedLoop(compile_kernel("gru", 11, 1, 4).network.cells[0])
        native.NativeLoop(other.cell, other.ext, other.params)
    monkeypatch.setenv("CC", "cc")
    native.NativeLoop(cell, loop.ext, loop.params)
    assert built[0].stat().st_mtime_ns == stamp


def test_an_unwritable_cache_falls_back_to_the_temporary_directory(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("NN2_CACHE", str(blocked / "cache"))        # mkdir fails under a file
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    cell = compile_kernel("rnn", 9, 1, 4).network.cells[0]
    loop = FusedLoop(cell)
    native.NativeLoop(cell, loop.ext, loop.params)
    assert len(list((tmp_path / "tmp" / "nn2-cache").glob("loop-*.so"))) == 1


def test_a_compiler_error_is_one_reason_and_the_torchscript_loop_runs(tmp_path, monkeypatch):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'loop.c:1: error: something broke' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    cell = compile_kernel("lstm", 7, 1, 4).network.cells[0]
    loop = FusedLoop(cell)
    P = [torch.zeros(7, 28)]
    assert loop.implementation([torch.zeros(2, 1, 28)] + P) is loop
    assert loop.native_error == f"{fake} failed: loop.c:1: error: something broke"
    assert loop.kind in ("torchscript", "python")

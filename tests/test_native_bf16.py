"""The native loop with bf16 products: its C rounds the products' operands and widens their
results (nn2c.backend.native.low). Checked against torch: its bf16 cast (the rounding,
bit for bit) and per-step autograd through the plain program with torch's own bf16
products (forward and gradients); external values given in bf16 against their float32
widening, bit for bit."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from nn2c.backend import native
from nn2c.backend.fused import FusedLoop
from nn2c.compiler.pipeline import compile_kernel
from nn2c.lang.parse import parse
from test_native import _random_cell, autograd_steps, random_case

pytestmark = pytest.mark.skipif(not shutil.which("cc") or not native.enabled(),
                                reason="no C compiler (the native loop falls back to the fused loop)")


def _mm_bf16(a, b):
    """torch's product with bf16 operands: float32 sums rounded to bf16, widened."""
    return (a.to(torch.bfloat16) @ b.to(torch.bfloat16)).float()


def _reference(cell, loop, E, S, P, T, gouts, gS):
    """Per-step autograd through the cell with every product in bf16 (`_mm_bf16`)."""
    outs, final, grads = autograd_steps(cell, loop, E, S, P, T, gouts, gS, matmul=_mm_bf16)
    return [outs, *final, *grads]


@pytest.mark.parametrize("seed", range(60))
def test_random_cells_in_bf16_match_per_step_autograd_with_bf16_products(seed):
    """The cells of test_native's random test (states read by products, shifted and sliced
    operands, folded sums into a state or an external, products of external values). Both
    sides round the same operands, but sums in another order can put a value on the other
    side of a bf16 rounding boundary, and the weight gradients are rounded once over all
    steps here, per step in autograd: the bound is two bf16 ulps (2^-7) of the largest
    entry, far below what a wrong operand, step or missed widening gives."""
    cell, loop, T, B, E, S, P, gouts, gS = random_case(seed)
    ref = _reference(cell, loop, E, S, P, T, gouts, gS)
    if not all(r.isfinite().all() for r in ref):
        pytest.skip("the cell overflows (exp of exp): where is a matter of rounding")
    impl = native.NativeLoop(loop.backward, "bf16")
    out, finals, K = impl.fwd([e.clone() for e in E], list(S), list(P), T)
    gE, gSi, gP = impl.bwd(K, gouts, gS, E, P, T)
    got = [out, *finals, *gE, *gSi, *gP]
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, atol=1e-6 + 2 ** -7 * scale, rtol=2 ** -7)


SPECIALS = [1.0, 1.00390625, 1.01171875, 1.0 + 2 ** -8 + 2 ** -20, -1.00390625, 3.0e38, -3.4e38,
            float("inf"), float("-inf"), float("nan"), 1.0e-40, -1.0e-40, 1.2e-38, 0.0, -0.0, 65504.0,
            2 ** -126 * 1.5, 123.456, -7.77e-5]


def test_the_c_rounds_to_bf16_as_torch_does_bit_for_bit():
    """h_t = W x_t + U h_(t-1) with U = 0: the state after the step is the external value
    itself, and the bf16 copy the C writes for the next product must be torch's cast of it:
    ties to even, overflow to infinity, infinities, signed zeros; a NaN stays a NaN.
    (A denormal is read as zero inside the loop, as everywhere in the native loop.)"""
    cell = compile_kernel(parse("hₜ = W xₜ + U hₜ₋₁\n", "linear.eq"), 4, 1, 5).network.cells[0]
    loop = FusedLoop(cell)
    impl = native.NativeLoop(loop.backward, "bf16")
    values = torch.tensor(SPECIALS + [-v for v in SPECIALS[:7]], dtype=torch.float32)
    values = torch.cat([values, torch.randn(4 * 32 - len(values), generator=torch.Generator().manual_seed(0))])
    E = [values.reshape(1, 32, 4)]
    S = [torch.randn(32, 4)]
    P = [torch.zeros(4, 4)]
    _, finals, K = impl.fwd([E[0].clone()], S, P, 1)
    copy = K[-1][1]                      # the state buffer's bf16 copy, block t + 1
    flushed = torch.where(values.abs() < 2 ** -126, torch.zeros_like(values), values).reshape(32, 4)
    assert torch.equal(finals[0].isnan(), flushed.isnan())
    assert torch.equal(finals[0].nan_to_num(), flushed.nan_to_num())
    expect = finals[0].to(torch.bfloat16)
    nan = expect.isnan()
    assert torch.equal(copy.isnan(), nan)
    assert torch.equal(copy.view(torch.int16)[~nan], expect.view(torch.int16)[~nan])


def test_external_values_given_in_bf16_run_as_their_float32_widening():
    """A hoisted bf16 product hands the loop its result in bf16 (nn2c.backend.precision.
    mm_bias_low): the loop widens it itself. Outputs, final states and gradients are those
    of the same values given in float32, bit for bit (the gradient of a bf16 input in bf16,
    its float32 gradient rounded), in the native loop and in the fused loop; over the
    random cells that have external values."""
    checked = 0
    for seed in range(60):
        rng = random.Random(seed)
        cell = _random_cell(rng)
        loop = FusedLoop(cell, "bf16")
        if loop.ext and native.supported(cell) is None:
            _check_bf16_externals(rng, seed, cell, loop)
            checked += 1
    assert checked >= 10


def _check_bf16_externals(rng, seed, cell, loop):
    T, B = rng.choice([1, 3, 4]), rng.choice([1, 3])
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen) * 0.5      # noqa: E731
    E16 = [rnd(T, B, e.width).to(torch.bfloat16) for e in loop.ext]
    S = [rnd(B, prev.width) for _, prev, _ in cell.states]
    P = [rnd(*cell.tensors[p.attrs["tensor"]].shape) for p in loop.params]
    gouts, gS = rnd(T, B, cell.output.width), [rnd(B, prev.width) for _, prev, _ in cell.states]
    half = tuple(range(len(E16)))
    for given, widened in ((native.NativeLoop(loop.backward, "bf16", half), native.NativeLoop(loop.backward, "bf16")),
                           (loop, loop)):
        runs = []
        for impl, E in ((given, [e.clone() for e in E16]), (widened, [e.float() for e in E16])):
            out, finals, K = impl.fwd([e.clone() for e in E], list(S), list(P), T)
            gE, gSi, gP = impl.bwd(K, gouts, gS, E, P, T)
            runs.append(([out, *finals, *gSi, *gP], gE))
        (same16, gE16), (same32, gE32) = runs
        for a, b in zip(same16, same32):
            assert a.dtype == torch.float32 and torch.equal(a, b), seed
        for a, b in zip(gE16, gE32):
            assert torch.equal(a.to(torch.bfloat16), b.to(torch.bfloat16)), seed

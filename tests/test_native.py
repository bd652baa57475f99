"""The native loop (generated C for the element-wise part of each step): its forward and
its backward against torch autograd through the plain per-step program, and against
torch.nn.LSTM; the fallbacks when it cannot run."""

from __future__ import annotations

import random
import shutil
import tempfile

import pytest
import torch

from nn2c.backend import native
from nn2c.backend.fused import FusedLoop
from nn2c.compiler.ir import Cell, Node, TensorSpec, depends_on_state
from nn2c.compiler.pipeline import compile_kernel
from nn2c.lang.parse import parse
from support.models import assert_matches_nn_lstm, assert_matches_plain_program, random_tensors

pytestmark = pytest.mark.skipif(not shutil.which("cc") or not native.enabled(),
                                reason="no C compiler (the native loop falls back to the fused loop)")


def _assert_native(net) -> None:
    assert net.loop_kind() == "native"
    assert net.loops and all(loop.last_kind == "native" for loop in net.loops)     # built and ran


@pytest.mark.parametrize("kernel", ["lstm", "gru", "rnn", "torchgru", "mgu"])
def test_native_loop_matches_autograd_of_the_plain_program(kernel):
    compiled = compile_kernel(kernel, 12, 2, 7)
    tensors = random_tensors(compiled.network, 1)
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
    _assert_native(assert_matches_plain_program(compiled.network, random_tensors(compiled.network, 2), ids, 3))


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
    _assert_native(assert_matches_plain_program(compiled.network, random_tensors(compiled.network, 4), ids, 3))


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


def test_denormals_are_flushed_inside_the_loop_and_nowhere_else():
    """A saturating gate makes denormal values, which slow every product that reads them
    many times over: the C flushes them to zero, and leaves the caller's mode as it was."""
    cell = compile_kernel("rnn", 4, 1, 3).network.cells[0]
    loop = FusedLoop(cell)
    E = [torch.tensor([[[1e-39, -1e-39, 1e-30, 0.5]]])]
    P = [torch.zeros(4, 4)]
    out, _, _ = loop.implementation(E + P).fwd([E[0].clone()], [torch.zeros(1, 4)], P, 1)
    assert out[0, 0].tolist()[:2] == [0.0, 0.0] and out[0, 0, 2] == torch.tensor(1e-30)
    assert (torch.tensor([1e-38]) * 0.1).item() > 0          # torch still computes denormals


def test_native_tanh_is_within_a_few_ulp_over_the_useful_range():
    x = torch.linspace(-30, 30, 24000, dtype=torch.float64)
    rnn = compile_kernel("rnn", 8, 1, 3).network.cells[0]
    loop = FusedLoop(rnn)
    E = [x.float().reshape(1, -1, 8).clone()]
    P = [torch.zeros(8, 8)]
    out, _, _ = loop.implementation(E + P).fwd(E, [torch.zeros(E[0].shape[1], 8)], P, 1)
    err = (out.double().flatten() - torch.tanh(x)).abs()
    assert err.max() < 3e-7


def test_fallbacks_keep_the_fused_loop(monkeypatch):
    cell = compile_kernel("lstm", 6, 1, 4).network.cells[0]
    monkeypatch.setenv("NN2_NATIVE", "0")
    assert FusedLoop(cell).kind == "fused"
    monkeypatch.setenv("NN2_NATIVE", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    loop = FusedLoop(cell)
    P = [torch.zeros(6, 24)]
    impl = loop.implementation([torch.zeros(2, 1, 24)] + P)
    assert impl is loop and "no C compiler" in loop.native_error
    assert loop.kind == "fused"


def test_a_softmax_inside_the_loop_runs_native_too():
    kernel = parse("aₜ = softmax(W·xₜ + U·hₜ₋₁ + b)\nhₜ = aₜ ⊙ hₜ₋₁ + W_h xₜ\n", "attn.eq")
    compiled = compile_kernel(kernel, 6, 1, 4)
    assert native.supported(compiled.network.cells[0]) is None
    ids = torch.randint(0, 4, (7, 3), generator=torch.Generator().manual_seed(0))
    _assert_native(assert_matches_plain_program(compiled.network, random_tensors(compiled.network, 5), ids, 3))


def test_a_built_loop_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("NN2_CACHE", str(tmp_path / "cache"))
    cell = compile_kernel("gru", 10, 1, 4).network.cells[0]
    loop = FusedLoop(cell)
    native.NativeLoop(loop.backward)
    built = sorted((tmp_path / "cache").glob("loop-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(native.NativeUnavailable):
        other = FusedLoop(compile_kernel("gru", 11, 1, 4).network.cells[0])
        native.NativeLoop(other.backward)
    monkeypatch.setenv("CC", "cc")
    native.NativeLoop(loop.backward)
    assert built[0].stat().st_mtime_ns == stamp


def test_an_unwritable_cache_falls_back_to_the_temporary_directory(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("NN2_CACHE", str(blocked / "cache"))        # mkdir fails under a file
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    cell = compile_kernel("rnn", 9, 1, 4).network.cells[0]
    native.NativeLoop(FusedLoop(cell).backward)
    assert len(list((tmp_path / "tmp" / "nn2-cache").glob("loop-*.so"))) == 1


def test_a_compiler_error_is_one_reason_and_the_fused_loop_runs(tmp_path, monkeypatch):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'loop.c:1: error: something broke' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    cell = compile_kernel("lstm", 7, 1, 4).network.cells[0]
    loop = FusedLoop(cell)
    P = [torch.zeros(7, 28)]
    assert loop.implementation([torch.zeros(2, 1, 28)] + P) is loop
    assert loop.native_error == f"{fake} failed: loop.c:1: error: something broke"
    assert loop.kind == "fused"


# --- random cells: the native loop against per-step autograd over the IR itself ---------------
def _random_cell(rng: random.Random) -> Cell:
    tensors = {}

    def param(*shape):
        name = f"p{len(tensors)}"
        tensors[name] = TensorSpec(name, shape, [])
        return Node("param", (), shape[-1], {"tensor": name})

    def node(op, *args, width=None, **attrs):
        return Node(op, args, width or args[0].width, attrs)
    x = Node("input", (), 4)
    states = [Node("state", (), rng.choice([4, 8]), {"name": f"s{i}"}) for i in range(rng.randint(1, 3))]
    pool = list(states) + [node("matmul", x, param(4, w), width=w) for w in rng.sample([4, 8], rng.randint(0, 2))]
    for _ in range(rng.randint(3, 10)):
        a = rng.choice(pool)
        same = [v for v in pool if v.width == a.width and v is not a]
        op = rng.choice(["add", "sub", "mul", "sigmoid", "tanh", "relu", "exp", "neg", "log", "matmul", "matmul",
                         "slice", "concat"])
        if op in ("add", "sub", "mul"):
            b = rng.choice(same + [Node("const", (), 0, {"value": rng.choice([0.5, -2.0])}), param(a.width)])
            new = node(op, *((a, b) if rng.random() < 0.5 else (b, a)), width=a.width)
        elif op == "log":
            new = node("log", node("sigmoid", a))
        elif op == "matmul":
            if a.op == "matmul":
                continue
            w = rng.choice([4, 8])
            new = node("matmul", a, param(a.width, w), width=w)
            if rng.random() < 0.5:                         # a sum the loop folds into addmm
                new = node("add", rng.choice([v for v in pool if v.width == w] + [param(w)]), new, width=w)
        elif op == "slice":
            if a.width != 8:
                continue
            new = node("slice", a, width=4, start=rng.choice([0, 4]))
        elif op == "concat":
            fours = [v for v in pool if v.width == 4]
            if len(fours) < 2:
                continue
            new = node("concat", *rng.sample(fours, 2), width=8)
        else:
            new = node(op, a)
        pool.append(new)
    stateful = {id(s) for s in states}
    for n in pool:
        if any(id(a) in stateful for a in n.args):
            stateful.add(id(n))
    live = [n for n in pool if id(n) in stateful and n.op != "state"]

    def root(width):
        fits = [n for n in live if n.width == width and n.op not in ("slice", "matmul")]
        if fits:
            return rng.choice(fits)
        s = rng.choice(states)
        return node("tanh", node("matmul", s, param(s.width, width), width=width))
    nexts = []
    for s in states:            # distinct next values (two states never share one)
        r = root(s.width)
        nexts.append(r if all(r is not m for m in nexts) else node("tanh", r))
    cell_states = [(f"s{i}", s, n) for i, (s, n) in enumerate(zip(states, nexts))]
    return Cell(0, x, cell_states, root(rng.choice([4, 8])), tensors)


def autograd_steps(cell, loop, E, S, P, T, gouts, gS, matmul=None):
    """Per-step autograd through the cell: (outputs, final states, gradients of E, S and P);
    `matmul(a, b)` computes the products (torch's @ unless given)."""
    from nn2c.backend.fused import TORCH_OPS
    E = [e.clone().requires_grad_() for e in E]
    S0 = [s.clone().requires_grad_() for s in S]
    P = [p.clone().requires_grad_() for p in P]
    S, outs = list(S0), []
    stateful = depends_on_state(cell)
    for t in range(T):
        vals = {p: P[i] for i, p in enumerate(loop.params)}
        vals.update({e: E[i][t] for i, e in enumerate(loop.ext)})
        vals.update({prev: S[i] for i, (_, prev, _) in enumerate(cell.states)})
        for n in cell.nodes():
            if n in vals or n not in stateful:
                continue
            a = [vals[v] if v.op != "const" else v.attrs["value"] for v in n.args]
            if n.op == "slice":
                vals[n] = a[0][:, n.attrs["start"]:n.attrs["start"] + n.width]
            elif n.op == "concat":
                vals[n] = torch.cat(a, -1)
            elif n.op == "matmul" and matmul is not None:
                vals[n] = matmul(a[0], a[1])
            else:
                vals[n] = eval(TORCH_OPS[n.op].format(*[f"a[{k}]" for k in range(len(a))]))
        outs.append(vals[cell.output])
        S = [vals[nxt] for _, _, nxt in cell.states]
    outs = torch.stack(outs)
    ((outs * gouts).sum() + sum((s * g).sum() for s, g in zip(S, gS))).backward()
    grads = [torch.zeros_like(v) if v.grad is None else v.grad for v in (*E, *S0, *P)]
    return outs.detach(), [s.detach() for s in S], grads


def _reference(cell, loop, E, S, P, T, gouts, gS):
    outs, _, grads = autograd_steps(cell, loop, E, S, P, T, gouts, gS)
    return outs, grads[:len(E)], grads[len(E):len(E) + len(S)], grads[len(E) + len(S):]


def random_case(seed: int):
    """A random cell the native loop supports (else the test is skipped), its loop, and
    random inputs: (cell, loop, T, B, E, S, P, output gradients, state gradients)."""
    rng = random.Random(seed)
    cell = _random_cell(rng)
    if native.supported(cell) is not None:
        pytest.skip(native.supported(cell))
    loop = FusedLoop(cell)
    T, B = rng.choice([1, 3, 4]), rng.choice([1, 3])
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen) * 0.5      # noqa: E731
    E = [rnd(T, B, e.width) for e in loop.ext]
    S = [rnd(B, prev.width) for _, prev, _ in cell.states]
    P = [rnd(*cell.tensors[p.attrs["tensor"]].shape) for p in loop.params]
    gouts, gS = rnd(T, B, cell.output.width), [rnd(B, prev.width) for _, prev, _ in cell.states]
    return cell, loop, T, B, E, S, P, gouts, gS


@pytest.mark.parametrize("seed", range(60))
def test_random_cells_match_per_step_autograd(seed):
    """Cells the sample kernels never make: up to three states, slices, concatenations,
    constants and parameter vectors inside the loop, products of loop values, folded sums."""
    cell, loop, T, B, E, S, P, gouts, gS = random_case(seed)
    ref_out, gE, gSr, gP = _reference(cell, loop, E, S, P, T, gouts, gS)
    impl = native.NativeLoop(loop.backward)
    out, finals, K = impl.fwd([e.clone() for e in E], list(S), list(P), T)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    got = impl.bwd(K, gouts, gS, E, P, T)
    for a, b in zip([*got[0], *got[1], *got[2]], [*gE, *gSr, *gP]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

"""Cells as the literature writes them: reductions, division and sqrt (the layer-normalized
LSTM), a readout ending in softmax (Wikipedia's Elman network), output feedback (the Jordan
network). The language's rules with positions; the VM against float64 NumPy written here;
each new operation's gradient in both training loops against autograd of the plain program."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import nn2run
from nn2c.backend import native
from nn2c.backend.network import init_tensors
from nn2c.compiler.emit import param_roles
from nn2c.compiler.pipeline import compile_kernel
from nn2c.lang.check import check
from nn2c.lang.errors import KernelError
from nn2c.lang.parse import parse
from support.messages import assert_points_at
from support.models import assert_matches_plain_program, build_model, random_tensors

H, V, BATCH, STEPS = 8, 7, 3, 60
TOL = 1e-5


def _error(source: str) -> str:
    with pytest.raises(KernelError) as info:
        check(parse(source, "k.eq"))
    return str(info.value)


# --- the language --------------------------------------------------------------------------

def test_reductions_sqrt_and_both_spellings_of_division_check():
    c = check(parse("hₜ = tanh(W xₜ ⊘ sqrt(mean(hₜ₋₁ ⊙ hₜ₋₁) + 1) + U hₜ₋₁ / (1 + max(hₜ₋₁)) − sum(xₜ))\n",
                    "k.eq"))
    assert {n: str(p.shape[0]) for n, p in c.params.items()} == {"W": "H", "U": "H"}


@pytest.mark.parametrize("source, line, col, under, text", [
    ("hₜ = tanh(mean(xₜ) hₜ₋₁ + U hₜ₋₁)\n", 1, 11, "mean", "left operand of a matrix product must be a parameter"),
    ("hₜ = tanh(W mean(xₜ) + U hₜ₋₁)\n", 1, 13, "mean", "must be a vector, not a scalar"),
    ("aₜ = W xₜ\nhₜ = mean(U hₜ₋₁ + aₜ)\n", 2, 1, "hₜ", "is a scalar; a step value must be a vector"),
    ("hₜ = tanh(U hₜ₋₁ + W xₜ ⊙ sum(2))\n", 1, 27, "sum", "reduces a number"),
    ("hₜ = tanh(U hₜ₋₁ + [max(xₜ); xₜ])\n", 1, 21, "max", "cannot concatenate the scalar"),
])
def test_misused_reductions_are_reported_where_they_are(source, line, col, under, text):
    rendered = _error(source)
    assert text in rendered.split("\n")[0], rendered
    assert_points_at(rendered, line, col, under)


def test_division_of_vectors_of_different_sizes_is_reported_at_the_operator():
    rendered = _error("hₜ = tanh(U hₜ₋₁ + xₜ ⊘ hₜ₋₁)\n")
    assert "shapes do not agree: xₜ has X but hₜ₋₁ has H" in rendered
    assert_points_at(rendered, 1, 23, "⊘")


def test_the_cell_may_read_the_previous_readout_but_not_this_steps():
    c = check(parse("hₜ = tanh(W xₜ + U yₜ₋₁)\nyₜ = V_y hₜ\n", "k.eq"))
    assert str(c.feedback) == "yₜ₋₁" and c.states == ()
    assert str(c.params["U"].shape[1]) == "V"
    rendered = _error("hₜ = tanh(W xₜ + U yₜ)\nyₜ = V_y hₜ\n")
    assert "yₜ is this step's readout" in rendered
    assert_points_at(rendered, 1, 20, "yₜ")


def test_output_feedback_through_two_layers_is_one_line_at_check_time(run_cli):
    with pytest.raises(KernelError) as info:
        compile_kernel("jordan", 8, 2, 5)
    assert "needs one layer, not 2" in str(info.value) and ":7:23:" in str(info.value)
    r = run_cli("nn2c", "check", "jordan", "--layers", "2")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[0].endswith("feeds the readout back into the cell, which needs one layer, "
                                             "not 2 (--layers 1)")


def test_nn2c_check_shows_the_distribution_the_feedback_and_the_new_opcodes():
    from nn2c.compiler.report import describe_kernel
    text = describe_kernel("jordan", 8, 5)
    assert "yₜ₋₁ (V, the previous readout" in text and "log-probabilities" in text
    assert " logsoftmax " in text and " softmax " in text
    text = describe_kernel("lnlstm", 8, 5)
    assert all(f" {op} " in text for op in ("mean", "sqrt", "div"))


# --- initial values ------------------------------------------------------------------------

def test_gains_start_at_one_and_additive_biases_at_zero():
    compiled = compile_kernel("lnlstm", H, 1, V)
    roles = param_roles(compiled.network)
    assert roles["α_xf@0"] == roles["α_c@0"] == "gain"
    assert roles["β_c@0"] == roles["b_f@0"] == roles["b_y"] == "bias"
    assert "W_f@0" not in roles and "U_f@0" not in roles
    path, _, _ = build_model_from(compiled, init_tensors(compiled.network, 0))
    with nn2run.load(path) as m:
        np.testing.assert_array_equal(m.param("α_hg", 0), np.ones(H, np.float32))
        np.testing.assert_array_equal(m.param("β_xo", 0), np.zeros(H, np.float32))
        assert 0 < np.abs(m.param("U_o", 0)).max() <= 1 / np.sqrt(H)


def build_model_from(compiled, tensors, path=None):
    import tempfile

    from nn2c.compiler.pipeline import write_model
    from nn2run.codec import CharCodec
    path = path or tempfile.mktemp(suffix=".nnb")
    write_model(path, compiled, tensors, CharCodec([chr(97 + i) for i in range(compiled.vocab)]), {})
    return path, compiled, tensors


# --- the VM against float64 NumPy ----------------------------------------------------------

def _run(path, ids):
    with nn2run.load(path) as m:
        state, out = m.initial_state(BATCH), []
        for t in range(len(ids)):
            logits, state = m.step(ids[t], state)
            out.append(logits)
        return np.stack(out), m


def _params(m, names, layers):
    return {(n, layer): np.array(m.param(n, layer), np.float64) for n in names for layer in range(layers)}


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _ln(z, gain, bias):
    d = z - z.mean(axis=1, keepdims=True)
    return gain * d / np.sqrt((d * d).mean(axis=1, keepdims=True) + 1e-5) + bias


def _ln_gates(terms, gains, biases):
    """Layer normalization over the concatenation of the gates' terms, then split back."""
    z = np.concatenate(terms, axis=1)
    d = z - z.mean(axis=1, keepdims=True)
    n = d / np.sqrt((d * d).mean(axis=1, keepdims=True) + 1e-5)
    return [g * part + b for part, g, b in zip(np.split(n, len(terms), axis=1), gains, biases)]


def _elman64(m, ids, layers):
    p = _params(m, ["W_h", "U_h", "b_h"], layers)
    hs = [np.zeros((BATCH, H)) for _ in range(layers)]
    out = []
    for t in range(len(ids)):
        x = np.eye(V)[ids[t]]
        for k in range(layers):
            hs[k] = x = np.tanh(x @ p["W_h", k].T + hs[k] @ p["U_h", k].T + p["b_h", k])
        out.append(_log_softmax(x @ m.param("W_y").astype(np.float64).T + m.param("b_y")))
    return np.stack(out)


def _jordan64(m, ids):
    p = _params(m, ["W_h", "U_h", "b_h"], 1)
    y = np.zeros((BATCH, V))
    out = []
    for t in range(len(ids)):
        h = np.tanh(np.eye(V)[ids[t]] @ p["W_h", 0].T + y @ p["U_h", 0].T + p["b_h", 0])
        z = h @ m.param("W_y").astype(np.float64).T + m.param("b_y")
        out.append(_log_softmax(z))
        y = np.exp(out[-1])
    return np.stack(out)


def _lnlstm64(m, ids, layers):
    gates = "fiog"
    names = [f"{w}_{g}" for g in gates for w in ("W", "U", "b")]
    names += [f"{a}_{s}{g}" for g in gates for a in ("α", "β") for s in ("x", "h")] + ["α_c", "β_c"]
    p = _params(m, names, layers)
    sig = lambda z: 1 / (1 + np.exp(-z))     # noqa: E731
    hs = [np.zeros((BATCH, H)) for _ in range(layers)]
    cs = [np.zeros((BATCH, H)) for _ in range(layers)]
    out = []
    for t in range(len(ids)):
        x = np.eye(V)[ids[t]]
        for k in range(layers):
            # the paper's form: each of the two terms normalized over all four gates (4H values)
            nx = _ln_gates([x @ p[f"W_{g}", k].T for g in gates], [p[f"α_x{g}", k] for g in gates],
                           [p[f"β_x{g}", k] for g in gates])
            nh = _ln_gates([hs[k] @ p[f"U_{g}", k].T for g in gates], [p[f"α_h{g}", k] for g in gates],
                           [p[f"β_h{g}", k] for g in gates])
            pre = {g: nx[j] + nh[j] + p[f"b_{g}", k] for j, g in enumerate(gates)}
            cs[k] = sig(pre["f"]) * cs[k] + sig(pre["i"]) * np.tanh(pre["g"])
            hs[k] = x = sig(pre["o"]) * np.tanh(_ln(cs[k], p["α_c", k], p["β_c", k]))
        out.append(x @ m.param("W_y").astype(np.float64).T + m.param("b_y"))
    return np.stack(out)


@pytest.mark.parametrize("kernel, layers, reference", [
    ("elman", 2, _elman64), ("jordan", 1, lambda m, ids, _: _jordan64(m, ids)), ("lnlstm", 2, _lnlstm64)])
def test_vm_matches_float64_numpy(tmp_path, kernel, layers, reference):
    path, _, _ = build_model(tmp_path / "m.nnb", kernel, H, layers, V, seed=7)
    ids = np.random.default_rng(1).integers(0, V, size=(STEPS, BATCH))
    got, _ = _run(path, ids)
    with nn2run.load(path) as m:
        want = reference(m, ids, layers)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    if kernel != "lnlstm":       # a softmax readout's logits are log-probabilities
        np.testing.assert_allclose(np.exp(got.astype(np.float64)).sum(-1), 1.0, atol=1e-5)


def test_feedback_is_a_state_the_vm_hands_out_and_resets(tmp_path):
    path, _, _ = build_model(tmp_path / "j.nnb", "jordan", H, 1, V, seed=2)
    with nn2run.load(path) as m:
        state = m.initial_state(BATCH)
        assert [a.shape for a in state.arrays] == [(BATCH, V)]
        logits, state = m.step(np.array([1, 2, 3]), state)
        np.testing.assert_allclose(state.arrays[0], np.exp(logits), atol=1e-6)   # yₜ, the softmax
        from nn2run.vm import VM
        vm = VM(m.program, m.tensors, BATCH)         # what the server's scheduler moves between rows
        vm.advance(np.array([1, 2, 3]))
        np.testing.assert_allclose(vm.state_arrays()[0], state.arrays[0], atol=1e-7)


@pytest.mark.parametrize("op, shapes", [
    ("mean", [(64, 1), (64, 256)]), ("sum", [(64, 1), (64, 256)]), ("max", [(64, 1), (64, 256)]),
    ("sqrt", [(64, 256)] * 2), ("div", [(64, 256)] * 3), ("logsoftmax", [(64, 256)] * 2),
    ("softmax", [(64, 256)] * 2), ("add", [(64, 256), (64, 256), (64, 1)]),
    ("sub", [(64, 256), (64, 1), (64, 256)]), ("div", [(64, 256), (64, 256), (64, 1)])])
def test_the_new_operations_compute_in_place_without_allocating(op, shapes):
    """Bound once, a call allocates nothing (a scalar column read by a wider operation is
    spread with np.copyto, not broadcast by a ufunc, which would make a buffer)."""
    import tracemalloc

    from nn2run.ops import OPS
    rng = np.random.default_rng(0)
    out = np.zeros(shapes[0], np.float32)
    args = [rng.uniform(1, 2, s).astype(np.float32) for s in shapes[1:]]
    calls = OPS[op].numpy(out, *args)
    for fn, a in calls:
        fn(*a)
    ref = {"mean": lambda x: x.mean(1, keepdims=True), "sum": lambda x: x.sum(1, keepdims=True),
           "max": lambda x: x.max(1, keepdims=True), "sqrt": np.sqrt, "div": np.divide, "add": np.add,
           "sub": np.subtract, "softmax": lambda x: np.exp(x) / np.exp(x).sum(1, keepdims=True),
           "logsoftmax": lambda x: x - np.log(np.exp(x).sum(1, keepdims=True))}[op]
    np.testing.assert_allclose(out, ref(*[a.astype(np.float64) for a in args]), rtol=1e-5)
    tracemalloc.start()
    for _ in range(10):
        for fn, a in calls:
            fn(*a)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2048, peak          # a (64, 256) array is 64 KiB


# --- gradients in both loops ---------------------------------------------------------------

EVERY_NEW_OP = """aₜ = U_a hₜ₋₁ + W_a xₜ
mₜ = aₜ ⊘ sqrt(mean(aₜ ⊙ aₜ) + 1) + sum(hₜ₋₁) ⊘ 4 − max(aₜ)
hₜ = tanh(mₜ ⊘ (2 + exp(W_b xₜ + U_b hₜ₋₁)) + hₜ₋₁ / (3 + max(hₜ₋₁ ⊙ hₜ₋₁)))
"""
FEEDBACK = "hₜ = tanh(W_h xₜ + U_h yₜ₋₁ + b_h)\nyₜ = W_y hₜ + b_y\n"
ROWWISE = "hₜ = tanh(W xₜ + U softmax(hₜ₋₁) + log_softmax(V hₜ₋₁))\n"


@pytest.mark.parametrize("loop", ["fused", "native"])
@pytest.mark.parametrize("kernel", ["every-new-op", "lnlstm", "elman", "jordan", "feedback", "rowwise"])
def test_new_operations_train_in_both_loops_as_autograd_says(kernel, loop, monkeypatch):
    if loop == "native" and (not shutil.which("cc") or not native.enabled()):
        pytest.skip("no C compiler")
    monkeypatch.setenv("NN2_NATIVE", "1" if loop == "native" else "0")
    spec = {"every-new-op": parse(EVERY_NEW_OP, "new.eq"), "feedback": parse(FEEDBACK, "fb.eq"),
            "rowwise": parse(ROWWISE, "rw.eq")}.get(kernel, kernel)
    layers = 1 if kernel in ("jordan", "feedback") else 2
    compiled = compile_kernel(spec, 6, layers, 5)
    ids = torch.randint(0, 5, (9, 3), generator=torch.Generator().manual_seed(0))
    net = assert_matches_plain_program(compiled.network, random_tensors(compiled.network, 2), ids, 3)
    assert net.loop_kind() == loop


def test_a_constant_divided_by_zero_is_reported_where_it_is():
    with pytest.raises(KernelError) as info:
        compile_kernel(parse("hₜ = tanh(W xₜ + U hₜ₋₁ ⊘ (2 / 0))\n", "k.eq"), 4, 1, 3)
    assert "2 ⊘ 0 divides by zero" in str(info.value)
    assert_points_at(str(info.value), 1, 30, "/")


def test_a_vector_divided_by_the_number_zero_is_reported_where_it_is():
    with pytest.raises(KernelError) as info:
        compile_kernel(parse("hₜ = tanh(W xₜ + U hₜ₋₁) / 0\n", "k.eq"), 4, 1, 3)
    assert "tanh(W·xₜ + U·hₜ₋₁) ⊘ 0 divides by zero" in str(info.value)
    assert_points_at(str(info.value), 1, 26, "/")


@pytest.mark.parametrize("number", ["1e999", "4e38", "1E39"])
def test_a_number_beyond_float32_is_reported_where_it_is_written(number):
    text = _error(f"hₜ = tanh(W xₜ + U hₜ₋₁ + {number})\n")
    assert f"the number {number} is too large" in text and "3.4e38" in text
    assert_points_at(text, 1, 27, number, width=len(number))


def test_constants_that_fold_beyond_float32_are_reported_at_the_operator():
    with pytest.raises(KernelError) as info:
        compile_kernel(parse("hₜ = tanh(W xₜ + U hₜ₋₁) ⊙ (3e38 + 3e38)\n", "k.eq"), 4, 1, 3)
    assert "3e+38 + 3e+38 is 6e+38, too large" in str(info.value)
    assert_points_at(str(info.value), 1, 34, "+ 3e38")


def test_the_largest_float32_constants_still_compile():
    compiled = compile_kernel(parse("hₜ = tanh(W xₜ + U hₜ₋₁) ⊙ 3.4e38 ⊘ (1.7e38 + 1.7e38)\n", "k.eq"), 4, 1, 3)
    consts = [a[1] for ins in compiled.program["code"] for a in ins[2:] if isinstance(a, list) and a[0] == "k"]
    assert consts == [3.4e38, 3.4e38]


# --- functions of numbers and of parameters ------------------------------------------------

CONSTANT_TERMS = "hₜ = tanh(W xₜ + U hₜ₋₁ + softmax(b) − log_softmax(c) ⊙ σ(d)) ⊙ σ(2) ⊙ exp(−1)\n"


def test_functions_of_numbers_fold_and_functions_of_parameters_run_in_the_vm(tmp_path):
    kernel = tmp_path / "k.eq"
    kernel.write_text(CONSTANT_TERMS, encoding="utf-8")
    path, compiled, _ = build_model(tmp_path / "k.nnb", str(kernel), H, 1, V, seed=4)
    consts = sorted(a[1] for ins in compiled.program["code"] for a in ins[2:] if isinstance(a, list) and a[0] == "k")
    np.testing.assert_allclose(consts, [np.exp(-1.0), 1 / (1 + np.exp(-2.0))], rtol=1e-15)
    ids = np.random.default_rng(2).integers(0, V, size=(STEPS, BATCH))
    got, _ = _run(path, ids)
    with nn2run.load(path) as m:
        p = _params(m, ["W", "U", "b", "c", "d"], 1)
        sm = np.exp(p["b", 0]) / np.exp(p["b", 0]).sum()
        lsm = p["c", 0] - np.log(np.exp(p["c", 0]).sum())
        h, want = np.zeros((BATCH, H)), []
        for t in range(STEPS):
            z = np.eye(V)[ids[t]] @ p["W", 0].T + h @ p["U", 0].T + sm - lsm / (1 + np.exp(-p["d", 0]))
            h = np.tanh(z) / (1 + np.exp(-2.0)) * np.exp(-1.0)
            want.append(h @ m.param("W_y").astype(np.float64).T + m.param("b_y"))
    np.testing.assert_allclose(got, np.stack(want), atol=TOL, rtol=0)


@pytest.mark.parametrize("loop", ["fused", "native"])
def test_functions_of_parameters_train_in_both_loops_as_autograd_says(loop, monkeypatch):
    if loop == "native" and (not shutil.which("cc") or not native.enabled()):
        pytest.skip("no C compiler")
    monkeypatch.setenv("NN2_NATIVE", "1" if loop == "native" else "0")
    compiled = compile_kernel(parse(CONSTANT_TERMS, "k.eq"), 6, 2, 5)
    ids = torch.randint(0, 5, (9, 3), generator=torch.Generator().manual_seed(0))
    net = assert_matches_plain_program(compiled.network, random_tensors(compiled.network, 2), ids, 3)
    assert net.loop_kind() == loop


@pytest.mark.parametrize("term, col, says", [("log(−1)", 28, "log(−1) is not a number"),
                                             ("sqrt(−4)", 28, "sqrt(−4) is not a number"),
                                             ("exp(100)", 28, "exp(100) is 2.68812e+43, too large")])
def test_a_function_of_a_number_without_a_float32_value_is_reported_at_it(term, col, says):
    with pytest.raises(KernelError) as info:
        compile_kernel(parse(f"hₜ = tanh(W xₜ + U hₜ₋₁) ⊙ {term}\n", "k.eq"), 4, 1, 3)
    assert says in str(info.value)
    assert_points_at(str(info.value), 1, col, term.split("(")[0])

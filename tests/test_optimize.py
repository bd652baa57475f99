"""Each optimizer pass: the program before and after, and the same logits after."""

from __future__ import annotations

import numpy as np
import pytest

import nn2run
from nn2c.compiler.lower import lower
from nn2c.compiler.optimize import PASSES, cse, fuse_elementwise, fuse_products, onehot_to_gather, reassociate
from nn2c.compiler.pipeline import compile_kernel
from nn2c.lang.check import check
from nn2c.lang.kernels import load_kernel
from nn2c.lang.parse import parse
from support.models import build_model

H, V = 8, 6


def _ops(cell) -> list[str]:
    return [n.op for n in cell.nodes() if n.op not in ("param", "const", "state", "input")]


def _layer0(kernel="lstm", layers=1):
    return lower(check(load_kernel(kernel)), H, V, layers).cells[0]


def test_onehot_to_gather_turns_products_with_the_token_into_row_lookups():
    before = _layer0()
    after = onehot_to_gather(before)
    assert _ops(before).count("matmul") == 8 and "onehot" in _ops(before)
    assert _ops(after).count("gather") == 4 and _ops(after).count("matmul") == 4
    assert "onehot" not in _ops(after)


def test_fuse_products_stacks_the_four_gates_into_one_product_per_operand():
    after = fuse_products(onehot_to_gather(_layer0()))
    assert _ops(after).count("gather") == 1 and _ops(after).count("matmul") == 1
    shapes = sorted(t.shape for t in after.tensors.values() if len(t.shape) == 2)
    assert shapes == sorted([(H, 4 * H), (V, 4 * H)])


def test_fuse_elementwise_runs_bias_adds_and_activations_once_per_layer():
    cell = fuse_elementwise(fuse_products(reassociate(onehot_to_gather(_layer0()))))
    ops = _ops(cell)
    assert ops.count("sigmoid") == 1                      # f, i, o in one call over 3H
    sig = next(n for n in cell.nodes() if n.op == "sigmoid")
    assert sig.width == 3 * H
    assert ops.count("add") == 3                          # gates+bias, +recurrent, and c = f⊙c + i⊙c̃
    assert any(t.shape == (4 * H,) for t in cell.tensors.values())


def test_reassociate_puts_state_independent_terms_first():
    cell = reassociate(onehot_to_gather(_layer0()))
    gate = next(n for n in cell.nodes() if n.op == "sigmoid")
    top = gate.args[0]                                    # ((W·x + b) + U·h)
    assert top.op == "add" and top.args[1].op == "matmul"
    assert {a.op for a in top.args[0].args} == {"gather", "param"}


def test_cse_merges_a_repeated_product():
    k = parse("aₜ = tanh(W xₜ)\nhₜ = tanh(W xₜ) ⊙ aₜ + U hₜ₋₁\n", "dup.eq")
    cell = lower(check(k), H, V, 1).cells[0]
    assert _ops(cell).count("matmul") == 3
    assert _ops(cse(cell)).count("matmul") == 2


def test_dead_equations_are_not_in_the_program():
    k = parse("dₜ = tanh(D hₜ₋₁) ⊙ hₜ₋₁\nhₜ = tanh(W xₜ + U hₜ₋₁)\n", "dead.eq")
    compiled = compile_kernel(k, H, 1, V)
    used = {a[1] for ins in compiled.program["code"] for a in ins[2:] if isinstance(a, list) and a[0] == "t"}
    assert not any("D" in t for t in used)
    plain = compile_kernel(parse("hₜ = tanh(W xₜ + U hₜ₋₁)\n"), H, 1, V)
    assert len(compiled.program["code"]) == len(plain.program["code"])


def test_the_fused_lstm_step_is_the_hand_written_one():
    """2 products, 2 bias/sum adds, 1 sigmoid, 2 tanh, 3 muls, 1 add per layer, + readout."""
    prog = compile_kernel("lstm", H, 2, V).program
    ops = [ins[0] for ins in prog["code"] if ins[0] != "slice"]
    assert ops.count("matmul") == 2 * 2 - 1 + 1 and ops.count("gather") == 1
    assert ops.count("sigmoid") == 2 and ops.count("tanh") == 4


@pytest.mark.parametrize("upto", range(len(PASSES) + 1))
@pytest.mark.parametrize("kernel", ["lstm", "gru", "torchgru", "mgu"])
def test_every_prefix_of_the_passes_keeps_the_logits(tmp_path, kernel, upto):
    passes = tuple(PASSES)[:upto]
    _, _, logical = build_model(tmp_path / "ref.nnb", kernel, H, 2, V, passes=(), seed=9)
    build_model(tmp_path / "opt.nnb", kernel, H, 2, V, logical, passes=passes)
    ids = np.random.default_rng(0).integers(0, V, (20, 2))
    outs = []
    for name in ("ref.nnb", "opt.nnb"):
        m = nn2run.load(tmp_path / name)
        s, out = m.initial_state(2), []
        for t in ids:
            logits, s = m.step(t, s)
            out.append(logits)
        outs.append(np.stack(out))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=0)


def test_an_unknown_pass_name_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown optimizer pass 'fuse-product'; the passes are onehot-to-gather, "):
        compile_kernel("lstm", H, 1, V, passes=("fuse-product",))

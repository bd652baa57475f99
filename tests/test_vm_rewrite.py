"""The VM's load-time rewrites against float64 NumPy references of the cells, written here.

Each rewrite (`nn2run.rewrite`) is checked on its own and all together: the VM must compute
the kernel's function, `Model.param` must still return the logical weights, and a rewrite
must leave alone a program it cannot apply to.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

import nn2run
import nn2run.threads
from nn2run import groups, rewrite, tables
from nn2run import vm as vm_module
from nn2run.vm import VM
from support.models import build_model

H, LAYERS, V, BATCH, STEPS = 6, 2, 7, 3, 12


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _lstm64(p, x, state, layer):
    c, h = state
    g = {k: x @ p[f"W_{k}@{layer}"].T + h @ p[f"U_{k}@{layer}"].T + p[f"b_{k}@{layer}"] for k in "fioc"}
    c = _sig(g["f"]) * c + _sig(g["i"]) * np.tanh(g["c"])
    h = _sig(g["o"]) * np.tanh(c)
    return [c, h], h


def _torchgru64(p, x, state, layer):
    (h,) = state
    q = {k: p[f"{k}@{layer}"] for k in ("W_ir", "W_iz", "W_in", "W_hr", "W_hz", "W_hn",
                                          "b_ir", "b_iz", "b_in", "b_hr", "b_hz", "b_hn")}
    r = _sig(x @ q["W_ir"].T + q["b_ir"] + h @ q["W_hr"].T + q["b_hr"])
    z = _sig(x @ q["W_iz"].T + q["b_iz"] + h @ q["W_hz"].T + q["b_hz"])
    n = np.tanh(x @ q["W_in"].T + q["b_in"] + r * (h @ q["W_hn"].T + q["b_hn"]))
    h = (1 - z) * n + z * h
    return [h], h


def _gru64(p, x, state, layer):
    (h,) = state
    q = {k: p[f"{k}@{layer}"] for k in ("W_z", "U_z", "b_z", "W_r", "U_r", "b_r", "W_h", "U_h", "b_h")}
    z = _sig(x @ q["W_z"].T + h @ q["U_z"].T + q["b_z"])
    r = _sig(x @ q["W_r"].T + h @ q["U_r"].T + q["b_r"])
    hat = np.tanh(x @ q["W_h"].T + (r * h) @ q["U_h"].T + q["b_h"])
    h = (1 - z) * h + z * hat
    return [h], h


def _rnn64(p, x, state, layer, act=np.tanh):
    (h,) = state
    h = act(x @ p[f"W_h@{layer}"].T + h @ p[f"U_h@{layer}"].T + p[f"b_h@{layer}"])
    return [h], h


CELLS = {"lstm": (_lstm64, 2), "torchgru": (_torchgru64, 1), "gru": (_gru64, 1), "rnn": (_rnn64, 1)}


def _reference(cell, logical, ids):
    """Logits of every step and the final state per layer, all in float64."""
    fn, nstates = CELLS[cell]
    p = {k: v.astype(np.float64) for k, v in logical.items()}
    state = [[np.zeros((BATCH, H)) for _ in range(nstates)] for _ in range(LAYERS)]
    out = []
    for t in range(ids.shape[0]):
        x = np.eye(V)[ids[t]]
        for layer in range(LAYERS):
            state[layer], x = fn(p, x, state[layer], layer)
        out.append(x @ p["W_y"].T + p["b_y"])
    return np.stack(out), state


def _run(vm, ids):
    vm.reset()
    return np.stack([vm.advance(row).copy() for row in ids]), [a.copy() for a in vm.state_arrays()]


def _ids(seed=0):
    return np.random.default_rng(seed).integers(0, V, (STEPS, BATCH))


REWRITES = {
    "all": rewrite.bind,
    "bias into gathers": rewrite.fold_bias_into_gathers,
    "bias into products": rewrite.fold_bias_into_products,
    "sigmoid's ½": rewrite.halve_sigmoid_inputs,
    "bias into sliced producers": rewrite.fold_bias_into_sliced_producers,
    "interpolations": rewrite.fuse_interpolations,
    "concat of slices": rewrite.concat_of_slices,
    "summed products": rewrite.fuse_summed_products,
    "lay out tables": rewrite.lay_out_tables,
}


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("which", sorted(REWRITES))
def test_each_rewrite_keeps_the_cell_function(tmp_path, cell, which):
    path, _, logical = build_model(tmp_path / "m.nnb", cell, H, LAYERS, V, seed=1)
    ids = _ids()
    want, want_state = _reference(cell, logical, ids)
    with nn2run.load(path) as m:
        program, tensors = REWRITES[which](m.program, m.tensors)
        got, got_state = _run(VM(program, tensors, BATCH), ids)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    flat = [s for layer in want_state for s in layer]
    for g, w in zip(got_state, flat):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "torchgru"])
def test_the_model_runs_the_rewritten_program_and_keeps_logical_params(tmp_path, cell):
    path, _, logical = build_model(tmp_path / "m.nnb", cell, H, LAYERS, V, seed=2)
    with nn2run.load(path) as m:
        m.vm(BATCH)
        program, tensors = m._bound
        ops = [ins[0] for ins in program["code"]]
        assert "sigmoid" not in ops and "sigmoid½" in ops      # every gate's ½ was folded
        assert ops.count("matmul1") + ops.count("matmul2") >= 2   # layer 1's input product, the readout
        assert ops.count("add") < [ins[0] for ins in m.program["code"]].count("add")
        for key, value in logical.items():                     # param: the kernel's values, untouched
            name, _, layer = key.partition("@")
            np.testing.assert_array_equal(m.param(name, int(layer) if layer else 0), value)
        got, _ = _run(m.vm(BATCH), _ids(3))
    np.testing.assert_allclose(got, _reference(cell, logical, _ids(3))[0], atol=2e-5, rtol=1e-4)


def test_a_sigmoid_whose_input_is_read_elsewhere_is_left_as_it_is(tmp_path):
    kernel = tmp_path / "gate.eq"
    kernel.write_text("aₜ = W_h xₜ + U_h hₜ₋₁ + b_h\nhₜ = σ(aₜ) ⊙ aₜ\n", encoding="utf-8")
    path, _, logical = build_model(tmp_path / "m.nnb", str(kernel), H, LAYERS, V, seed=4)
    swish = lambda v: _sig(v) * v                                      # noqa: E731
    want, _ = _reference_with(lambda p, x, s, layer: _rnn64(p, x, s, layer, swish), logical, _ids(5))
    with nn2run.load(path) as m:
        program, tensors = rewrite.halve_sigmoid_inputs(*rewrite.fold_bias_into_products(m.program, m.tensors))
        assert "sigmoid" in [ins[0] for ins in program["code"]]
        assert not any(name.endswith(rewrite.HALF) for name in tensors)
        got, _ = _run(VM(program, tensors, BATCH), _ids(5))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def _reference_with(fn, logical, ids):
    CELLS["custom"] = (fn, 1)
    try:
        return _reference("custom", logical, ids)
    finally:
        del CELLS["custom"]


def test_relu_runs_without_numpy_deprecation_warnings(tmp_path):
    kernel = tmp_path / "relu.eq"
    kernel.write_text("hₜ = relu(W_h xₜ + U_h hₜ₋₁ + b_h)\n", encoding="utf-8")
    path, _, logical = build_model(tmp_path / "m.nnb", str(kernel), H, LAYERS, V, seed=6)
    relu = lambda v: np.maximum(v, 0.0)                                 # noqa: E731
    want, _ = _reference_with(lambda p, x, s, layer: _rnn64(p, x, s, layer, relu), logical, _ids(7))
    with nn2run.load(path) as m, warnings.catch_warnings():
        warnings.simplefilter("error")
        got, _ = _run(m.vm(BATCH), _ids(7))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_state_arrays_are_the_live_buffers_of_a_padded_state(tmp_path):
    # h of the top layer feeds the readout's matmul1, so its buffers carry a column of ones
    path, _, logical = build_model(tmp_path / "m.nnb", "lstm", H, LAYERS, V, seed=8)
    ids = _ids(9)
    with nn2run.load(path) as m:
        vm = m.vm(BATCH)
        vm.reset()
        for row in ids[:-1]:
            vm.advance(row)
        for a in vm.state_arrays():     # what the server does when a stream joins: zero its row
            a[1] = 0.0
        got = vm.advance(ids[-1])[1].copy()
        vm.reset()
        one = m.vm(1)
        one.reset()
        want = one.advance(ids[-1][1:2])[0]
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 2, 8, 16, 64])
@pytest.mark.parametrize("k, n", [(256, 1024), (257, 768), (512, 2048), (64, 65)])
def test_column_blocks_cover_the_product_in_small_kernel_sized_blocks(monkeypatch, batch, k, n):
    monkeypatch.setattr(vm_module, "_OPENBLAS", True)
    blocks = vm_module.column_blocks(batch, k, n)
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))          # contiguous, in order
    if len(blocks) > 1:
        assert all(batch * k * (hi - lo) <= vm_module.SMALL_GEMM for lo, hi in blocks)
        assert all(hi - lo >= vm_module.MIN_BLOCK for lo, hi in blocks[:-1])
    assert (len(blocks) > 1) == ((batch, k, n) in {(2, 512, 2048), (8, 256, 1024), (8, 257, 768), (8, 512, 2048),
                                                    (16, 256, 1024), (16, 257, 768), (16, 512, 2048)})
    monkeypatch.setattr(vm_module, "_OPENBLAS", False)
    assert vm_module.column_blocks(batch, k, n) == [(0, n)]


def _blocked_case(tmp_path, monkeypatch, cell, hidden: int, batch: int, seed: int):
    """A model of `hidden` units with OpenBLAS's column blocks on, STEPS rows of `batch`
    ids, and the float64 reference's logits for them."""
    monkeypatch.setattr(vm_module, "_OPENBLAS", True)
    path, _, logical = build_model(tmp_path / "m.nnb", cell, hidden, LAYERS, V, seed=seed)
    ids = np.random.default_rng(seed + 1).integers(0, V, (STEPS, batch))
    monkeypatch.setattr(sys.modules[__name__], "H", hidden)
    monkeypatch.setattr(sys.modules[__name__], "BATCH", batch)
    return path, ids, _reference(cell, logical, ids)[0]


@pytest.mark.parametrize("cell", ["lstm", "torchgru"])
def test_products_bound_in_column_blocks_keep_the_cell_function(tmp_path, monkeypatch, cell):
    # 24 × 129 × 384 multiply-adds and up: over SMALL_GEMM
    path, ids, want = _blocked_case(tmp_path, monkeypatch, cell, hidden=128, batch=24, seed=10)
    with nn2run.load(path) as m:
        batch = ids.shape[1]
        vm = m.vm(batch)
        stacks = [args for fn, args in vm._bindings[0][0] if fn is np.matmul and args[1].ndim >= 3]
        assert stacks and all(np.prod(w.shape[:-2]) > 1 and o.shape[:-2] == w.shape[:-2] for _, w, o in stacks)
        got, _ = _run(vm, ids)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cell", ["gru", "torchgru"])
def test_a_gates_interpolation_becomes_three_passes(tmp_path, cell):
    path, _, logical = build_model(tmp_path / "m.nnb", cell, H, LAYERS, V, seed=12)
    with nn2run.load(path) as m:
        program, tensors = rewrite.fuse_interpolations(m.program, m.tensors)
        before, after = m.program["code"], program["code"]
        assert len(after) == len(before) - LAYERS                     # one pass fewer per layer
        assert not any(ins[0] == "sub" and ins[2] == ["k", 1.0] for ins in after)
        got, _ = _run(VM(program, tensors, BATCH), _ids(13))
    np.testing.assert_allclose(got, _reference(cell, logical, _ids(13))[0], atol=2e-5, rtol=1e-4)


def test_an_interpolation_whose_parts_are_read_elsewhere_is_left_as_it_is(tmp_path):
    kernel = tmp_path / "leak.eq"       # (1 − z) is read twice: the rewrite would lose it
    kernel.write_text("zₜ = σ(W_z xₜ + U_z hₜ₋₁ + b_z)\naₜ = 1 − zₜ\n"
                      "hₜ = aₜ ⊙ hₜ₋₁ + zₜ ⊙ tanh(W_h xₜ) + aₜ\n", encoding="utf-8")
    path, _, _ = build_model(tmp_path / "m.nnb", str(kernel), H, LAYERS, V, seed=14)
    with nn2run.load(path) as m:
        program, _ = rewrite.fuse_interpolations(m.program, m.tensors)
        assert program["code"] == m.program["code"]


def _centred64(p, x, state, layer, order=("h", "g")):
    (h,) = state
    wx = {k: x @ p[f"W_{k}@{layer}"].T for k in "hg"}
    both = np.concatenate([wx[k] for k in order], axis=1)
    h = np.tanh(wx["h"] + h @ p[f"U_h@{layer}"].T + wx["g"] + p[f"b_g@{layer}"] - both.mean(axis=1, keepdims=True))
    return [h], h


@pytest.mark.parametrize("order", [("h", "g"), ("g", "h")])
def test_a_concat_of_adjacent_slices_becomes_one_slice(tmp_path, order):
    kernel = tmp_path / "centred.eq"
    both = f"[W_{order[0]} xₜ; W_{order[1]} xₜ]"
    kernel.write_text(f"gₜ = W_g xₜ + b_g\nhₜ = tanh(W_h xₜ + U_h hₜ₋₁ + gₜ − mean({both}))\n", encoding="utf-8")
    path, _, logical = build_model(tmp_path / "m.nnb", str(kernel), H, LAYERS, V, seed=15)
    want, _ = _reference_with(lambda p, x, s, layer: _centred64(p, x, s, layer, order), logical, _ids(16))
    with nn2run.load(path) as m:
        program, _ = rewrite.concat_of_slices(m.program, m.tensors)
        concats = [ins[0] for ins in program["code"]].count("concat")
        assert concats == (0 if order == ("h", "g") else LAYERS)      # in the stacked order only
        got, _ = _run(m.vm(BATCH), _ids(16))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layers", [2, 3, 4])
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_a_stacked_layers_two_products_become_one_over_a_register_pair(tmp_path, monkeypatch, cell, layers):
    """U·hₜ₋₁ + W·xₜ of a layer above the first is one product of [xₜ, hₜ₋₁, 1]; a state's
    buffers can be in one pair only, so with more layers every other layer is fused."""
    monkeypatch.setattr(sys.modules[__name__], "LAYERS", layers)
    path, _, logical = build_model(tmp_path / "m.nnb", cell, H, layers, V, seed=13)
    ids = _ids(14)
    want, want_state = _reference(cell, logical, ids)
    with nn2run.load(path) as m:
        program, _ = m.bound_program()
        assert [ins[0] for ins in program["code"]].count("matmul2") == layers // 2
        got, got_state = _run(m.vm(BATCH), ids)
        logits, state = m.step(ids[0], m.initial_state(BATCH))      # the functional API on the pairs
        for t in range(1, ids.shape[0]):
            logits, state = m.step(ids[t], state)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(logits, want[-1], atol=2e-5, rtol=1e-4)
    for got_layer, want_layer in zip(np.split(np.array(got_state), layers), want_state):
        np.testing.assert_allclose(np.concatenate(got_layer, 1), np.concatenate(want_layer, 1), atol=2e-5)


def test_at_a_column_blocked_batch_the_pair_product_is_bound_as_the_two_it_replaced(tmp_path, monkeypatch):
    hidden, batch = 256, 4          # 4 × 513 × 1024 multiply-adds: over SMALL_GEMM, in column blocks
    monkeypatch.setattr(sys.modules[__name__], "H", hidden)
    monkeypatch.setattr(sys.modules[__name__], "BATCH", batch)
    path, _, logical = build_model(tmp_path / "m.nnb", "lstm", hidden, LAYERS, V, seed=15)
    ids = np.random.default_rng(16).integers(0, V, (4, batch))
    with nn2run.load(path) as m:
        assert "matmul2" in [ins[0] for ins in m.bound_program()[0]["code"]]
        pair = next(iter(m.vm(batch)._pairs.values()))
        reads = [args for fn, args in m.vm(batch)._bindings[0][0] if fn is np.matmul and args[0].base is pair]
        assert reads and all(a[0].shape[1] < pair.shape[1] for a in reads)     # x alone, then [y, 1]
        got, _ = _run(m.vm(batch), ids)
    np.testing.assert_allclose(got, _reference("lstm", logical, ids)[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("k, n, stride", [(257, 1024, 1040), (513, 65, 65), (33, 16, 32)])
def test_a_laid_out_table_has_its_values_on_cache_lines(k, n, stride):
    """Rows start on 64-byte lines, and a row of whole lines gets one more line of stride, so
    that rows 4 KB apart do not share cache sets; the values are the table's."""
    table = np.random.default_rng(17).standard_normal((k + 1, n)).astype(np.float32)[1:]   # off a line
    got = tables.laid_out(table)
    np.testing.assert_array_equal(got, table)
    assert got.ctypes.data % 64 == 0 and got.strides == (4 * stride, 4)
    assert tables.laid_out(got) is got                 # laid out once (the decoder binds twice)


def test_every_product_reads_a_laid_out_table(tmp_path):
    path, _, _ = build_model(tmp_path / "m.nnb", "lstm", 128, LAYERS, V, seed=18)
    with nn2run.load(path) as m:
        program, tensors = m.bound_program()
        tables = [tensors[ins[-1][1]] for ins in program["code"] if ins[0] in rewrite.PRODUCTS]
        assert len(tables) == 3 and all(t.ctypes.data % 64 == 0 for t in tables)
        assert [t.strides[0] // 4 for t in tables] == [512 + 16, 512 + 16, V]       # V = 65: not padded
        products = [args for fn, args in m.vm(8)._bindings[0][0] if fn is np.matmul]
        assert all(any(np.shares_memory(w, t) for t in tables) for _, w, _ in products)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch, k, n", [(8, 512, 2048), (8, 300, 1000), (16, 257, 768)])
def test_a_product_bound_in_column_blocks_is_the_product(monkeypatch, batch, k, n, threads):
    """Blocks of one width run as stacked matmuls over views of the table and of the output
    (one per thread when the product is large); a width that does not divide n leaves one
    narrower block after them."""
    monkeypatch.setattr(vm_module, "_OPENBLAS", True)
    monkeypatch.setattr(nn2run.threads.POOL, "threads", threads)
    rng = np.random.default_rng(19)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    table = tables.laid_out(rng.standard_normal((k, n)).astype(np.float32))
    out = np.zeros((batch, n + 3), np.float32)[:, 1:n + 1]         # a view, as the VM's registers are
    calls = vm_module._product(out, x, table)
    split = batch * k * n >= nn2run.threads.SPLIT_MIN
    narrower = n % vm_module.column_blocks(batch, k, n)[0][1] != 0
    assert (calls[0][0] == nn2run.threads.POOL.run) == split
    if split:                                   # two shares, the narrower block in the last
        shares = calls[0][1][0]
        assert len(shares) == 2 and [len(sh) for sh in shares] == [1, 1 + narrower]
        stacks = [c for sh in shares for c in sh]
    else:
        assert len(calls) == 1 + narrower
        stacks = calls
    assert all(fn is np.matmul and args[1].ndim == 4 for fn, args in stacks)
    for fn, args in calls:
        fn(*args)
    np.testing.assert_allclose(out, x.astype(np.float64) @ table.astype(np.float64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "torchgru"])
def test_products_split_over_two_threads_keep_the_cell_function(tmp_path, monkeypatch, cell):
    """At 2×512, batch 8, each layer's products are over SPLIT_MIN: bound as one pool call
    whose parts run on this thread and a worker at once. Two threads make the very calls
    one thread makes, so the logits are the same bits; both are the float64 reference's."""
    path, ids, want = _blocked_case(tmp_path, monkeypatch, cell, hidden=512, batch=8, seed=20)
    with nn2run.load(path) as m:
        vm = m.vm(ids.shape[1])
        assert any(fn == nn2run.threads.POOL.run for fn, _ in vm._bindings[0][0])
        runs = {}
        for threads in (1, 2):
            monkeypatch.setattr(nn2run.threads.POOL, "threads", threads)
            runs[threads], _ = _run(vm, ids)
    np.testing.assert_array_equal(runs[2], runs[1])
    np.testing.assert_allclose(runs[2], want, atol=5e-4, rtol=1e-3)     # 1,025-term sums, 12 steps


# --- grouped registers (nn2run.groups) ------------------------------------------------------

def _grouped(vm) -> list:
    """The (groups, batch, width) registers and views a VM's step reads or writes."""
    return [a for _, args in vm._bindings[0][0] for a in args
            if isinstance(a, np.ndarray) and a.ndim == 3 and a.shape[1] == vm.batch and a.flags.c_contiguous]


def test_a_cells_gates_are_grouped_and_its_states_and_logits_are_not(tmp_path, monkeypatch):
    path, _, _ = build_model(tmp_path / "m.nnb", "lstm", 64, LAYERS, V, seed=30)
    with nn2run.load(path) as m:
        program, _ = m.bound_program()
        grouped = groups.grouped_registers(program)
        widths = program["registers"]
        sigmoids = [ins[1] for ins in program["code"] if ins[0] == "sigmoid½"]
        assert len(sigmoids) == LAYERS and all(grouped[r] == 64 and widths[r] == 3 * 64 for r in sigmoids)
        fixed = {program["logits"]} | {r for s in program["states"] for r in (s["prev"], s["next"])}
        assert not fixed & set(grouped) and set(grouped.values()) == {64}
        products = [ins[1] for ins in program["code"] if ins[0] in rewrite.PRODUCTS]
        assert set(products[:-1]) <= set(grouped)                                # the gate products
        assert not set(groups.grouped_registers(program, flat=products)) & set(products)
        monkeypatch.setattr(groups, "MIN_GROUP", 65)                           # narrower than it: none
        assert groups.grouped_registers(program) == {}


def test_registers_read_by_a_row_wise_function_stay_whole(tmp_path):
    """The layer-normalized LSTM takes the mean of each gate's pre-activations: the register
    the means read cannot be groups, nor what shares its storage."""
    path, _, _ = build_model(tmp_path / "m.nnb", "lnlstm", 64, 1, V, seed=31)
    with nn2run.load(path) as m:
        program, _ = m.bound_program()
        grouped = groups.grouped_registers(program)
        rowwise = {ins[2][1] for ins in program["code"] if ins[0] in ("mean", "sum", "max", "softmax")}
        assert rowwise and not rowwise & set(grouped)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("hidden, batch", [(128, 24), (64, 64), (64, 2)])
def test_grouped_registers_keep_the_cell_function(tmp_path, monkeypatch, cell, hidden, batch):
    """At 128 × 24 the gate products are column-blocked and write grouped registers; at 64 ×
    64 they are whole and only what follows them is grouped (an add reads a whole product
    through a strided view). Against the float64 reference."""
    path, ids, want = _blocked_case(tmp_path, monkeypatch, cell, hidden=hidden, batch=batch, seed=32)
    with nn2run.load(path) as m:
        vm = m.vm(batch)
        if cell != "rnn":           # one gate: nothing to group
            assert any(a.shape[2] == hidden and a.shape[0] > 1 for a in _grouped(vm))
        got, _ = _run(vm, ids)
    np.testing.assert_allclose(got, want, atol=5e-4, rtol=1e-3)     # float32 sums of 129 terms, 12 steps


def test_a_model_without_groups_is_bound_as_before(tmp_path, monkeypatch):
    """MIN_GROUP above every width: the same VM without grouped registers, the same bits."""
    path, ids, _ = _blocked_case(tmp_path, monkeypatch, "lstm", hidden=128, batch=24, seed=33)
    runs = []
    for minimum in (groups.MIN_GROUP, 10 ** 9):
        monkeypatch.setattr(groups, "MIN_GROUP", minimum)
        with nn2run.load(path) as m:
            vm = m.vm(ids.shape[1])
            assert bool(_grouped(vm)) == (minimum < 10 ** 9)
            runs.append(_run(vm, ids)[0])
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch, k, h, count", [(8, 512, 512, 4), (8, 300, 500, 2), (8, 600, 1000, 2),
                                                (64, 257, 256, 4)])
def test_a_product_into_a_grouped_register_is_the_product(monkeypatch, batch, k, h, count, threads):
    """Into (groups, batch, h): one stacked matmul over the groups' column blocks (one
    narrower block each where the width does not divide h), or over parts of them, one a
    thread, when the product is large."""
    monkeypatch.setattr(vm_module, "_OPENBLAS", True)
    monkeypatch.setattr(nn2run.threads.POOL, "threads", threads)
    rng = np.random.default_rng(34)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    table = tables.laid_out(rng.standard_normal((k, count * h)).astype(np.float32))
    out = np.zeros((count, batch, h), np.float32)
    calls = vm_module._product(out, x, table)
    split = batch * k * count * h >= nn2run.threads.SPLIT_MIN and len(vm_module.column_blocks(batch, k, h)) > 1
    assert (calls[0][0] == nn2run.threads.POOL.run) == split
    for fn, args in calls:
        fn(*args)
    want = x.astype(np.float64) @ table.astype(np.float64)
    np.testing.assert_allclose(out, want.reshape(batch, count, h).transpose(1, 0, 2), rtol=1e-4, atol=1e-4)


def test_an_element_wise_operand_is_seen_as_groups():
    rng = np.random.default_rng(35)
    whole = rng.standard_normal((3, 20)).astype(np.float32)
    view = whole[:, 4:16]                                      # (3, 12), strided, as 3 groups of 4
    want = view.reshape(3, 3, 4).transpose(1, 0, 2)
    np.testing.assert_array_equal(groups.grouped_view(view, 4), want)
    row = rng.standard_normal(12).astype(np.float32)
    np.testing.assert_array_equal(groups.grouped_view(row, 4)[:, 0], row.reshape(3, 4))
    column = whole[:, :1]
    assert groups.grouped_view(column, 4) is column and groups.grouped_view(np.float32(2), 4) == 2
    grouped = np.zeros((3, 3, 4), np.float32)
    assert groups.grouped_view(grouped, 4) is grouped


def test_groups_meet_columns_tensors_constants_and_whole_registers():
    """A program written here: a gate register times a row's sum (a column, either side), a
    row of weights, a constant and a gathered (batch, 4H) register read as groups, a slice
    of two groups times a 2H row; grouped at batch 24 and 64 (the product is bound whole or
    in blocks), against float64."""
    from nn2run import isa
    hidden, vocab = 64, 64
    rng = np.random.default_rng(36)
    tensors = {n: rng.uniform(-0.5, 0.5, s).astype(np.float32)
               for n, s in {"E": (vocab, 4 * hidden), "W": (hidden, 4 * hidden), "b": (4 * hidden,),
                            "v": (2 * hidden,)}.items()}
    r, t, k = (lambda i: ["r", i]), (lambda n: ["t", n]), (lambda x: ["k", x])
    code = [["gather", 1, t("E")], ["matmul", 2, r(0), t("W")], ["sum", 3, r(0)],
            ["mul", 4, r(2), r(3)], ["sub", 5, r(3), r(4)], ["add", 6, r(5), t("b")], ["add", 7, r(6), r(1)],
            ["mul", 8, r(7), k(0.5)], ["slice", 9, r(8), 64], ["mul", 10, r(9), t("v")], ["slice", 11, r(10), 64],
            ["slice", 12, r(8), 0], ["add", 13, r(11), r(12)], ["tanh", 14, r(13)], ["tanh", 15, r(8)],
            ["slice", 16, r(15), 192]]
    widths = [hidden, 4 * hidden, 4 * hidden, 1, *[4 * hidden] * 5, 2 * hidden, 2 * hidden, hidden, hidden, hidden,
              hidden, 4 * hidden, vocab]
    program = {"registers": widths, "states": [{"name": "h", "layer": 0, "prev": 0, "next": 14}], "logits": 16,
               "code": code}
    isa.validate(program, {n: a.shape for n, a in tensors.items()}, vocab)
    p = {n: a.astype(np.float64) for n, a in tensors.items()}
    for batch in (24, 64):
        vm = VM(program, tensors, batch)
        assert any(a.shape[0] == 4 for a in _grouped(vm))
        vm.reset()
        h = np.zeros((batch, hidden))
        for step in range(5):
            ids = (np.arange(batch) + step) % vocab
            q = ((h.sum(1, keepdims=True) - (h @ p["W"]) * h.sum(1, keepdims=True)) + p["b"] + p["E"][ids]) * 0.5
            h, want = np.tanh((q[:, 64:192] * p["v"])[:, 64:128] + q[:, :64]), np.tanh(q)[:, 192:]
            np.testing.assert_allclose(vm.advance(ids), want, rtol=1e-4, atol=2e-4)   # float32 sums of 64
        np.testing.assert_allclose(vm.state_arrays()[0], h, rtol=1e-4, atol=2e-4)

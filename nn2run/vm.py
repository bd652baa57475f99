"""The VM: runs a validated program (see `nn2run.isa`) over preallocated NumPy arrays.

All work that does not depend on the data is done once, when a VM is built for a batch
size: registers are allocated, slices become views, every instruction is bound to its
ufunc and arrays (each operator's NumPy implementation is in `nn2run.ops`). A step is
then a flat loop of ufunc calls writing in place (`out=`), with no allocation. State is
double-buffered: the program is bound twice, with the `prev` and `next` buffers of each
state swapped, and steps alternate between the two bindings, so carrying state from one
step to the next copies nothing. `Model.step` hands the buffers out as the new State
(`hand_out`) and the VM makes that State copy them before it writes them again.

The program bound is the file's after the load-time rewrites of `nn2run.rewrite`; a
register that a `matmul1` reads is allocated with one more column, of ones, after it
(for a state, both of its buffers), so the product adds its bias row itself; the two
registers a `matmul2` reads are laid side by side in one array, then the ones.

At a small batch a product is bound as column blocks (`column_blocks`): OpenBLAS multiplies
a product of at most 10⁶ multiply-adds with its small-matrix kernel, which reads the
weights where they lie, while a larger one first copies (packs) the whole weight matrix,
which at a few rows costs more than the arithmetic. A 256×1024 product at batch 8 takes
about half the time as three blocks of ~342 columns. The tables are laid out for it at load
(`nn2run.tables`: rows on cache lines, 4 KB strides broken).

A register read in groups of columns (a cell's gates) is a (groups, batch, width) array
(`nn2run.groups`): its slices are groups, contiguous, and an element-wise instruction that
reads or writes one sees every operand as groups. Not the output of a product bound whole:
as groups it would be one BLAS call per group, each packing the input again.

Imports NumPy and the standard library only.
"""

from __future__ import annotations

import weakref

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import threads
from .groups import ELEMENTWISE, grouped_registers, grouped_view
from .ops import OPS
from .rewrite import LOADTIME, PRODUCTS, fold_bias_into_gathers, padded_registers, register_pairs  # noqa: F401 (re-exported)

SMALL_GEMM = 1_000_000     # OpenBLAS's small-matrix sgemm takes M·N·K up to 100³ (no packing)
MIN_BLOCK = 64             # narrower blocks lose more to the kernel's edges than packing costs


def _blas() -> str:
    try:
        return str(np.__config__.CONFIG["Build Dependencies"]["blas"]["name"])
    except (AttributeError, KeyError, TypeError):
        return ""


_OPENBLAS = "openblas" in _blas().lower()


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def column_blocks(batch: int, k: int, n: int) -> list[tuple[int, int]]:
    """[lo, hi) column ranges a (batch, k) × (k, n) product is bound as: one range unless
    NumPy's BLAS is OpenBLAS, which would pack the weights, and blocks of at least
    MIN_BLOCK columns avoid it. Batch 1 is OpenBLAS's gemv (no packing) and stays whole.
    The blocks are of one width, a multiple of 16 (each starts on a cache line of a laid-out
    table) that divides n where one does, so that `_product` makes them one call."""
    if not _OPENBLAS or batch < 2 or batch * k * n <= SMALL_GEMM:
        return [(0, n)]
    widest = SMALL_GEMM // (batch * k) // 16 * 16
    if widest < MIN_BLOCK:
        return [(0, n)]
    width = next((w for w in range(widest, MIN_BLOCK - 1, -16) if n % w == 0), None) \
        or _ceil(_ceil(n, _ceil(n, widest)), 16) * 16      # even blocks, a multiple of 16, ≤ widest
    return [(lo, min(lo + width, n)) for lo in range(0, n, width)]


def plain_register(batch: int, width: int, ones: bool, with_ones: dict) -> np.ndarray:
    """A (batch, width) register; one that a `matmul1` reads is a view of an array with a
    column of ones after it, recorded in `with_ones` by the view's id."""
    if not ones:
        return np.zeros((batch, width), dtype=np.float32)
    full = np.zeros((batch, width + 1), dtype=np.float32)
    full[:, width] = 1.0
    view = full[:, :width]
    with_ones[id(view)] = full
    return view


def _product(out, x, w) -> list:
    """out = x @ w as bound, out a (batch, n) register or a grouped one (groups, batch, h)
    whose group g is w's columns g·h to (g + 1)·h (`nn2run.groups`; a (batch, n) register
    is one group). Whole when the product is one call, else each group in column blocks:
    those of one width in one stacked matmul over views of the table and of out (NumPy calls
    BLAS once per block, from C), a narrower last one in one more; a large product's blocks
    in parts, one per thread, run at once (`nn2run.threads`)."""
    grid = out if out.ndim == 3 else out[None]
    groups, batch, h = grid.shape
    blocks = column_blocks(batch, w.shape[0], h)
    if len(blocks) == 1 and out.ndim == 2:
        return [(np.matmul, (x, w, out))]
    width = blocks[0][1]
    full = sum(hi - lo == width for lo, hi in blocks)
    rest = h - full * width
    work = batch * w.shape[0] * w.shape[1]
    if len(blocks) == 1 or work < threads.SPLIT_MIN:
        return [_grid(grid, x, w, 0, full, width)] + ([_grid(grid, x, w, full * width, 1, rest)] if rest else [])
    parts = min(groups * full, max(2, threads.get_threads()))
    cuts = [groups * full * k // parts for k in range(parts + 1)]
    shares = []
    for a, b in zip(cuts, cuts[1:]):            # blocks a..b of the groups' blocks, in order
        share = []
        for g in range(a // full, _ceil(b, full)):
            lo, hi = max(a, g * full) - g * full, min(b, (g + 1) * full) - g * full
            share.append(_grid(grid[g:g + 1], x, w[:, g * h:], lo * width, hi - lo, width))
            if hi == full and rest:
                share.append(_grid(grid[g:g + 1], x, w[:, g * h:], full * width, 1, rest))
        shares.append(share)
    return [(threads.POOL.run, (shares,))]


def _grid(out, x, w, lo: int, count: int, width: int):
    """One matmul of x by `count` column blocks of every group of w, from column lo of each
    group, into those of out (groups, batch, h): a (groups, count) stack of products."""
    groups, _, h = out.shape
    (w_row, w_col), (o_grp, o_row, o_col) = w.strides, out.strides
    table = as_strided(w[:, lo:], (groups, count, w.shape[0], width), (h * w_col, width * w_col, w_row, w_col))
    into = as_strided(out[:, :, lo:], (groups, count, out.shape[1], width), (o_grp, width * o_col, o_row, o_col))
    return (np.matmul, (x, table, into))


class VM:
    """A program bound to arrays for one batch size."""

    def __init__(self, program: dict, tensors: dict, batch: int):
        self.batch = batch
        self.ids = np.zeros(batch, dtype=np.intp)
        widths = program["registers"]
        self._states = program["states"]
        padded = padded_registers(program)
        grouped = grouped_registers(program, self._whole_products(program, tensors)) if batch > 1 else {}
        self._with_ones = {}    # id(register array) -> that array with its column of ones
        self._pairs = {}        # (id(x), id(y)) -> the array [x, y, 1] of a matmul2
        base = {}
        for x, y in register_pairs(program):
            full = np.zeros((batch, widths[x] + widths[y] + 1), dtype=np.float32)
            full[:, -1] = 1.0
            base[x], base[y] = full[:, :widths[x]], full[:, widths[x]:-1]
            self._with_ones[id(base[y])] = full[:, widths[x]:]
            self._pairs[id(base[x]), id(base[y])] = full
        written = {ins[1] for ins in program["code"] if ins[0] != "slice"} | {s["prev"] for s in self._states}
        for r in written - set(base):
            if r in grouped:
                base[r] = np.zeros((widths[r] // grouped[r], batch, grouped[r]), dtype=np.float32)
            else:
                base[r] = plain_register(batch, widths[r], r in padded, self._with_ones)
        self._buffers = [(base[s["prev"]], base[s["next"]]) for s in self._states]  # per state: (A, B)
        self._sets = [[pair[k] for pair in self._buffers] for k in (0, 1)]        # per parity: the buffers
        self._bindings = [self._bind(program, tensors, base, swap) for swap in (False, True)]
        self.parity = 0
        self._holders = [None, None]    # per buffer set: a weak reference to the State it was handed out as

    def _whole_products(self, program, tensors) -> set:
        """The registers of products bound whole at this batch: they stay (batch, n) arrays,
        as one BLAS call (grouped, it would be one a group, each packing the input again)."""
        return {ins[1] for ins in program["code"] if ins[0] in PRODUCTS and ins[-1][0] == "t"
                and len(column_blocks(self.batch, *tensors[ins[-1][1]].shape)) == 1}

    def _bind(self, program, tensors, base, swap: bool):
        regs = dict(base)
        if swap:
            for s in self._states:
                regs[s["prev"]], regs[s["next"]] = base[s["next"]], base[s["prev"]]
        code = []
        for ins in program["code"]:
            op, dst, args = ins[0], ins[1], ins[2:]
            if op == "slice":
                src, start, width = regs[args[0][1]], args[1], program["registers"][dst]
                if src.ndim == 3:           # a grouped register: a group, or a run of them
                    g, n = start // src.shape[2], width // src.shape[2]
                    regs[dst] = src[g] if n == 1 else src[g:g + n]
                else:
                    regs[dst] = src[:, start:start + width]
                continue
            code.extend(self._compile(op, regs[dst], [self._value(a, regs, tensors) for a in args]))
        return code, regs[program["logits"]]

    @staticmethod
    def _value(operand, regs, tensors):
        tag, val = operand
        if tag == "r":
            return regs[val]
        if tag == "t":
            return tensors[val]
        return np.float32(val)

    def _compile(self, op, out, args):
        if op in ("onehot", "gather"):          # they read the step's token ids
            args = [self.ids, *args]
        if op == "matmul1":
            args = [self._with_ones[id(args[0])], *args[1:]]
        if op == "matmul2":
            return self._pair_product(out, *args)
        if op in ("matmul", "matmul1"):
            return _product(out, *args)
        grouped = [a.shape[2] for a in (out, *args) if isinstance(a, np.ndarray) and a.ndim == 3]
        if grouped and op in ELEMENTWISE:       # every operand as (groups, batch, width)
            out, args = grouped_view(out, grouped[0]), [grouped_view(a, grouped[0]) for a in args]
        return (OPS.get(op) or LOADTIME[op]).numpy(out, *args)

    def _pair_product(self, out, x, y, table) -> list:
        """[x, y, 1] @ table as one product, or, where the batch is small enough for column
        blocks (OpenBLAS's small kernel), as the two products and an add it replaced: two
        blocked products under the kernel's limit are faster than one over it."""
        full = self._pairs[id(x), id(y)]
        if len(column_blocks(x.shape[0], *table.shape)) == 1:
            return _product(out, full, table)
        rest = np.zeros_like(out)
        width = x.shape[1]
        return (_product(out, x, table[:width]) + _product(rest, full[:, width:], table[width:])
                + [(np.add, (out, rest, out))])

    def advance(self, ids) -> np.ndarray:
        """One step for every stream: ids (batch,) -> logits (batch, vocab).

        The logits array is owned by the VM and overwritten by the next step.
        """
        if self._holders[self.parity ^ 1] is not None:
            self._release(self.parity ^ 1)       # the buffers this step writes
        self.ids[:] = ids
        code, logits = self._bindings[self.parity]
        for fn, args in code:
            fn(*args)
        self.parity ^= 1
        return logits

    def state_arrays(self) -> list:
        """The current state buffers (the `prev` of the next step), not copies, to read or
        write; a State handed out on them gets copies first."""
        self._release(self.parity)
        return [pair[self.parity] for pair in self._buffers]

    def hand_out(self, state):
        """`state` (a `nn2run.model.State`) made of the current buffers, without a copy;
        the VM detaches it (the State copies them) before it writes them again."""
        state._arrays = self._sets[self.parity]     # replaced, never changed in place, by State
        state._vm = self
        self._holders[self.parity] = weakref.ref(state)
        return state

    def holder(self):
        """The State handed out on the current buffers, if it is still attached to them."""
        ref = self._holders[self.parity]
        return ref() if ref is not None else None

    def _release(self, k: int) -> None:
        ref, self._holders[k] = self._holders[k], None
        state = ref() if ref is not None else None
        if state is not None and state._vm is self:
            state._detach()

    def reset(self) -> None:
        self._release(0)
        self._release(1)
        for a, b in self._buffers:
            a.fill(0.0)
            b.fill(0.0)
        self.parity = 0

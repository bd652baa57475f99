"""The decoder machine of a seq2seq model: a validated decoder program (`nn2run.isa.
validate_decoder`) bound to preallocated float32 arrays for one batch size and one source
length J.

A per-position register is a (J, batch, width) array, a plain one (batch, width); in an
instruction whose result is per-position, a plain register operand is read as a
(1, batch, width) view, so it broadcasts over the positions. Positions outermost keep each
position's rows one contiguous block: a broadcast add runs as J passes of batch × width
instead of batch × J short rows (2.5× faster at 64 × 29 × 128), a per-position product is
one (J·batch, in) product, and the encoder writes its output at position t as one block.
`memory`, `final` and the length mask (J, batch, 1) are filled by the model after the
encoder; `prepare` then runs
once; `advance` runs one step. As in `nn2run.vm`, the step code is bound twice with each
state's two buffers swapped, so a step allocates nothing and copies no state; `reorder`
(beam search) gathers the states by parent row into the other buffer.

One fusion at bind time: an attention's context `sumj(mul(α, memory))`, with α a
`softmaxj` result of width 1 read by nothing else, is one batched product, per row
α (1, J) @ memory (J, width), over transposed views (`weighted_sums`). It is exact: α is
exactly 0 at the positions the mask excludes and the memory is 0 there, so the unmasked
sum adds zeros (several times faster than the element-wise product, the mask and the
reduction).

Imports NumPy and the standard library only.
"""

from __future__ import annotations

import numpy as np

from .ops import OPS
from .rewrite import LOADTIME, padded_registers
from .vm import plain_register


def _reduce_positions(op, out, a):
    """sum / mean / max of each position's row: (J, batch, w) -> (J, batch, 1)."""
    ufunc = np.maximum if op == "max" else np.add
    calls = [(ufunc.reduce, (a, 2, None, out, True))]
    if op == "mean":
        calls.append((np.multiply, (out, np.float32(1.0 / a.shape[2]), out)))
    return calls


def _concat_positions(out, parts):
    calls, at = [], 0
    for p in parts:
        calls.append((np.copyto, (out[..., at:at + p.shape[-1]], p)))
        at += p.shape[-1]
    return calls


def weighted_sums(program: dict) -> dict[int, tuple[int, int]]:
    """The `sumj` instructions of the step code to bind as one product: code index of the
    sumj -> (α register, memory register); their `mul` is not bound (see the docstring)."""
    code = program["code"]
    writer = {ins[1]: ins for ins in program["prepare"] + code}
    reads: dict[int, int] = {}
    for ins in program["prepare"] + code:
        for a in ins[2:]:
            if isinstance(a, list) and a[0] == "r":
                reads[a[1]] = reads.get(a[1], 0) + 1
    outputs = {program["logits"]} | {s["next"] for s in program["states"]}
    widths, memory = program["registers"], program["memory"]
    fused = {}
    for pc, ins in enumerate(code):
        if ins[0] != "sumj" or ins[2][0] != "r":
            continue
        product = writer.get(ins[2][1])
        if product is None or product[0] != "mul" or reads.get(product[1]) != 1 or product[1] in outputs:
            continue
        regs = [a[1] for a in product[2:] if a[0] == "r"]
        if len(regs) != 2 or memory not in regs:
            continue
        alpha = regs[1] if regs[0] == memory else regs[0]
        if widths[alpha] == 1 and writer.get(alpha, [None])[0] == "softmaxj":
            fused[pc] = (alpha, memory)
    return fused


def in_place(program: dict) -> dict[int, int]:
    """Per-position activations of the step to run in place: dst -> its operand, when the
    operand is a per-position register the step writes and nothing else reads. A (J, batch,
    width) array is large (29 × 64 × 128 floats is 950 KB): one fewer keeps the step's
    arrays in the core's cache."""
    code, positional = program["code"], set(program["positional"])
    reads: dict[int, int] = {}
    for ins in program["prepare"] + code:
        for a in ins[2:]:
            if isinstance(a, list) and a[0] == "r":
                reads[a[1]] = reads.get(a[1], 0) + 1
    writes: dict[int, int] = {}
    for ins in code:
        writes[ins[1]] = writes.get(ins[1], 0) + 1
    alias: dict[int, int] = {}
    for ins in code:
        op = OPS.get(ins[0]) or LOADTIME[ins[0]]
        if op.kind != "activation" or op.rowwise or ins[2][0] != "r":
            continue
        dst, src = ins[1], ins[2][1]
        if {dst, src} <= positional and writes.get(dst) == writes.get(src) == 1 and reads.get(src) == 1:
            alias[dst] = alias.get(src, src)
    return alias


def _bind_weighted_sum(out, alpha, memory):
    """out (batch, w) = Σⱼ α (J, batch, 1) · memory (J, batch, w): per row, (1, J) @ (J, w)."""
    return [(np.matmul, (alpha.transpose(1, 2, 0), memory.transpose(1, 0, 2), out[:, None, :]))]


def _bind_positional_product(out, a, matrix):
    """A per-position product (J, batch, in) @ (in, w) as one (J·batch, in) product."""
    return [(np.matmul, (a.reshape(-1, a.shape[-1]), matrix, out.reshape(-1, out.shape[-1])))]


class DecoderVM:
    """A decoder program bound for `batch` rows and sources of `positions` tokens."""

    def __init__(self, program: dict, tensors: dict, batch: int, positions: int):
        self.batch, self.positions = batch, positions
        self.ids = np.zeros(batch, dtype=np.intp)
        self.mask = np.zeros((positions, batch, 1), dtype=np.float32)
        widths, positional = program["registers"], set(program["positional"])
        self._positional = positional
        self._states = program["states"]
        written = {ins[1] for ins in program["prepare"] + program["code"] if ins[0] != "slice"}
        written |= {program["memory"], program["final"]} | {s["prev"] for s in self._states}
        padded = padded_registers(program)
        self._with_ones = {}    # id(register array) -> that array with its column of ones
        alias = in_place(program)
        base = {r: np.zeros((positions, batch, widths[r]), np.float32) if r in positional
                else plain_register(batch, widths[r], r in padded, self._with_ones) for r in written if r not in alias}
        for dst, src in alias.items():
            base[dst] = base[src]
        self.memory, self.final = base[program["memory"]], base[program["final"]]
        self._buffers = [(base[s["prev"]], base[s["next"]]) for s in self._states]
        regs = dict(base)
        self._prepare = self._bind(program["prepare"], widths, regs, tensors)
        self._inits = [None if s.get("init") is None else regs[s["init"]] for s in self._states]
        self._bindings, self._regs = [], []
        for swap in (False, True):
            step_regs = dict(regs)
            if swap:
                for s in self._states:
                    step_regs[s["prev"]], step_regs[s["next"]] = regs[s["next"]], regs[s["prev"]]
            code = self._bind(program["code"], widths, step_regs, tensors, weighted_sums(program))
            self._bindings.append((code, step_regs[program["logits"]]))
            self._regs.append(step_regs)
        self.parity = 0

    def _bind(self, code, widths, regs, tensors, fused=None) -> list:
        fused = fused or {}
        dropped = {code[pc][2][1] for pc in fused}         # the products the fused sums replace
        calls = []
        for pc, ins in enumerate(code):
            op, dst, args = ins[0], ins[1], ins[2:]
            if pc in fused:
                alpha, memory = fused[pc]
                calls.extend(_bind_weighted_sum(regs[dst], regs[alpha], regs[memory]))
                continue
            if op == "mul" and dst in dropped:
                continue
            if op == "slice":
                regs[dst] = regs[args[0][1]][..., args[1]:args[1] + widths[dst]]
                continue
            per = dst in self._positional
            values = [self._value(a, regs, tensors, per, calls) for a in args]
            calls.extend(self._compile(op, regs[dst], values, per))
        return calls

    def _value(self, operand, regs, tensors, per: bool, calls: list):
        tag, val = operand
        if tag == "r":
            a = regs[val]
            if not per or val in self._positional:
                return a
            if not a.flags.c_contiguous:
                # a plain operand broadcast over the positions: a slice of a wider product is
                # copied whole first, else the pass runs in rows of `width` (3× slower)
                contiguous = np.zeros(a.shape, np.float32)
                calls.append((np.copyto, (contiguous, a)))
                a = contiguous
            return a[None]
        if tag == "t":
            return tensors[val]
        return np.float32(val)

    def _compile(self, op, out, args, per: bool) -> list:
        if op in ("onehot", "gather"):              # they read the step's token ids
            args = [self.ids, *args]
        if op in ("softmaxj", "sumj"):
            args = [*args, self.mask]
        if per and op in ("sum", "mean", "max"):
            return _reduce_positions(op, out, args[0])
        if per and op == "concat":
            return _concat_positions(out, args)
        if per and op == "matmul" and args[0].ndim == 3 and args[0].flags.c_contiguous:
            return _bind_positional_product(out, *args)
        if op == "matmul1":
            args = [self._with_ones[id(args[0])], *args[1:]]
        return (OPS.get(op) or LOADTIME[op]).numpy(out, *args)

    def start(self) -> None:
        """After memory, final and mask are filled: run prepare, set the initial states."""
        for fn, args in self._prepare:
            fn(*args)
        self.parity = 0
        for (prev, _), init in zip(self._buffers, self._inits):
            if init is None:
                prev.fill(0.0)
            else:
                np.copyto(prev, init)

    def advance(self, ids) -> np.ndarray:
        """One decoder step: the previous tokens (batch,) -> logits (batch, Vt), owned by the VM."""
        self.ids[:] = ids
        code, logits = self._bindings[self.parity]
        for fn, args in code:
            fn(*args)
        self.parity ^= 1
        return logits

    def reorder(self, parents) -> None:
        """Row i of every state becomes row parents[i] of it (written into the other buffer)."""
        for pair in self._buffers:
            np.take(pair[self.parity], parents, 0, pair[self.parity ^ 1])
        self.parity ^= 1

    def state_arrays(self) -> list:
        return [pair[self.parity] for pair in self._buffers]

    def register(self, r: int) -> np.ndarray:
        """Register r as the last step left it, a per-position one as a (batch, J, width)
        view (not a copy): a test reads attention weights."""
        a = self._regs[self.parity ^ 1][r]
        return a.transpose(1, 0, 2) if r in self._positional else a

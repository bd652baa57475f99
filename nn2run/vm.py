"""The VM: runs a validated program (see `nn2run.isa`) over preallocated NumPy arrays.

All work that does not depend on the data is done once, when a VM is built for a batch
size: registers are allocated, slices become views, every instruction is bound to its
ufunc and arrays (each operator's NumPy implementation is in `nn2run.ops`). A step is
then a flat loop of ufunc calls writing in place (`out=`), with no allocation. State is
double-buffered: the program is bound twice, with the `prev` and `next` buffers of each
state swapped, and steps alternate between the two bindings, so carrying state from one
step to the next copies nothing.

Imports NumPy and the standard library only.
"""

from __future__ import annotations

import numpy as np

from .ops import OPS

FOLD_LIMIT = 1 << 22      # bytes: bias-folded gather tables larger than this are not made


def fold_bias_into_gathers(program: dict, tensors: dict) -> tuple[dict, dict]:
    """Peephole, done once per model (not per batch size): `gather d T; add e d b` (d read
    once, b a vector) is `gather e (T + b)` — a one-hot row plus a bias is a row of the table
    plus the bias. Returns the program and tensors to bind."""
    code = program["code"]
    reads: dict[int, int] = {}
    for ins in code:
        for a in ins[2:]:
            if isinstance(a, list) and a[0] == "r":
                reads[a[1]] = reads.get(a[1], 0) + 1
    for r in [s["next"] for s in program["states"]] + [program["logits"]]:
        reads[r] = reads.get(r, 0) + 1
    gathers = {ins[1]: ins[2][1] for ins in code if ins[0] == "gather"}
    out, extra, dropped = [], dict(tensors), set()
    for ins in code:
        if ins[0] == "add":
            pair = [a for a in ins[2:] if a[0] == "r" and a[1] in gathers and reads[a[1]] == 1]
            bias = [a for a in ins[2:] if a[0] == "t"]
            table = tensors[gathers[pair[0][1]]] if pair else None
            if pair and bias and table.nbytes <= FOLD_LIMIT:
                name = f"{gathers[pair[0][1]]}+{bias[0][1]}"
                extra[name] = table + tensors[bias[0][1]]
                out.append(["gather", ins[1], ["t", name]])
                dropped.add(pair[0][1])
                continue
        out.append(ins)
    code = [ins for ins in out if not (ins[0] == "gather" and ins[1] in dropped)]
    return {**program, "code": code}, extra


class VM:
    """A program bound to arrays for one batch size."""

    def __init__(self, program: dict, tensors: dict, batch: int):
        self.batch = batch
        self.ids = np.zeros(batch, dtype=np.intp)
        widths = program["registers"]
        self._states = program["states"]
        written_by_code = {ins[1] for ins in program["code"] if ins[0] != "slice"}
        base = {}
        for r in written_by_code:
            base[r] = np.zeros((batch, widths[r]), dtype=np.float32)
        self._buffers = []      # per state: (buffer A, buffer B)
        for s in self._states:
            base[s["prev"]] = np.zeros((batch, widths[s["prev"]]), dtype=np.float32)
            self._buffers.append((base[s["prev"]], base[s["next"]]))
        self._bindings = [self._bind(program, tensors, base, swap) for swap in (False, True)]
        self.parity = 0

    def _bind(self, program, tensors, base, swap: bool):
        regs = dict(base)
        if swap:
            for s in self._states:
                regs[s["prev"]], regs[s["next"]] = base[s["next"]], base[s["prev"]]
        code = []
        for ins in program["code"]:
            op, dst, args = ins[0], ins[1], ins[2:]
            if op == "slice":
                src, start = regs[args[0][1]], args[1]
                regs[dst] = src[:, start:start + program["registers"][dst]]
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
        return OPS[op].numpy(out, *args)

    def advance(self, ids) -> np.ndarray:
        """One step for every stream: ids (batch,) -> logits (batch, vocab).

        The logits array is owned by the VM and overwritten by the next step.
        """
        self.ids[:] = ids
        code, logits = self._bindings[self.parity]
        for fn, args in code:
            fn(*args)
        self.parity ^= 1
        return logits

    def state_arrays(self) -> list:
        """The current state buffers (the `prev` of the next step), not copies."""
        return [pair[self.parity] for pair in self._buffers]

    def reset(self) -> None:
        for a, b in self._buffers:
            a.fill(0.0)
            b.fill(0.0)
        self.parity = 0

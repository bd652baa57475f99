"""The native loop: a cell's time step with its element-wise work as generated C.

The fused loop (`nn2c.fused`) runs one torch op per IR node per step; at training sizes
(batch 32, hidden 256) the products are fast and the dozen small element-wise ops around
them, each a pass over memory plus dispatch, cost as much again. Here the compiler splits
the step into *groups*: the products (`x @ W`, with an add folded in as `torch.addmm`),
which stay torch calls, and the maximal runs of element-wise nodes between them, each
written as one C function that walks the batch row by row and keeps intermediates in a
small scratch row. The backward is derived the same way, from the same rules as the
fused loop's, group by group in reverse, and every weight gradient is one product over
all steps after the loop.

Memory: every value the backward reads, every value that crosses from one group to
another and every state is stored per step in a (T, B, width) buffer; the states in
(T+1, B, width) buffers whose rows 1..T are also the layer's output. Gradients that cross
groups live in per-step buffers written in an order the generator knows statically, so
the first contribution to a gradient assigns and the rest add (no buffer is zeroed per
step unless a partial overlap forces it).

The C is compiled once per cell with the system C compiler (`$CC`, default `cc`) and
cached under `$NN2_CACHE` (default `~/.cache/nn2`), keyed by the source, the compiler and
the CPU. Float32 on the CPU only; `NN2_NATIVE=0` turns it off. Anything unsupported
(softmax in the loop, a product of a product, a root that is a product or a slice) or
the absence of a compiler leaves the fused TorchScript loop in charge.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from .ir import KEEPS_OUTPUT, Cell, addmm_pairs, consumers, depends_on_state

IN_PLACE_OK = ("gather", "matmul", "add", "sub", "mul", "neg", "concat")
POINTWISE = ("add", "sub", "mul", "neg", "sigmoid", "tanh", "relu", "exp", "log", "slice", "concat")
CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")


class NativeUnavailable(Exception):
    """The native loop cannot be used for this cell or on this machine (the reason is the message)."""


# Branch-free float32 exp (Cephes' polynomial) and tanh so that the row loops vectorize;
# NaN propagates through both, so a diverging run is still caught by the trainer.
PRELUDE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
static inline float nn2_exp(float x) {
    x = x > 88.3762626647949f ? 88.3762626647949f : x;
    x = x < -87.3365478515625f ? -87.3365478515625f : x;
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * (r * r) + r + 1.0f;
    float m = n == n ? n : 0.0f;
    int32_t e = ((int32_t)m + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return p * s;
}
static inline float nn2_sigmoid(float x) { return 1.0f / (1.0f + nn2_exp(-x)); }
static inline float nn2_tanh(float x) {
    float a = x < 0.0f ? -x : x;
    float big = 1.0f - 2.0f / (nn2_exp(2.0f * a) + 1.0f);
    float z = x * x;
    float small = ((((-5.70498872745E-3f * z + 2.06390887954E-2f) * z - 5.37397155531E-2f) * z
                    + 1.33314422036E-1f) * z - 3.33332819422E-1f) * z * x + x;
    return a < 0.625f ? small : (x < 0.0f ? -big : big);
}
"""

_FWD = {"add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}", "neg": "-{0}",
        "sigmoid": "nn2_sigmoid({0})", "tanh": "nn2_tanh({0})", "relu": "({0} < 0.0f ? 0.0f : {0})",
        "exp": "nn2_exp({0})", "log": "logf({0})"}


# derivative of a unary node given its upstream gradient g, its output y and its input x
_BWD = {"neg": "-{g}", "sigmoid": "{g} * {y} * (1.0f - {y})", "tanh": "{g} * (1.0f - {y} * {y})",
        "relu": "({y} > 0.0f ? {g} : 0.0f)", "exp": "{g} * {y}", "log": "{g} / {x}"}


def enabled() -> bool:
    return os.environ.get("NN2_NATIVE", "1").strip().lower() not in ("0", "no", "off", "false")


def supported(cell: Cell) -> str | None:
    """None when the native loop can run this cell, else why not."""
    stateful = depends_on_state(cell)
    body = [n for n in cell.nodes() if n in stateful and n.op != "state"]
    mms = {n for n in body if n.op == "matmul"}
    for n in body:
        if n.op not in POINTWISE and n.op != "matmul":
            return f"{n.op} inside the loop"
        if n.op == "matmul" and n.args[0] in mms:
            return "a product whose operand is a product"
        if n.op == "matmul" and n.args[1].op != "param":
            return "a product whose matrix is not a parameter"
    roots = [nxt for _, _, nxt in cell.states]
    if len({r for r in roots}) != len(roots):
        return "two states with one next value"
    for root in cell.roots():
        if root not in stateful or root.op in ("matmul", "slice", "state"):
            return "a cell output that is not an element-wise value"
    return None


class _Buf:
    """An array of (B, width) blocks, one per step: `rows` is "T", "T1" (T + 1: a state, whose
    value after step t is at t + 1, so `shift` is 1 for the node that computes it), "1" (one
    block reused at every step) or "2" (two used alternately: a state's gradient, `parity`)."""

    def __init__(self, name: str, width: int, rows: str, shift: int = 0, parity: bool = False):
        self.name, self.width, self.rows, self.shift, self.parity = name, width, rows, shift, parity

    def row(self, t: str = "t") -> str:
        return f"(({t} + {self.shift}) & 1)" if self.parity else f"({t} + {self.shift})"


class NativeCode:
    """Analysis and generated sources (C kernels, Python drivers) for one cell."""

    def __init__(self, cell: Cell, ext: list, params: list):
        why = supported(cell)
        if why:
            raise NativeUnavailable(why)
        self.cell, self.ext, self.params = cell, ext, params
        stateful = depends_on_state(cell)
        self.uses = consumers(cell)
        nodes = cell.nodes()
        self.body = [n for n in nodes if n in stateful and n.op != "state"]
        self.states = [prev for _, prev, _ in cell.states]
        self.ext_ix = {e: i for i, e in enumerate(ext)}
        self.param_ix = {p: i for i, p in enumerate(params)}
        self.state_ix = {s: i for i, s in enumerate(self.states)}
        self._fold_addmm()
        self.body_ids = {n for n in self.body}
        self.reuse = self._reusable()
        self._schedule()
        self._place_values()
        self._place_grads()

    # --- structure ------------------------------------------------------------------------
    def _fold_addmm(self) -> None:
        """add(x, a @ W) with the product used once: one torch.addmm (the fused loop's
        matcher). `self.mm` maps the id of each product node (the add, when folded) to
        (a, W, x or None)."""
        pairs = addmm_pairs(self.body, {n for n in self.body}, self.uses)     # add -> matmul
        self.mm = {}
        for n in self.body:
            if n in pairs:
                m = pairs[n]
                self.mm[n] = (m.args[0], m.args[1], n.args[1] if n.args[0] is m else n.args[0])
        absorbed = {m for m in pairs.values()}
        for n in self.body:
            if n.op == "matmul" and n not in absorbed:
                self.mm[n] = (n.args[0], n.args[1], None)
        self.body = [n for n in self.body if n not in absorbed]
        self.mm_order = [n for n in self.body if n in self.mm]

    def _reusable(self) -> dict[int, int]:
        """Folded products whose added input is a hoisted sequence used nowhere else: the
        product accumulates into that sequence in place (no copy of it per step). Returns
        id(product node) -> index of the input."""
        out = {}
        nexts = {nxt for _, _, nxt in self.cell.states}
        for n in self.body:
            a, _, x = self.mm.get(n, (None, None, None))
            # only values computed outside the loop whose autograd node keeps no copy of its
            # output (an exp, a sigmoid... would find it changed), and not a state's next value
            # (that lives in the state's own buffer)
            if (x is not None and x in self.ext_ix and x.op in IN_PLACE_OK and n not in nexts
                    and x.width == n.width and len(self.uses.get(x, [])) == 1):
                out[n] = self.ext_ix[x]
        return out

    def _schedule(self) -> None:
        """Groups in execution order: ("c", [nodes]) or ("mm", node). Element-wise nodes are
        taken greedily while their arguments are ready, then every ready product."""
        done = set()
        pending = list(self.body)
        self.plan = []

        def ready(n):
            if n in self.mm:
                a, _, x = self.mm[n]
                args = [a] + ([x] if x is not None else [])
            else:
                args = n.args
            return all(a in done or a not in self.body_ids for a in args)
        while pending:
            group = []
            progress = True
            while progress:
                progress = False
                for n in list(pending):
                    if n not in self.mm and ready(n):
                        group.append(n)
                        done.add(n)
                        pending.remove(n)
                        progress = True
            if group:
                self.plan.append(("c", group))
            mms = [n for n in pending if n in self.mm and ready(n)]
            for n in mms:
                self.plan.append(("mm", n))
                done.add(n)
                pending.remove(n)
            if not group and not mms:
                raise NativeUnavailable("no schedule for the loop")     # cannot happen for a DAG
        self.group_of = {}
        for g, (kind, item) in enumerate(self.plan):
            for n in (item if kind == "c" else [item]):
                self.group_of[n] = g

    def _base(self, n):
        """(node that owns the storage, column offset) through the loop's chains of slices
        (a slice computed outside the loop is an input of its own)."""
        off = 0
        while n.op == "slice" and n not in self.ext_ix:
            off += n.attrs["start"]
            n = n.args[0]
        return n, off

    def _place_values(self) -> None:
        """Which body values get a (T, B, w) buffer (the rest live in a scratch row)."""
        need = set()
        out_root = self.cell.output
        next_of = {nxt: i for i, (_, _, nxt) in enumerate(self.cell.states)}

        def keep(x):
            b, _ = self._base(x)
            if b in self.body_ids:
                need.add(b)
        for n in self.body:
            if n in self.mm:
                need.add(n)
                a, _, x = self.mm[n]
                keep(a)
                if x is not None:
                    keep(x)
                continue
            if n.op == "mul":
                for a in n.args:
                    keep(a)
            elif n.op in KEEPS_OUTPUT:
                keep(n)
            elif n.op == "log":
                keep(n.args[0])
            for a in n.args:            # crossing groups
                b, _ = self._base(a)
                if b in self.body_ids and self.group_of[b] != self.group_of[n]:
                    need.add(b)
        for r in self.cell.roots():
            need.add(r)
        self.vbuf: dict[int, _Buf] = {}
        self.st_bufs = [_Buf(f"ST{i}", s.width, "T1") for i, s in enumerate(self.states)]
        k = 0
        for n in self.body:
            if n not in need or n.op == "slice":
                continue
            if n in next_of:
                self.vbuf[n] = _Buf(f"ST{next_of[n]}", n.width, "T1", shift=1)
            else:
                self.vbuf[n] = _Buf(f"V{k}", n.width, "T")
                k += 1
        self.out_buf = self.vbuf[out_root]
        self.value_bufs = [b for b in dict.fromkeys(self.vbuf.values()) if b.name.startswith("V")]

    def _place_grads(self) -> None:
        """Gradient slots: 'local' (a scratch row of the group that owns the node) when every
        contribution comes from inside that group, else a per-step buffer."""
        self.gbuf: dict[int, _Buf] = {}
        k = 0

        def outside(n, g) -> bool:
            for c in self.uses.get(n, []):
                if c is None:
                    continue
                if c.op == "slice":
                    if outside(c, g):
                        return True
                elif c not in self.body_ids or self.group_of[c] != g or c in self.mm:
                    return True
            return False
        for n in self.body:
            if n.op == "slice":
                continue
            if n in self.mm:
                self.gbuf[n] = _Buf(f"GM{k}", n.width, "T")
                k += 1
                continue
            if outside(n, self.group_of[n]):     # a product's operand counts as outside
                self.gbuf[n] = _Buf(f"GV{k}", n.width, "1")
                k += 1
        self.gs_bufs = [_Buf(f"GS{i}", s.width, "2", parity=True) for i, s in enumerate(self.states)]
        self.ge_bufs = [_Buf(f"GE{i}", e.width, "T") for i, e in enumerate(self.ext)]

    # --- C generation --------------------------------------------------------------------
    def _row_ptr(self, buf: _Buf, table, t="t") -> str:
        if buf.rows == "1":
            return f"(A[{table[buf.name]}] + b * {buf.width})"
        return f"(A[{table[buf.name]}] + ({buf.row(t)} * B + b) * {buf.width})"

    def _value(self, n, table, local) -> str:
        """C pointer expression to node n's forward value in the current row (or a literal)."""
        if n.op == "const":
            return repr(float(n.attrs["value"])) + "f"
        base, off = self._base(n)
        if base.op == "param":
            return f"(A[{table['P' + str(self.param_ix[base])]}] + {off})"
        if base.op == "state":
            return f"({self._row_ptr(self.st_bufs[self.state_ix[base]], table)} + {off})"
        if base in self.ext_ix:
            i = self.ext_ix[base]
            return f"({self._row_ptr(_Buf(f'E{i}', base.width, 'T'), table)} + {off})"
        if base in self.vbuf:
            return f"({self._row_ptr(self.vbuf[base], table)} + {off})"
        return f"({local[base]} + {off})"

    @staticmethod
    def _elem(ptr: str, j="j") -> str:
        return ptr if ptr.endswith("f") and not ptr.startswith("(") else f"{ptr}[{j}]"

    def forward_tables(self):
        bufs = [*self.st_bufs, *self.value_bufs]
        names = [b.name for b in bufs] + [f"E{i}" for i in range(len(self.ext))] \
            + [f"P{i}" for i in range(len(self.params))] + ["SCRATCH"]
        return {n: i for i, n in enumerate(names)}

    def backward_tables(self):
        names = [b.name for b in (*self.st_bufs, *self.value_bufs)] + [f"E{i}" for i in range(len(self.ext))] \
            + [f"P{i}" for i in range(len(self.params))] + ["SCRATCH", "GOUT"] \
            + [b.name for b in dict.fromkeys(self.gbuf.values())] + [b.name for b in self.gs_bufs] \
            + [b.name for b in self.ge_bufs] + [f"GP{i}" for i in range(len(self.params))]
        return {n: i for i, n in enumerate(names)}

    def c_source(self) -> str:
        parts = [PRELUDE]
        ft, bt = self.forward_tables(), self.backward_tables()
        self.scratch_f = self.scratch_b = 0
        for g, (kind, item) in enumerate(self.plan):
            if kind == "c":
                parts.append(self._c_forward(g, item, ft))
        # two passes: the first finds gradient slots that need zeroing
        self.zero_slots: set = set()
        for _ in range(2):
            self.cover, self.must_zero, self.deferred, self.deferred_e = {}, set(), [], {}
            self.b_src, self.torch_b = [], {}
            for g in range(len(self.plan) - 1, -1, -1):      # in the order the backward runs
                kind, item = self.plan[g]
                if kind == "c":
                    self.b_src.append(self._c_backward(g, item, bt))
                else:
                    self.torch_b[g] = self._torch_backward(item)
            self._seal_step()
            zero = set(self.must_zero)
            if zero <= self.zero_slots:
                break
            self.zero_slots |= zero
        parts += self.b_src
        return "\n".join(parts)

    def _c_forward(self, g: int, nodes, table) -> str:
        local, lines, at = {}, [], 0
        for n in nodes:
            if n.op == "slice" or n in self.vbuf:
                continue
            local[n] = f"L{len(local)}"
            lines.append(f"        float *L{len(local) - 1} = A[{table['SCRATCH']}] + {at};")
            at += n.width
        self.scratch_f = max(self.scratch_f, at)
        for n in nodes:
            if n.op == "slice":
                continue
            dst = self._value(n, table, local)
            if n.op == "concat":
                col = 0
                for a in n.args:
                    src = self._value(a, table, local)
                    lines.append(f"        for (int64_t j = 0; j < {a.width}; j++) {dst}[{col} + j] = {src}[j];")
                    col += a.width
                continue
            args = [self._elem(self._value(a, table, local)) for a in n.args]
            lines.append("        #pragma GCC ivdep")
            lines.append(f"        for (int64_t j = 0; j < {n.width}; j++) {dst}[j] = {_FWD[n.op].format(*args)};")
        body = "\n".join(lines)
        return (f"void nn2_f{g}(int64_t t, int64_t B, float **A) {{\n    for (int64_t b = 0; b < B; b++) {{\n"
                f"{body}\n    }}\n}}\n")

    # gradient slots: ("buf", _Buf) or ("local", name); contributions tracked for assign/add
    def _gslot(self, n, table, local):
        """(key, C pointer to the row of n's gradient, column offset) for a node's gradient,
        or None for constants. Parameters: ("param", i)."""
        if n.op == "const":
            return None
        base, off = self._base(n)
        if base.op == "param":
            i = self.param_ix[base]
            return (f"GP{i}", f"A[{table[f'GP{i}']}]", off, base.width, True)
        if base.op == "state":
            buf = self.gs_bufs[self.state_ix[base]]
            return (buf.name, self._row_ptr(buf, table), off, base.width, False)
        if base in self.ext_ix:
            buf = self.ge_bufs[self.ext_ix[base]]
            return (buf.name, self._row_ptr(buf, table), off, base.width, False)
        if base in self.gbuf:
            buf = self.gbuf[base]
            return (buf.name, self._row_ptr(buf, table), off, base.width, False)
        return (local[base], local[base], off, base.width, False)

    def _contribute(self, slot, width: int, expr_at, lines) -> None:
        """slot[off:off+width] (+)= expr_at(j) for j in range(width)."""
        key, ptr, off, full, accumulate = slot
        cov = self.cover.setdefault(key, np.zeros(full, bool))
        seen = cov[off:off + width]
        if accumulate or key in self.zero_slots or seen.all():
            op = "+="
        elif not seen.any():
            op = "="
        else:
            self.must_zero.add(key)
            op = "+="
        cov[off:off + width] = True
        lines.append("        #pragma GCC ivdep")
        lines.append(f"        for (int64_t j = 0; j < {width}; j++) {ptr}[{off} + j] {op} {expr_at('j')};")

    def _c_backward(self, g: int, nodes, table) -> str:
        local, lines, at = {}, [], 0
        for n in nodes:
            if n.op == "slice" or n in self.gbuf:
                continue
            at_name = local[n] = f"G{g}_{len(local)}"
            lines.append(f"        float *{at_name} = A[{table['SCRATCH']}] + {at};")
            at += n.width
        self.scratch_b = max(self.scratch_b, at)
        for key in [local[k] for k in local]:
            self.cover.pop(key, None)
        for zkey in sorted(self.zero_slots):
            if zkey in local.values():
                w = next(n.width for n in nodes if local.get(n) == zkey)
                lines.append(f"        memset({zkey}, 0, {w} * sizeof(float));")
                self.cover[zkey] = np.ones(w, bool)
        # seeds: the gradient of the cell output and of each state's next value
        for n in nodes:
            if n is self.cell.output:
                gout = _Buf("GOUT", n.width, "T")
                self._contribute(self._gslot(n, table, local), n.width,
                                 lambda j, p=self._row_ptr(gout, table): f"{p}[{j}]", lines)
            for i, (_, _, nxt) in enumerate(self.cell.states):
                if nxt is n:
                    gs = self.gs_bufs[i]
                    p = self._row_ptr(gs, table, "t + 1")
                    self._contribute(self._gslot(n, table, local), n.width, lambda j, p=p: f"{p}[{j}]", lines)
        for n in reversed(nodes):
            if n.op == "slice":
                continue            # a slice's gradient is its base's, at an offset
            gk, gp, goff, _, _ = self._gslot(n, table, local)
            cov = self.cover.get(gk)
            if cov is None or not cov[goff:goff + n.width].all():
                self.must_zero.add(gk)
            self._rule(n, f"({gp} + {goff})", table, local, lines)
        body = "\n".join(lines)
        return (f"void nn2_b{g}(int64_t t, int64_t B, float **A) {{\n    for (int64_t b = 0; b < B; b++) {{\n"
                f"{body}\n    }}\n}}\n")

    def _rule(self, n, g: str, table, local, lines) -> None:
        def give(a, expr_at):
            slot = self._gslot(a, table, local)
            if slot is not None:
                self._contribute(slot, n.width if n.op != "concat" else a.width, expr_at, lines)

        def val(a):                 # values the backward reads were all kept by the forward
            return self._value(a, table, {})
        e = self._elem
        a = n.args
        if n.op == "add":
            for x in a:
                give(x, lambda j: f"{g}[{j}]")
        elif n.op == "sub":
            give(a[0], lambda j: f"{g}[{j}]")
            give(a[1], lambda j: f"-{g}[{j}]")
        elif n.op == "mul":
            give(a[0], lambda j: f"{g}[{j}] * {e(val(a[1]), j)}")
            give(a[1], lambda j: f"{g}[{j}] * {e(val(a[0]), j)}")
        elif n.op in _BWD:
            y = val(n) if n.op in KEEPS_OUTPUT else None
            x = val(a[0]) if n.op == "log" else None
            give(a[0], lambda j: _BWD[n.op].format(g=f"{g}[{j}]", y=f"{y}[{j}]", x=f"{x}[{j}]"))
        elif n.op == "concat":
            col = 0
            for x in a:
                give(x, lambda j, c=col: f"{g}[{c} + {j}]")
                col += x.width
        else:                                       # pragma: no cover — excluded by supported()
            raise NativeUnavailable(f"no derivative for {n.op}")

    def _torch_backward(self, n) -> list[str]:
        """Python lines for the backward of product node n at step t: the seeds when n is a
        cell output (its gradient from the next layer or the next step), then its input's
        gradient (g @ Wᵀ) into the input's slot; an absorbed add's other operand gets g itself."""
        a, w, x = self.mm[n]
        gm = self.gbuf[n]
        g = f"{gm.name}u[t]"
        lines = []
        if n is self.cell.output:
            lines.append(self._py_contribute(gm.name, n.width, 0, n.width, g, "GOUT[t]", None))
        for i, (_, _, nxt) in enumerate(self.cell.states):
            if nxt is n:
                seed = f"{self.gs_bufs[i].name}[(t + 1) & 1]"
                lines.append(self._py_contribute(gm.name, n.width, 0, n.width, g, seed, None))
        cov = self.cover.get(gm.name)
        if cov is None or not cov.all():
            self.must_zero.add(gm.name)
        wt = f"WT{self.param_ix[w]}"
        lines += self._torch_give(a, g, wt)
        if x is not None:
            lines += self._torch_give(x, g, None)
        return lines

    def _torch_give(self, a, g: str, wt) -> list[str]:
        """Lines adding g @ wt (or g itself when wt is None) to the gradient slot of a."""
        if a.op == "const":
            return []
        base, off = self._base(a)
        if base.op == "param":
            i = self.param_ix[base]
            self.deferred.append(f"GP{i}[{off}:{off + a.width}] += {g.replace('u[t]', '')}.sum((0, 1))")
            return []
        if base in self.ext_ix:
            i = self.ext_ix[base]
            self.deferred_e.setdefault(i, []).append((off, a.width, g.replace("u[t]", "")))
            return []
        if base.op == "state":
            buf = self.gs_bufs[self.state_ix[base]]
            view = f"{buf.name}[t & 1]"
        else:
            buf = self.gbuf[base]
            view = f"{buf.name}u[t]" if buf.rows == "T" else f"{buf.name}[0]"
        return [self._py_contribute(buf.name, base.width, off, a.width, view, g, wt)]

    def _py_contribute(self, key: str, full: int, off: int, width: int, view: str, g: str, wt) -> str:
        """view[:, off:off+width] (+)= g @ wt (or g), assigning when the columns are unwritten."""
        cov = self.cover.setdefault(key, np.zeros(full, bool))
        seen = cov[off:off + width]
        if off or width != full:
            view = f"{view}[:, {off}:{off + width}]"
        if key in self.zero_slots or seen.all() or seen.any():
            if not seen.all() and key not in self.zero_slots:
                self.must_zero.add(key)
            line = f"{view}.addmm_({g}, {wt})" if wt else f"{view}.add_({g})"
        else:
            line = f"torch.mm({g}, {wt}, out={view})" if wt else f"{view}.copy_({g})"
        cov[off:off + width] = True
        return line

    def _seal_step(self) -> None:
        """After a whole backward step: each state's gradient (for step t-1) must be complete."""
        for buf in self.gs_bufs:
            cov = self.cover.get(buf.name)
            if cov is None or not cov.all():
                self.must_zero.add(buf.name)
        for buf in self.ge_bufs:
            cov = self.cover.get(buf.name)
            if cov is not None and not cov.all():
                self.must_zero.add(buf.name)

    # --- Python drivers --------------------------------------------------------------------
    def python_source(self) -> tuple[str, str, str]:
        """The C source, and the Python source of `forward(E, S, P, T)` and
        `backward(K, gouts, gS, E, P, T)`, which call the C kernels and the products."""
        src = self.c_source()            # fills the backward plan (and the deferred sums)
        ft, bt = self.forward_tables(), self.backward_tables()
        st = self.st_bufs
        f = ["def forward(E, S, P, T):",
             "    B = S[0].shape[0]",
             "    E = [e.contiguous() for e in E]",
             "    P = [p.contiguous() for p in P]"]
        for i, b in enumerate(st):
            f.append(f"    {b.name} = torch.empty(T + 1, B, {b.width}, dtype=F32)")
            f.append(f"    {b.name}[0] = S[{i}]")
        reused = {self.vbuf[k].name: i for k, i in self.reuse.items()}
        for b in self.value_bufs:
            f.append(f"    {b.name} = E[{reused[b.name]}]" if b.name in reused
                     else f"    {b.name} = torch.empty(T, B, {b.width}, dtype=F32)")
        f.append(f"    SCRATCH = torch.empty({max(self.scratch_f, 1)}, dtype=F32)")
        f.append("    A = table([" + ", ".join(self._ordered(ft)) + "])")
        saved = [b.name for b in (*st, *self.value_bufs)]
        f += [f"    {name}u = {name}.unbind(0)" for name in saved]
        f += [f"    E{i}u = E[{i}].unbind(0)" for i in range(len(self.ext))]
        f.append("    for t in range(T):")
        for g, (kind, item) in enumerate(self.plan):
            if kind == "c":
                f.append(f"        f{g}(t, B, A)")
                continue
            a, w, x = self.mm[item]
            dst, args = self._py_ref(item), f"{self._py_ref(a)}, P[{self.param_ix[w]}]"
            if item in self.reuse:
                f.append(f"        {dst}.addmm_({args})")
            elif x is None:
                f.append(f"        torch.mm({args}, out={dst})")
            else:
                f.append(f"        torch.addmm({self._py_ref(x)}, {args}, out={dst})")
        outs = self.out_buf
        out_expr = f"{outs.name}[1:]" if outs.name.startswith("ST") else outs.name
        f.append(f"    K = [{', '.join(saved)}]")
        f.append(f"    return {out_expr}, [{', '.join(b.name + '[T]' for b in st)}], K")

        r = ["def backward(K, gouts, gS, E, P, T):",
             "    B = gouts.shape[1]",
             f"    {', '.join(saved)}{',' if len(saved) == 1 else ''} = K",
             "    E = [e.contiguous() for e in E]",
             "    P = [p.contiguous() for p in P]",
             "    GOUT = gouts.contiguous()"]
        r.append(f"    SCRATCH = torch.empty({max(self.scratch_b, 1)}, dtype=F32)")
        for b in dict.fromkeys(self.gbuf.values()):
            alloc = "zeros" if b.name in self.zero_slots and b.rows == "T" else "empty"
            shape = "T, B" if b.rows == "T" else "1, B"
            r.append(f"    {b.name} = torch.{alloc}({shape}, {b.width}, dtype=F32)")
            if b.rows == "T":
                r.append(f"    {b.name}u = {b.name}.unbind(0)")
        for i, b in enumerate(self.gs_bufs):
            r.append(f"    {b.name} = torch.empty(2, B, {b.width}, dtype=F32)")
            r.append(f"    {b.name}[T & 1] = gS[{i}]")
        for i, b in enumerate(self.ge_bufs):
            only = self.deferred_e.get(i, [])
            if b.name not in self.cover and len(only) == 1 and only[0][:2] == (0, b.width):
                r.append(f"    {b.name} = {only.pop()[2]}")     # the product's gradient is E's
                continue
            alloc = "zeros" if (b.name in self.zero_slots or b.name not in self.cover) else "empty"
            r.append(f"    {b.name} = torch.{alloc}(T, B, {b.width}, dtype=F32)")
        for i, p in enumerate(self.params):
            r.append(f"    GP{i} = torch.zeros_like(P[{i}])")
        r += [f"    WT{i} = P[{i}].t().contiguous()" for i, p in enumerate(self.params)
              if any(w is p for _, w, _ in self.mm.values())]
        r.append("    A = table([" + ", ".join(self._ordered(bt)) + "])")
        r.append("    for t in range(T - 1, -1, -1):")
        for zkey in sorted(self.zero_slots):
            buf = next((b for b in (*self.gbuf.values(), *self.gs_bufs) if b.name == zkey), None)
            if buf is not None and buf.rows == "1":
                r.append(f"        {zkey}.zero_()")
            elif buf is not None and buf.parity:
                r.append(f"        {zkey}[t & 1].zero_()")
        for g in range(len(self.plan) - 1, -1, -1):
            kind, item = self.plan[g]
            if kind == "c":
                r.append(f"        b{g}(t, B, A)")
            else:
                r += [f"        {line}" for line in self.torch_b[g]]
        for n in self.mm_order:
            a, w, _ = self.mm[n]
            i = self.param_ix[w]
            r.append(f"    GP{i}.addmm_({self._py_ref(a, whole=True)}.flatten(0, 1).t(), {self.gbuf[n].name}.flatten(0, 1))")
        r += [f"    {line}" for line in self.deferred]
        ge = []
        for i, b in enumerate(self.ge_bufs):
            for off, w, g in self.deferred_e.get(i, []):
                r.append(f"    {b.name}[:, :, {off}:{off + w}] += {g}")
            ge.append(b.name)
        gp = [f"GP{i}" for i in range(len(self.params))]
        r.append(f"    return [{', '.join(ge)}], [{', '.join(f'{b.name}[0]' for b in self.gs_bufs)}], [{', '.join(gp)}]")
        return src, "\n".join(f) + "\n", "\n".join(r) + "\n"

    def _ordered(self, table) -> list[str]:
        out = []
        for name in sorted(table, key=table.get):
            if name.startswith("E"):
                out.append(f"E[{name[1:]}]")
            elif name.startswith("P"):
                out.append(f"P[{name[1:]}]")
            else:
                out.append(name)
        return out

    def _py_ref(self, n, whole: bool = False) -> str:
        """A node's value as a torch view: at step t (for the product calls) or, with `whole`,
        over all steps as (T, B, w) (for the weight gradients)."""
        base, off = self._base(n)
        full = not off and n.width == base.width
        if base.op == "param":
            v = f"P[{self.param_ix[base]}]"
            return v if full else f"{v}[{off}:{off + n.width}]"
        if base.op == "state":
            name = self.st_bufs[self.state_ix[base]].name
            step, seq = f"{name}u[t]", f"{name}[:T]"
        elif base in self.ext_ix:
            i = self.ext_ix[base]
            step, seq = f"E{i}u[t]", f"E[{i}]"
        else:
            buf = self.vbuf[base]
            step = f"{buf.name}u[t + {buf.shift}]" if buf.shift else f"{buf.name}u[t]"
            seq = f"{buf.name}[1:]" if buf.shift else buf.name
        if full:
            return seq if whole else step
        return f"{seq}[:, :, {off}:{off + n.width}]" if whole else f"{step}[:, {off}:{off + n.width}]"


# --- building --------------------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("NN2_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "nn2"


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def build(source: str) -> ctypes.CDLL:
    """Compile `source` into a shared library (cached) and load it. The cache is
    `cache_dir()`, or a folder in the system's temporary directory when that is not writable."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([source, cc, " ".join(CFLAGS), _cpu_key()]).encode()).hexdigest()[:24]
    name = f"loop-{key}.so"
    for where in (cache_dir(), Path(tempfile.gettempdir()) / "nn2-cache"):
        target = where / name
        if not target.exists():
            try:
                where.mkdir(parents=True, exist_ok=True)
                _compile(cc, source, target)
            except OSError:
                continue            # not writable: try the next place
        try:
            return ctypes.CDLL(str(target))
        except OSError as e:
            raise NativeUnavailable(f"cannot load {target}: {e}") from None
    raise NativeUnavailable(f"no writable folder for the native loop ({cache_dir()})")


def _compile(cc: str, source: str, target: Path) -> None:
    """cc the source into `target`, atomically (a temporary file in the same folder, renamed)."""
    if not shutil.which(cc):
        raise NativeUnavailable(f"no C compiler ({cc}) on PATH")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".nn2-build-") as d:
        src, out = Path(d) / "loop.c", Path(d) / "loop.so"
        src.write_text(source)
        try:
            proc = subprocess.run([cc, *CFLAGS, "-o", str(out), str(src), "-lm"],
                                  capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise NativeUnavailable(f"{cc} took over 120 s") from None
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise NativeUnavailable(f"{cc} failed: {last[0]}")
        os.replace(out, target)


def _table(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


class NativeLoop:
    """fwd/bwd with the fused loop's signatures, running the generated C kernels. The
    forward owns the sequences E it is given: a product may accumulate into one in place."""

    def __init__(self, cell: Cell, ext: list, params: list):
        code = NativeCode(cell, ext, params)
        self.c_src, self.forward_src, self.backward_src = code.python_source()
        lib = build(self.c_src)
        ns = {"torch": torch, "table": _table, "F32": torch.float32}
        for g, (kind, _) in enumerate(code.plan):
            if kind == "c":
                for prefix in ("f", "b"):
                    fn = getattr(lib, f"nn2_{prefix}{g}")
                    fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
                    fn.restype = None
                    ns[f"{prefix}{g}"] = fn
        exec(compile(self.forward_src, f"<nn2 native loop {cell.layer} forward>", "exec"), ns)
        exec(compile(self.backward_src, f"<nn2 native loop {cell.layer} backward>", "exec"), ns)
        self.fwd, self.bwd, self._lib = ns["forward"], ns["backward"], lib

    @staticmethod
    def usable(tensors) -> bool:
        return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)

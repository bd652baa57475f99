"""Planning the native loop: a cell's Backward (`nn2c.compiler.backward`) -> a `Plan`, pure data.

The step is cut into *groups*: the products (`x @ W`, with an add folded in as one
`addmm`), which stay torch calls, and the maximal runs of element-wise nodes between
them, each one C function over the batch's rows. The plan says where every value lives
(a per-step buffer, or a scratch row of its group), where every gradient lives, and, by
simulating the backward's writes in the order they run, which write assigns, which adds
and which gradient slots must be zeroed. Nothing here produces text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from nn2c.compiler.backward import Backward, Deriv, Grad, base_of
from nn2c.compiler.ir import Node, addmm_pairs, consumers
from nn2run.ops import POINTWISE, REDUCTIONS, ROWWISE

# products whose added input autograd keeps no copy of: it may be overwritten in place
IN_PLACE_OK = ("gather", "matmul", "add", "sub", "mul", "neg", "concat")


class NativeUnavailable(Exception):
    """The native loop cannot be used for this cell or on this machine (the reason is the message)."""


class Rows(enum.Enum):
    STEP = "one (B, width) block per step"
    STATE = "T + 1 blocks: a state's value before step t is block t, after it block t + 1"
    ONE = "one block reused at every step"
    PAIR = "two blocks used alternately: a state's gradient, block t & 1 at step t"


@dataclass(frozen=True)
class Buffer:
    name: str
    width: int
    rows: Rows
    shift: int = 0              # a state's next value is block t + 1 of its buffer


@dataclass(frozen=True, eq=False)
class Product:
    """node = input @ weight (+ added); `into` is the index of the external sequence the
    product accumulates into in place (the added input, used nowhere else), or None."""
    node: Node
    input: Node
    weight: Node
    added: Node | None
    into: int | None


@dataclass(frozen=True, eq=False)
class Group:
    """A run of element-wise nodes, one C function forward and one backward."""
    index: int
    nodes: tuple[Node, ...]


class Where(enum.Enum):
    """Where a forward value lives (`Plan.value_of`)."""
    PARAM = "a parameter"
    STATE = "a state's buffer"
    EXT = "an external sequence"
    BUFFER = "a per-step buffer of the loop"
    LOCAL = "a scratch row of its group"


class SlotKind(enum.Enum):
    BUFFER = "a per-step or reused buffer"
    LOCAL = "a scratch row of the group"
    PARAM = "a parameter's gradient, summed over rows and steps"


@dataclass(frozen=True)
class Slot:
    kind: SlotKind
    name: str
    width: int
    buffer: Buffer | None = None


@dataclass(frozen=True)
class Seed:
    """The gradient arriving from outside the step: of the output (`state` None) or of a
    state's next value (from step t + 1)."""
    state: int | None


@dataclass(frozen=True, eq=False)
class Write:
    """slot[start:start+width] (+)= value at every row."""
    slot: Slot
    start: int
    width: int
    value: object               # Seed | Grad | Deriv | Node, as in nn2c.compiler.backward
    add: bool


@dataclass(frozen=True, eq=False)
class BackwardGroup:
    index: int                  # the forward group it reverses
    locals: tuple[tuple[Node, Slot], ...]
    zero: tuple[Slot, ...]      # local slots cleared before the writes
    writes: tuple[Write, ...]
    product: Product | None = None


@dataclass(frozen=True, eq=False)
class Plan:
    backward: Backward
    schedule: tuple             # Group | Product, in execution order
    values: dict                # body node -> Buffer of its forward values
    locals: dict                # group index -> ((node, scratch column), ...) forward scratch
    scratch: tuple[int, int]    # scratch floats per row, forward and backward
    grads: dict                 # body node -> Buffer of its gradient (crossing groups)
    state_bufs: tuple[Buffer, ...]
    value_bufs: tuple[Buffer, ...]
    grad_bufs: tuple[Buffer, ...]
    gs_bufs: tuple[Buffer, ...]
    ge_bufs: tuple[Buffer, ...]
    reverse: tuple[BackwardGroup, ...]      # in the order the backward runs
    param_sums: tuple[tuple[int, int, int, Buffer], ...]     # (param, start, width, GM): a bias of a product
    ext_adds: tuple[tuple[int, int, int, Buffer], ...]       # (ext, start, width, GM) after the loop
    ext_is_grad: dict           # ext index -> GM buffer that is its whole gradient (no copy)
    zeroed: frozenset           # names of buffers cleared before use (STEP: once; ONE/PAIR: per step)
    written: frozenset          # names of the gradient slots the loop writes

    @property
    def loop(self):
        return self.backward.loop

    @property
    def products(self) -> tuple[Product, ...]:
        return tuple(item for item in self.schedule if isinstance(item, Product))

    def forward_table(self) -> tuple[tuple[str, str], ...]:
        """The arrays the forward C functions address, by position: (C name, Python expression)."""
        lp = self.loop
        return (*((b.name, b.name) for b in (*self.state_bufs, *self.value_bufs)),
                *((f"E{i}", f"E[{i}]") for i in range(len(lp.ext))),
                *((f"P{i}", f"P[{i}]") for i in range(len(lp.params))), ("SCRATCH", "SCRATCH"))

    def backward_table(self) -> tuple[tuple[str, str], ...]:
        lp = self.loop
        return (*self.forward_table(), ("GOUT", "GOUT"),
                *((b.name, b.name) for b in (*self.grad_bufs, *self.gs_bufs, *self.ge_bufs)),
                *((f"GP{i}", f"GP{i}") for i in range(len(lp.params))))

    def value_of(self, node: Node):
        """(Where, what, column): what is the index of the parameter, state or external
        value, the Buffer, or the node whose scratch row holds it."""
        lp = self.loop
        base, off = base_of(node, set(lp.body))
        if base.op == "param":
            return Where.PARAM, lp.params.index(base), off
        if base.op == "state":
            return Where.STATE, lp.states.index(base), off
        if base in lp.ext:
            return Where.EXT, lp.ext.index(base), off
        if base in self.values:
            return Where.BUFFER, self.values[base], off
        return Where.LOCAL, base, off


def unsupported(bw: Backward) -> str | None:
    """None when the native loop can run this loop, else why not."""
    lp = bw.loop
    products = {n for n in lp.body if n.op == "matmul"}
    for n in lp.body:
        if n.op not in (*POINTWISE, *REDUCTIONS, *ROWWISE, "matmul", "slice", "concat"):
            return f"{n.op} inside the loop"
        if n.op == "matmul" and n.args[0] in products:
            return "a product whose operand is a product"
        if n.op == "matmul" and n.args[1].op != "param":
            return "a product whose matrix is not a parameter"
    roots = [nxt for _, _, nxt in lp.cell.states]
    if len(set(roots)) != len(roots):
        return "two states with one next value"
    inside = set(lp.body)
    for root in lp.cell.roots():
        if root not in inside or root.op in ("matmul", "slice"):
            return "a cell output that is not an element-wise value"
    return None


def _products(lp, uses) -> tuple[dict, set]:
    """add(x, a @ W) with the product used once: one addmm. Returns (the node computing each
    product -> (a, W, x or None), the absorbed matmuls)."""
    pairs = addmm_pairs(lp.body, set(lp.body), uses)
    out = {}
    for n in lp.body:
        if n in pairs:
            m = pairs[n]
            out[n] = (m.args[0], m.args[1], n.args[1] if n.args[0] is m else n.args[0])
    absorbed = set(pairs.values())
    for n in lp.body:
        if n.op == "matmul" and n not in absorbed:
            out[n] = (n.args[0], n.args[1], None)
    return out, absorbed


def _into(lp, n, x, uses) -> int | None:
    """A folded product accumulates into its added input in place when that is an external
    value autograd keeps no copy of (an exp, a sigmoid... would find it changed), used
    nowhere else, and the product is not a state's next value (that has its own buffer)."""
    nexts = {nxt for _, _, nxt in lp.cell.states}
    if (x is not None and x in lp.ext and x.op in IN_PLACE_OK and n not in nexts
            and x.width == n.width and len(uses.get(x, [])) == 1):
        return lp.ext.index(x)
    return None


def _schedule(body, mm: dict, lp, uses) -> tuple:
    """Element-wise nodes taken greedily while their arguments are ready, then every ready product."""
    inside, done, pending, out = set(body), set(), list(body), []

    def ready(n):
        args = [mm[n][0]] + ([mm[n][2]] if mm[n][2] is not None else []) if n in mm else n.args
        return all(a in done or a not in inside for a in args)
    while pending:
        group, progress = [], True
        while progress:
            progress = False
            for n in list(pending):
                if n not in mm and ready(n):
                    group.append(n)
                    done.add(n)
                    pending.remove(n)
                    progress = True
        if group:
            out.append(Group(len(out), tuple(group)))
        ready_mms = [n for n in pending if n in mm and ready(n)]
        for n in ready_mms:
            a, w, x = mm[n]
            out.append(Product(n, a, w, x, _into(lp, n, x, uses)))
            done.add(n)
            pending.remove(n)
        if not group and not ready_mms:
            raise NativeUnavailable("no schedule for the loop")     # cannot happen for a DAG
    return tuple(out)


def plan(bw: Backward) -> Plan:
    why = unsupported(bw)
    if why:
        raise NativeUnavailable(why)
    lp = bw.loop
    uses = consumers(lp.cell)
    mm, absorbed = _products(lp, uses)
    body = tuple(n for n in lp.body if n not in absorbed)
    schedule = _schedule(body, mm, lp, uses)
    group_of = {}
    for g, item in enumerate(schedule):
        for n in (item.nodes if isinstance(item, Group) else (item.node,)):
            group_of[n] = g
    values, state_bufs, value_bufs = _place_values(bw, body, mm, group_of)
    fwd_locals, scratch_f = _forward_locals(schedule, values)
    grads, grad_bufs = _place_grads(lp, body, mm, group_of, uses)
    gs_bufs = tuple(Buffer(f"GS{i}", s.width, Rows.PAIR) for i, s in enumerate(lp.states))
    ge_bufs = tuple(Buffer(f"GE{i}", e.width, Rows.STEP) for i, e in enumerate(lp.ext))
    sim = _Simulation(bw, schedule, grads, gs_bufs, ge_bufs)
    zero: frozenset = frozenset()
    while True:                  # until the slots that must be zeroed are all zeroed
        run = sim.run(zero)
        if run.must <= zero:
            break
        zero |= run.must
    scratch_b = max((sum(s.width for _, s in g.locals) for g in run.reverse), default=0)
    return Plan(bw, schedule, values, fwd_locals, (max(scratch_f, 1), max(scratch_b, 1)), grads,
                state_bufs, value_bufs, grad_bufs, gs_bufs, ge_bufs, run.reverse,
                run.param_sums, run.ext_adds, run.ext_is_grad, zero, run.written)


def _place_values(bw, body, mm, group_of):
    """Which body values get a per-step buffer: those the backward reads, those crossing
    groups, the products and the roots (the rest live in a scratch row)."""
    lp, inside = bw.loop, set(body)
    need = set()

    def keep(x):
        b, _ = base_of(x, set(lp.body))
        if b in inside:
            need.add(b)
    for x in bw.saved:
        keep(x)
    for n in body:
        if n in mm:
            need.add(n)
            a, _, x = mm[n]
            keep(a)
            if x is not None:
                keep(x)
            continue
        for a in n.args:            # crossing groups
            b, _ = base_of(a, set(lp.body))
            if b in inside and group_of[b] != group_of[n]:
                need.add(b)
    need |= set(lp.cell.roots())
    next_of = {nxt: i for i, (_, _, nxt) in enumerate(lp.cell.states)}
    state_bufs = tuple(Buffer(f"ST{i}", s.width, Rows.STATE) for i, s in enumerate(lp.states))
    values, value_bufs = {}, []
    for n in body:
        if n not in need or n.op == "slice":
            continue
        if n in next_of:
            values[n] = Buffer(state_bufs[next_of[n]].name, n.width, Rows.STATE, shift=1)
        else:
            values[n] = Buffer(f"V{len(value_bufs)}", n.width, Rows.STEP)
            value_bufs.append(values[n])
    return values, state_bufs, tuple(value_bufs)


def _forward_locals(schedule, values):
    out, most = {}, 0
    for item in schedule:
        if isinstance(item, Group):
            at, cols = 0, []
            for n in item.nodes:
                if n.op != "slice" and n not in values:
                    cols.append((n, at))
                    at += n.width
            out[item.index] = tuple(cols)
            most = max(most, at)
    return out, most


def _place_grads(lp, body, mm, group_of, uses):
    """A gradient lives in a scratch row of its group when every contribution comes from
    inside that group, else in a buffer (per step for a product's)."""
    inside = set(body)

    def outside(n, g) -> bool:
        for c in uses.get(n, []):
            if c is None:
                continue
            if c.op == "slice":
                if outside(c, g):
                    return True
            elif c not in inside or group_of[c] != g or c in mm:
                return True
        return False
    grads, bufs = {}, []
    for n in body:
        if n.op == "slice":
            continue
        if n in mm:
            grads[n] = Buffer(f"GM{len(bufs)}", n.width, Rows.STEP)
        elif outside(n, group_of[n]):     # a product's operand counts as outside
            grads[n] = Buffer(f"GV{len(bufs)}", n.width, Rows.ONE)
        else:
            continue
        bufs.append(grads[n])
    return grads, tuple(bufs)


@dataclass(frozen=True, eq=False)
class _Run:
    reverse: tuple
    must: frozenset             # slots read or handed on before complete: they must be zeroed
    param_sums: tuple
    ext_adds: tuple
    ext_is_grad: dict
    written: frozenset


class _Simulation:
    """The backward's writes in the order they run, given the slots that are zeroed first:
    the first write to a column assigns, later ones add; a slot read or handed on before
    every column is written must be zeroed."""

    def __init__(self, bw, schedule, grads, gs_bufs, ge_bufs):
        self.bw, self.schedule, self.grads = bw, schedule, grads
        self.gs_bufs, self.ge_bufs = gs_bufs, ge_bufs
        self.cover: dict = {}
        self.must: set = set()
        self.param_sums: list = []
        self.ext_adds: list = []
        self.ext_is_grad: dict = {}
        lp = bw.loop
        self.body = set(lp.body)
        self.seeds = {lp.cell.output: [Seed(None)]}
        for i, (_, _, nxt) in enumerate(lp.cell.states):
            self.seeds.setdefault(nxt, []).append(Seed(i))

    def run(self, zero: frozenset):
        self.cover, self.must = {}, set()
        self.param_sums, self.ext_adds, self.ext_is_grad = [], [], {}
        reverse = []
        for g in range(len(self.schedule) - 1, -1, -1):
            item = self.schedule[g]
            reverse.append(self._group(item, zero) if isinstance(item, Group) else self._product(g, item, zero))
        for buf in self.gs_bufs:         # a state's gradient for step t-1 must be complete
            if not self._covered(buf.name, buf.width):
                self.must.add(buf.name)
        for buf in self.ge_bufs:
            if buf.name in self.cover and not self._covered(buf.name, buf.width):
                self.must.add(buf.name)
        self._ext_direct()
        return _Run(tuple(reverse), frozenset(self.must), tuple(self.param_sums), tuple(self.ext_adds),
                    dict(self.ext_is_grad), frozenset(self.cover))

    def _covered(self, key, width, start=0) -> bool:
        cov = self.cover.get(key)
        return cov is not None and bool(cov[start:start + width].all())

    def slot(self, node, local: dict) -> Slot | None:
        if node.op == "const":
            return None
        lp = self.bw.loop
        if node.op == "param":
            return Slot(SlotKind.PARAM, f"GP{lp.params.index(node)}", node.width)
        if node.op == "state":
            buf = self.gs_bufs[lp.states.index(node)]
        elif node in lp.ext:
            buf = self.ge_bufs[lp.ext.index(node)]
        elif node in self.grads:
            buf = self.grads[node]
        else:
            return local[node]
        return Slot(SlotKind.BUFFER, buf.name, buf.width, buf)

    def write(self, slot: Slot, start: int, width: int, value, zero, out: list) -> None:
        cov = self.cover.setdefault(slot.name, np.zeros(slot.width, bool))
        seen = cov[start:start + width]
        add = slot.kind is SlotKind.PARAM or slot.name in zero or bool(seen.any())
        if seen.any() and not seen.all() and slot.name not in zero:
            self.must.add(slot.name)
        cov[start:start + width] = True
        out.append(Write(slot, start, width, value, add))

    def _group(self, group: Group, zero) -> BackwardGroup:
        local = {}
        for n in group.nodes:
            if n.op != "slice" and n not in self.grads:
                local[n] = Slot(SlotKind.LOCAL, f"G{group.index}_{len(local)}", n.width)
        cleared = []
        for slot in local.values():
            self.cover.pop(slot.name, None)
            if slot.name in zero:
                cleared.append(slot)
                self.cover[slot.name] = np.ones(slot.width, bool)
        writes: list = []
        for n in group.nodes:
            for seed in self.seeds.get(n, []):
                self.write(self.slot(n, local), 0, n.width, seed, zero, writes)
        for n in reversed(group.nodes):
            if n.op == "slice":
                continue
            if not self._covered(self.slot(n, local).name, n.width):     # read before complete
                self.must.add(self.slot(n, local).name)
            for term in self.bw.of[n].terms:
                target = self.slot(term.target, local)
                if target is not None:
                    self.write(target, term.start, term.width, term.value, zero, writes)
        return BackwardGroup(group.index, tuple(local.items()), tuple(cleared), tuple(writes))

    def _product(self, index: int, p: Product, zero) -> BackwardGroup:
        """The seeds into the product's gradient (GM), then its input's gradient (g @ Wᵀ) and
        the added operand's (g itself); a parameter's or an external's is summed after the loop."""
        gm = self.grads[p.node]
        mine = Slot(SlotKind.BUFFER, gm.name, gm.width, gm)
        writes: list = []
        for seed in self.seeds.get(p.node, []):
            self.write(mine, 0, p.node.width, seed, zero, writes)
        if not self._covered(gm.name, gm.width):
            self.must.add(gm.name)
        g = Grad(p.node)
        for x, value in ((p.input, Deriv("matmul_t", (g, p.weight))), (p.added, g)):
            if x is None or x.op == "const":
                continue
            base, off = base_of(x, self.body)
            lp = self.bw.loop
            if base.op == "param":
                self.param_sums.append((lp.params.index(base), off, x.width, gm))
            elif base in lp.ext:
                self.ext_adds.append((lp.ext.index(base), off, x.width, gm))
            else:
                self.write(self.slot(base, {}), off, x.width, value, zero, writes)
        return BackwardGroup(index, (), (), tuple(writes), p)

    def _ext_direct(self) -> None:
        """An external value whose whole gradient is one product's: that GM buffer is it."""
        kept = []
        for i, off, w, gm in self.ext_adds:
            buf = self.ge_bufs[i]
            only = [a for a in self.ext_adds if a[0] == i]
            whole = len(only) == 1 and (off, w) == (0, buf.width)
            if buf.name not in self.cover and whole and i not in self.ext_is_grad:
                self.ext_is_grad[i] = gm
            else:
                kept.append((i, off, w, gm))
        self.ext_adds = kept

"""The C renderer of a native-loop Plan: an operator -> C expression table and one short
loop per group, forward and backward, appended to the fixed prelude (`prelude.c`).

Every function has the signature `void nn2_fG(int64_t t, int64_t B, float **A)` (`nn2_bG`
for the backward): A holds the arrays in the order of `Plan.forward_table()` /
`Plan.backward_table()`; a function walks the batch's B rows of step t.
"""

from __future__ import annotations

from pathlib import Path

from nn2c.backend.native.low import Low, input_write
from nn2c.backend.native.plan import BackwardGroup, Buffer, Group, Plan, Product, Rows, Seed, Slot, SlotKind, Where
from nn2c.compiler.backward import Deriv, Grad
from nn2run.ops import OPS, POINTWISE, REDUCTIONS, ROWWISE, check_table

C_OPS = {"add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}", "neg": "-{0}",
         "sigmoid": "nn2_sigmoid({0})", "tanh": "nn2_tanh({0})", "relu": "({0} < 0.0f ? 0.0f : {0})",
         "exp": "nn2_exp({0})", "log": "logf({0})", "div": "{0} / {1}", "sqrt": "sqrtf({0})"}
# an activation's derivative: g the upstream gradient, v what it reads (nn2run.ops)
C_DERIV = {"sigmoid": "{g} * {v} * (1.0f - {v})", "tanh": "{g} * (1.0f - {v} * {v})",
           "relu": "({v} > 0.0f ? {g} : 0.0f)", "exp": "{g} * {v}", "log": "{g} / {v}",
           "sqrt": "{g} / (2.0f * {v})"}
# a reduction of a row into its one column: (initial value, C statement folding a[j] into acc,
# statement finishing acc over width w); and its derivative at column j of its operand a
# (g the upstream gradient, v the result)
C_REDUCE = {"sum": ("0.0f", "acc += {a}", "acc"), "mean": ("0.0f", "acc += {a}", "acc * (1.0f / {w})"),
            "max": ("-INFINITY", "acc = {a} > acc ? {a} : acc", "acc")}
# (ties share max's gradient equally, as torch's amax does: n counts them)
# softmax and log_softmax over a row: C statements from the row's maximum m (dst the result,
# a the operand); their derivatives read one sum over the row (`dot`): Σ g·v, Σ g
C_ROWWISE = {"softmax": ["float s = 0.0f;",
                         "for (int64_t j = 0; j < {w}; j++) {{ {dst}[j] = nn2_exp({a}[j] - m); s += {dst}[j]; }}",
                         "for (int64_t j = 0; j < {w}; j++) {dst}[j] /= s;"],
             "logsoftmax": ["float s = 0.0f;",
                            "for (int64_t j = 0; j < {w}; j++) s += nn2_exp({a}[j] - m);",
                            "float l = m + logf(s);",
                            "for (int64_t j = 0; j < {w}; j++) {dst}[j] = {a}[j] - l;"]}
C_ROWWISE_DERIV = {"softmax": ("{g} * {v}", "{v} * ({g} - {dot})"),
                   "logsoftmax": ("{g}", "({g} - nn2_exp({v}) * {dot})")}
C_REDUCE_DERIV = {"sum": "{g}", "mean": "({g} * (1.0f / {w}))", "max": "({a} == {v} ? {g} / {n} : 0.0f)"}
check_table("nn2c.backend.native C_OPS", C_OPS, POINTWISE)
check_table("nn2c.backend.native C_DERIV", C_DERIV, [n for n in POINTWISE if OPS[n].kind == "activation"])
check_table("nn2c.backend.native C_REDUCE", C_REDUCE, REDUCTIONS)
check_table("nn2c.backend.native C_ROWWISE", C_ROWWISE, ROWWISE)
check_table("nn2c.backend.native C_ROWWISE_DERIV", C_ROWWISE_DERIV, ROWWISE)
check_table("nn2c.backend.native C_REDUCE_DERIV", C_REDUCE_DERIV, REDUCTIONS)

PRELUDE = (Path(__file__).with_name("prelude.c")).read_text(encoding="utf-8")


def _literal(node) -> str:
    return repr(float(node.attrs["value"])) + "f"


class _Renderer:
    def __init__(self, plan: Plan, table, low: Low | None = None):
        self.plan, self.at = plan, {name: i for i, (name, _) in enumerate(table)}
        self.low = low                  # with bf16 products: the bf16 arrays (nn2c.backend.native.low)
        self.half = set() if low is None else {b.name for b in (*low.copies.values(), *low.grad_copies.values())}
        self.half |= set() if low is None else {f"{k}{g}" for g in low.staged for k in ("Z", "ZB")}
        self.half |= set() if low is None else {f"EH{i}" for i in low.half_exts}
        self.local: dict = {}           # node -> C name of its scratch row (this function)
        self.grad_local: dict = {}
        self.before: list = []          # statements a write's loop needs first (max's tie counts)

    def row(self, buf: Buffer, t: str = "t") -> str:
        base = f"A[{self.at[buf.name]}]"
        if buf.name in self.half:
            base = f"((uint16_t *){base})"
        if buf.rows is Rows.ONE:
            return f"({base} + b * {buf.width})"
        step = f"(({t} + {buf.shift}) & 1)" if buf.rows is Rows.PAIR else f"({t} + {buf.shift})"
        return f"({base} + ({step} * B + b) * {buf.width})"

    def copy_lines(self, node) -> list[str]:
        """With bf16 products: the rounding of node's row into the bf16 copy of its buffer,
        when a product reads that buffer."""
        buf = self.plan.values.get(node)
        if self.low is None or buf is None or buf.name not in self.low.copies:
            return []
        copy = Buffer(self.low.copies[buf.name].name, buf.width, buf.rows, buf.shift)
        return _loop(node.width, f"{self.row(copy)}[j] = nn2_bf16({self.value(node)}[j])")

    def value(self, node) -> str:
        """C pointer to node's forward value in this row."""
        where, what, off = self.plan.value_of(node)
        if where is Where.PARAM:
            return f"(A[{self.at[f'P{what}']}] + {off})"
        if where is Where.STATE:
            return f"({self.row(self.plan.state_bufs[what])} + {off})"
        if where is Where.EXT:
            return f"({self.row(Buffer(f'E{what}', node.width, Rows.STEP))} + {off})"
        if where is Where.BUFFER:
            return f"({self.row(what)} + {off})"
        return f"({self.local[what]} + {off})"

    def elem(self, node, j: str = "j") -> str:
        """node at column j; a width-1 value (a scalar) broadcasts: its column 0."""
        if node.op == "const":
            return _literal(node)
        return f"{self.value(node)}[{'0' if node.width == 1 else j}]"

    def slot(self, slot: Slot) -> str:
        if slot.kind is SlotKind.PARAM:
            return f"A[{self.at[slot.name]}]"
        if slot.kind is SlotKind.LOCAL:
            return slot.name
        return self.row(slot.buffer)

    def grad(self, node) -> str:
        if node in self.plan.grads:
            return self.row(self.plan.grads[node])
        return self.grad_local[node]

    def at_col(self, x, j: str) -> str:
        """C expression of a backward value (nn2c.compiler.backward) at column j of this row."""
        if isinstance(x, Seed):
            if x.state is None:
                return f"{self.row(Buffer('GOUT', self.plan.loop.cell.output.width, Rows.STEP))}[{j}]"
            return f"{self.row(self.plan.gs_bufs[x.state], 't + 1')}[{j}]"
        if isinstance(x, Grad):
            return f"({self.grad(x.of)} + 0)[{'0' if x.of.width == 1 else j}]"
        if isinstance(x, Deriv):
            if x.op == "cols":
                return self.at_col(x.args[0], f"{x.start} + {j}")
            a = [self.at_col(v, j) for v in x.args]
            if x.op == "neg":
                return f"-{a[0]}"
            if x.op == "mul":
                return f"{a[0]} * {a[1]}"
            if x.op == "div":
                return f"({a[0]} / {a[1]})"
            if x.op in REDUCTIONS:
                return C_REDUCE_DERIV[x.op].format(g=a[0], a=a[1] if len(a) > 1 else "",
                                                   v=a[2] if len(a) > 2 else "", w=x.width,
                                                   n=self.ties(x) if x.op == "max" else "")
            if x.op in ROWWISE:
                return C_ROWWISE_DERIV[x.op][1].format(g=a[0], v=a[1], dot=self.row_sum(x))
            return C_DERIV[x.op].format(g=a[0], v=a[1])
        return self.elem(x, j)


    def row_sum(self, x: Deriv) -> str:
        """A C variable holding the row sum softmax's or log_softmax's derivative reads."""
        name = f"dot{len(self.before)}"
        term = C_ROWWISE_DERIV[x.op][0].format(g=self.at_col(x.args[0], "k"), v=self.at_col(x.args[1], "k"))
        width = x.args[1].width
        self.before += [f"        float {name} = 0.0f;",
                        f"        for (int64_t k = 0; k < {width}; k++) {name} += {term};"]
        return name

    def ties(self, x: Deriv) -> str:
        """A C variable counting the columns equal to max's result in this row."""
        name = f"ties{len(self.before)}"
        self.before += [f"        float {name} = 0.0f;",
                        f"        for (int64_t k = 0; k < {x.width}; k++) {name} += "
                        f"{self.at_col(x.args[1], 'k')} == {self.at_col(x.args[2], 'k')};"]
        return name


def _function(name: str, lines: list[str]) -> str:
    body = "\n".join(lines)
    return (f"void {name}(int64_t t, int64_t B, float **A) {{\n    NN2_FLUSH_BEGIN\n"
            f"    for (int64_t b = 0; b < B; b++) {{\n{body}\n    }}\n    NN2_FLUSH_END\n}}\n")


def _loop(width: int, statement: str) -> list[str]:
    return ["        #pragma GCC ivdep", f"        for (int64_t j = 0; j < {width}; j++) {statement};"]


def _forward(r: _Renderer, group: Group) -> str:
    r.local, lines = {}, []
    for k, (n, col) in enumerate(r.plan.locals[group.index]):
        r.local[n] = f"L{k}"
        lines.append(f"        float *L{k} = A[{r.at['SCRATCH']}] + {col};")
    low = r.low
    if low is not None and group.index == low.first_group:     # the external values given in bf16
        for i in low.half_exts:
            w = r.plan.loop.ext[i].width
            e, eh = r.row(Buffer(f"E{i}", w, Rows.STEP)), r.row(Buffer(f"EH{i}", w, Rows.STEP))
            lines += _loop(w, f"{e}[j] = nn2_f32({eh}[j])")
    for g in (() if low is None else [g for g, k in low.widen_in.items() if k == group.index]):
        lines += _widen_lines(r, g, low.staged[g])
    for n in group.nodes:
        if n.op != "slice":
            lines += _node_lines(r, n) + r.copy_lines(n)
    return _function(f"nn2_f{group.index}", lines)


def _node_lines(r: _Renderer, n) -> list[str]:
    """The forward of one element-wise node over its row."""
    dst = r.value(n)
    if n.op == "concat":
        lines, col = [], 0
        for a in n.args:
            lines.append(f"        for (int64_t j = 0; j < {a.width}; j++) {dst}[{col} + j] = {r.value(a)}[j];")
            col += a.width
        return lines
    if n.op in ROWWISE:
        a, w = r.value(n.args[0]), n.width
        return ["        {", "        float m = -INFINITY;",
                f"        for (int64_t j = 0; j < {w}; j++) m = {a}[j] > m ? {a}[j] : m;",
                *(f"        {line.format(w=w, dst=dst, a=a)}" for line in C_ROWWISE[n.op]), "        }"]
    if n.op in REDUCTIONS:
        start, fold, finish = C_REDUCE[n.op]
        a = n.args[0]
        return [f"        {{ float acc = {start};",
                f"        for (int64_t j = 0; j < {a.width}; j++) {fold.format(a=r.elem(a))};",
                f"        {dst}[0] = {finish.format(w=a.width)}; }}"]
    return _loop(n.width, f"{dst}[j] = {C_OPS[n.op].format(*[r.elem(a) for a in n.args])}")


def _widen_lines(r: _Renderer, g: int, p: Product) -> list[str]:
    """bf16 products: the staged result of product g widened into its float32 value (the
    folded sum added in the same pass), and rounded into a bf16 copy where a product reads it."""
    z, dst = f"{r.row(Buffer(f'Z{g}', p.node.width, Rows.ONE))}", r.value(p.node)
    if p.into is not None:
        statement = f"{dst}[j] += nn2_f32({z}[j])"
    elif p.added is None:
        statement = f"{dst}[j] = nn2_f32({z}[j])"
    else:
        statement = f"{dst}[j] = {r.elem(p.added)} + nn2_f32({z}[j])"
    return _loop(p.node.width, statement) + r.copy_lines(p.node)


def _round_lines(r: _Renderer, g: int) -> list[str]:
    """bf16 products, backward: product g's gradient rounded into its bf16 copy."""
    gm = r.plan.grads[r.low.staged[g].node]
    return _loop(gm.width, f"{r.row(r.low.grad_copies[g])}[j] = nn2_bf16({r.row(gm)}[j])")


def _grad_widen_lines(r: _Renderer, g: int, bg: BackwardGroup) -> list[str]:
    """bf16 products, backward: the staged g @ Wᵀ widened into the input's gradient slot."""
    w = input_write(bg)
    zb = r.row(Buffer(f"ZB{g}", w.width, Rows.ONE))
    return _loop(w.width, f"{r.slot(w.slot)}[{w.start} + j] {'+=' if w.add else '='} nn2_f32({zb}[j])")


def _backward(r: _Renderer, bg: BackwardGroup, backs: dict) -> str:
    r.grad_local, lines, at = {}, [], 0
    for n, slot in bg.locals:
        r.grad_local[n] = slot.name
        lines.append(f"        float *{slot.name} = A[{r.at['SCRATCH']}] + {at};")
        at += slot.width
    lines += [f"        memset({s.name}, 0, {s.width} * sizeof(float));" for s in bg.zero]
    low = r.low
    for g in (() if low is None else [g for g, k in low.grad_widen_in.items() if k == bg.index]):
        lines += _grad_widen_lines(r, g, backs[g])
    for w in bg.writes:
        op = "+=" if w.add else "="
        r.before = []
        if isinstance(w.value, Deriv) and w.value.op == "rsum":    # a broadcast scalar's gradient
            value = r.at_col(w.value.args[0], 'j')
            lines += ["        {", *r.before, "        float acc = 0.0f;",
                      f"        for (int64_t j = 0; j < {w.value.width}; j++) acc += {value};",
                      f"        {r.slot(w.slot)}[{w.start}] {op} acc; }}"]
            continue
        value = r.at_col(w.value, 'j')
        loop = _loop(w.width, f"{r.slot(w.slot)}[{w.start} + j] {op} {value}")
        lines += ["        {", *r.before, *loop, "        }"] if r.before else loop
    for g in (() if low is None else [g for g, k in low.round_in.items() if k == bg.index]):
        lines += _round_lines(r, g)
    return _function(f"nn2_b{bg.index}", lines)


def _low_functions(fwd: _Renderer, bwd: _Renderer, backs: dict) -> list[str]:
    """The widenings and roundings no group takes in, each a function of its own."""
    low, parts = fwd.low, []
    for g, p in low.staged.items():
        if g not in low.widen_in:
            parts.append(_function(f"nn2_w{g}", _widen_lines(fwd, g, p)))
        if g not in low.round_in:
            parts.append(_function(f"nn2_c{g}", _round_lines(bwd, g)))
        if input_write(backs[g]) is not None and g not in low.grad_widen_in:
            parts.append(_function(f"nn2_v{g}", _grad_widen_lines(bwd, g, backs[g])))
    return parts


def tables(plan: Plan, low: Low | None = None) -> tuple[tuple, tuple]:
    """The forward's and the backward's arrays, by position (with bf16 products, the bf16
    arrays after the float32 ones)."""
    if low is None:
        return plan.forward_table(), plan.backward_table()
    return (*plan.forward_table(), *low.forward_table()), (*plan.backward_table(), *low.backward_table())


def c_source(plan: Plan, low: Low | None = None) -> str:
    """The whole C file: the prelude, the forward functions, the backward functions (in the
    order the backward runs them); with `low` (bf16 products) the widenings and roundings
    around the products, inside those or as functions of their own."""
    forward_table, backward_table = tables(plan, low)
    fwd, bwd = _Renderer(plan, forward_table, low), _Renderer(plan, backward_table, low)
    backs = {bg.index: bg for bg in plan.reverse if bg.product is not None}
    parts = [PRELUDE]
    parts += [_forward(fwd, g) for g in plan.schedule if isinstance(g, Group)]
    parts += [_backward(bwd, bg, backs) for bg in plan.reverse if bg.product is None]
    parts += _low_functions(fwd, bwd, backs) if low is not None else []
    return "\n".join(parts)

"""The backward of a cell's time loop, derived once, as data (no torch).

A layer's time loop runs the cell's *body*: the nodes that depend on a state. What the
body reads from outside is given: states (their values at t-1), *external* values
(computed outside the loop for the whole sequence, read at step t) and parameters.
`derive(cell)` walks the body in reverse and applies each node's derivative rule, giving

- for each body node, the *terms* it adds to the gradients of its operands: a `Term`
  says "the gradient of `target`, columns [start, start+width), receives `value`";
  slices inside the loop are resolved here, so a target is always a node that owns its
  values (a body node other than a slice, a state, an external value or a parameter);
- the weight gradients of the products, each one product over all steps afterwards;
- the forward values the backward reads (`saved`), which the forward must keep.

A term's value is a small expression over the IR: `Grad(n)` is the gradient of body
node n at this step, a `Node` is a forward value at this step (or a constant), and a
`Deriv` is an operation of the backward: "neg", "mul", "cols" (columns of a gradient),
"matmul_t" (a gradient times a stored matrix transposed) or an activation's name (its
derivative, given the upstream gradient and what `nn2run.ops` says it reads).
The fused torch loop (`nn2c.backend.fused`) and the native C loop (`nn2c.backend.native`) only render it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nn2c.compiler.ir import Cell, Node, depends_on_state
from nn2run.ops import OPS


@dataclass(frozen=True, eq=False)
class Grad:
    of: Node


@dataclass(frozen=True, eq=False)
class Deriv:
    op: str
    args: tuple
    start: int = 0          # "cols": the columns [start, start + width) of its argument
    width: int = 0


@dataclass(frozen=True, eq=False)
class Term:
    target: Node
    start: int
    width: int
    value: object           # Grad | Deriv | Node

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.width == self.target.width


@dataclass(frozen=True, eq=False)
class Rule:
    node: Node                      # its gradient is complete when its rule runs
    terms: tuple[Term, ...]


@dataclass(frozen=True, eq=False)
class WeightGrad:
    """grad(param) += Σ over steps of input_tᵀ · grad(product)_t."""
    param: Node
    input: Node
    product: Node


@dataclass(frozen=True, eq=False)
class Loop:
    """The part of a cell inside the time loop and what it reads from outside."""
    cell: Cell
    body: tuple[Node, ...]          # topological order
    states: tuple[Node, ...]        # the states' values at t-1
    ext: tuple[Node, ...]           # values computed outside the loop, read per step
    params: tuple[Node, ...]


@dataclass(frozen=True, eq=False)
class Backward:
    loop: Loop
    rules: tuple[Rule, ...]         # in the order the backward runs (the body reversed, no slices)
    weights: tuple[WeightGrad, ...]
    saved: tuple[Node, ...]         # forward values read by the backward (no parameters, no externals)
    of: dict = field(default_factory=dict)     # body node -> its Rule


def loop_of(cell: Cell) -> Loop:
    stateful = depends_on_state(cell)
    body = [n for n in cell.nodes() if n in stateful and n.op != "state"]
    inside = set(body)
    ext, params = [], []
    for n in body:
        for a in n.args:
            if a.op == "param":
                params.append(a)
            elif a not in inside and a.op not in ("const", "state"):
                ext.append(a)
    return Loop(cell, tuple(body), tuple(prev for _, prev, _ in cell.states),
                tuple(dict.fromkeys(ext)), tuple(dict.fromkeys(params)))


def base_of(node: Node, body) -> tuple[Node, int]:
    """(the node that owns node's values, column offset), through the loop's slices (a slice
    computed outside the loop is an external value of its own)."""
    off = 0
    while node.op == "slice" and node in body:
        off += node.attrs["start"]
        node = node.args[0]
    return node, off


def _terms(n: Node, body) -> tuple[list[Term], WeightGrad | None]:
    g, a = Grad(n), n.args
    out = []

    def give(x, value, width=n.width):
        if x.op != "const":
            base, off = base_of(x, body)
            if x.width == 1 and width > 1:          # a scalar broadcast over the row
                value, width = Deriv("rsum", (value,), width=width), 1
            out.append(Term(base, off, width, value))
    if n.op == "add":
        for x in a:
            give(x, g)
    elif n.op == "sub":
        give(a[0], g)
        give(a[1], Deriv("neg", (g,)))
    elif n.op == "mul":
        give(a[0], Deriv("mul", (g, a[1])))
        give(a[1], Deriv("mul", (g, a[0])))
    elif n.op == "div":
        give(a[0], Deriv("div", (g, a[1])))
        give(a[1], Deriv("neg", (Deriv("div", (Deriv("mul", (g, n)), a[1])),)))     # −g·(a/b)/b
    elif n.op == "neg":
        give(a[0], Deriv("neg", (g,)))
    elif n.op == "matmul":
        give(a[0], Deriv("matmul_t", (g, a[1])), a[0].width)
        return out, WeightGrad(a[1], a[0], n)
    elif n.op == "concat":
        at = 0
        for x in a:
            give(x, Deriv("cols", (g,), at, x.width), x.width)
            at += x.width
    elif OPS[n.op].kind == "reduction":
        reads = (a[0], n) if OPS[n.op].needs == "both" else ()
        give(a[0], Deriv(n.op, (g, *reads), width=a[0].width), a[0].width)
    elif OPS[n.op].kind == "activation":
        give(a[0], Deriv(n.op, (g, n if OPS[n.op].needs == "output" else a[0])))
    else:
        raise ValueError(f"no derivative rule for {n.op}")
    return out, None


def _reads(value, into: list) -> None:
    if isinstance(value, Deriv):
        for x in value.args:
            _reads(x, into)
    elif isinstance(value, Node) and value.op != "const":
        into.append(value)


def derive(cell: Cell) -> Backward:
    loop = loop_of(cell)
    body = set(loop.body)
    rules, weights, reads = [], [], []
    for n in reversed(loop.body):
        if n.op == "slice":
            continue
        terms, weight = _terms(n, body)
        rules.append(Rule(n, tuple(terms)))
        for t in terms:
            _reads(t.value, reads)
        if weight is not None:
            weights.append(weight)
            reads.append(weight.input)
    outside = set(loop.ext) | set(loop.params)
    saved = tuple(x for x in dict.fromkeys(reversed(reads)) if x not in outside)
    return Backward(loop, tuple(rules), tuple(weights), saved, {r.node: r for r in rules})

"""Optimizer passes on the IR. Each pass is a function Cell -> Cell; `optimize` runs them all.

    onehot_to_gather   W·onehot(id) is a row lookup: gather(W, id)
    reassociate        sums are reordered so terms that do not depend on the state come
                       first, where the trainer can hoist them out of the time loop
    fuse_products      products of different matrices with one operand become one product
                       with a stacked matrix, then slices (4 matvecs -> 1 for an LSTM)
    fuse_elementwise   the same element-wise op on matching slices of the same values
                       becomes one op on the whole value (then slices): the gates' bias
                       adds and activations run once per layer, not once per gate
    cse                common subexpressions merged (dead code is never emitted: only
                       what the outputs reach is kept)

Stacking orders the members of a group by the activation that consumes them and then by
equation order, identically for every group, so the slices of different stacks line up
and the element-wise fusion can merge them.
"""

from __future__ import annotations

from dataclasses import replace

from nn2c.compiler.ir import (
    ELEMENTWISE,
    UNARY,
    Cell,
    Node,
    TensorSpec,
    consumers,
    depends_on_state,
    mark_positional,
    positional,
    rewrite,
)
from nn2run import params
from nn2run.ops import OPS


def onehot_to_gather(cell: Cell) -> Cell:
    def fn(node, args):
        if node.op == "matmul" and args[0].op == "onehot":
            return Node("gather", (args[1],), node.width)
        return None
    return rewrite(cell, fn)


def _flatten_sum(node: Node, uses) -> list[Node]:
    if node.op != "add":
        return [node]
    terms = []
    for a in node.args:
        if a.op == "add" and len(uses.get(a, [])) == 1:
            terms.extend(_flatten_sum(a, uses))
        else:
            terms.append(a)
    return terms


def reassociate(cell: Cell) -> Cell:
    """Rewrite each sum so that its state-independent terms are added first."""
    uses = consumers(cell)
    inner = {a for n in cell.nodes() if n.op == "add" for a in n.args
             if a.op == "add" and len(uses.get(a, [])) == 1}
    stateful = depends_on_state(cell)
    new: dict[Node, Node] = {}

    def fn(node, args):
        if node.op != "add" or node in inner:
            return None
        terms = _flatten_sum(node, uses)
        if len(terms) < 3:
            return None
        terms.sort(key=lambda t: t in stateful)       # stable: keeps source order otherwise
        acc = new[terms[0]]
        for t in terms[1:]:
            acc = Node("add", (acc, new[t]), max(acc.width, t.width))
        return acc
    return rewrite(cell, fn, new)


def _gate_key(node: Node, uses, index) -> tuple:
    """Where a product ends up: (the activation consuming its sum, that node's position)."""
    n = node
    while True:
        users = [u for u in uses.get(n, []) if u is not None]
        if len(users) != 1:
            return ("~", index[n])
        u = users[0]
        if u.op in ("add", "sub", "slice"):
            n = u
            continue
        return ((u.op if u.op in UNARY else "~"), index[u])


def _single_use_params(cell: Cell) -> set[str]:
    count: dict[str, int] = {}
    for n in cell.nodes():
        for a in n.args:
            if a.op == "param":
                count[a.attrs["tensor"]] = count.get(a.attrs["tensor"], 0) + 1
    return {t for t, c in count.items() if c == 1}


def _layer(cell: Cell, param: Node) -> int | None:
    """The layer whose parameters a param node's tensor holds (None: the readout's)."""
    return cell.tensors[param.attrs["tensor"]].parts[0].layer


def _stack(cell: Cell, members: list[Node], kind: str) -> Node:
    """Stack the parameters of `members` (ordered) into one tensor; return its param node."""
    specs = [cell.tensors.pop(m.attrs["tensor"]) for m in members]
    parts, at = [], 0
    for s in specs:
        width = s.shape[-1]
        parts.extend(replace(p, start=p.start + at, stop=p.stop + at) for p in s.parts)
        at += width
    name = params.tensor_name(parts[0].layer, [p.name for p in parts])
    shape = (specs[0].shape[0], at) if kind == "matrix" else (at,)
    cell.tensors[name] = TensorSpec(name, shape, parts)
    return Node("param", (), at, {"tensor": name})


def fuse_products(cell: Cell) -> Cell:
    nodes = cell.nodes()
    index = {n: i for i, n in enumerate(nodes)}
    uses = consumers(cell)
    single = _single_use_params(cell)
    groups: dict[tuple, list[Node]] = {}
    for n in nodes:
        if positional(n):
            continue        # products per position stay whole: no slices of (batch, J, width)
        if n.op == "matmul" and n.args[1].attrs["tensor"] in single:
            groups.setdefault(("matmul", n.args[0]), []).append(n)
        elif n.op == "gather" and n.args[0].attrs["tensor"] in single:
            groups.setdefault(("gather",), []).append(n)
    plan: dict[Node, tuple] = {}         # member -> (group, stacked parameter, first column)
    cell = Cell(cell.layer, cell.input, cell.states, cell.output, dict(cell.tensors))
    for key, members in groups.items():
        if len(members) < 2 or len({_layer(cell, m.args[-1]) for m in members}) != 1:
            continue
        members.sort(key=lambda m: _gate_key(m, uses, index))
        stacked = _stack(cell, [m.args[-1] for m in members], "matrix")
        at = 0
        for m in members:
            plan[m] = (key, stacked, at)
            at += m.width
    wholes: dict[tuple, Node] = {}

    def fn(node, args):
        if node not in plan:
            return None
        key, stacked, start = plan[node]
        if key not in wholes:          # the one product of the group (its operand already rewritten)
            wholes[key] = (Node("gather", (stacked,), stacked.width) if key[0] == "gather"
                           else Node("matmul", (args[0], stacked), stacked.width))
        return Node("slice", (wholes[key],), node.width, {"start": start})
    return rewrite(cell, fn)


_UNARY_ELEMENTWISE = tuple(op for op in UNARY if not OPS[op].rowwise)     # softmax mixes a row


def _fusion_key(n: Node, single: set[str]):
    """The group an element-wise node can fuse with, or None."""
    a = n.args[0]
    if a.op != "slice":
        return None
    base = a.args[0]
    if n.op in _UNARY_ELEMENTWISE:
        return (n.op, base)
    b = n.args[1]
    if b.op == "slice" and b.width == a.width:
        return (n.op, base, "slice", b.args[0], b.attrs["start"] - a.attrs["start"])
    if b.op == "param" and b.attrs["tensor"] in single:
        return (n.op, base, "param")
    if b.op == "const":
        return (n.op, base, "const", b.attrs["value"])
    return None


def _contiguous(members: list[Node]) -> bool:
    spans = sorted((m.args[0].attrs["start"], m.args[0].width) for m in members)
    return all(s + w == spans[i + 1][0] for i, (s, w) in enumerate(spans[:-1]))


def _commute(cell: Cell) -> Cell:
    """Put the slice first in commutative ops, so fusion sees one shape."""
    def fn(node, args):
        if node.op in ("add", "mul") and args[0].op != "slice" and args[1].op == "slice":
            return Node(node.op, (args[1], args[0]), node.width, dict(node.attrs))
        return None
    return rewrite(cell, fn)


def _fuse_round(cell: Cell) -> Cell | None:
    cell = _commute(cell)
    single = _single_use_params(cell)
    groups: dict[tuple, list[Node]] = {}
    for n in cell.nodes():
        if positional(n):
            continue
        if n.op in _UNARY_ELEMENTWISE or (n.op in ELEMENTWISE and n.width == n.args[0].width):
            key = _fusion_key(n, single)
            if key is not None:
                groups.setdefault(key, []).append(n)
    chosen = {key: ms for key, ms in groups.items() if len(ms) >= 2 and _contiguous(ms)}
    if not chosen:
        return None
    cell = Cell(cell.layer, cell.input, cell.states, cell.output, dict(cell.tensors))
    member_of = {m: key for key, ms in chosen.items() for m in ms}
    stacked = {}
    for key, ms in chosen.items():
        if key[2:3] == ("param",):
            ordered = sorted(ms, key=lambda m: m.args[0].attrs["start"])
            stacked[key] = _stack(cell, [m.args[1] for m in ordered], "vector")
    fused: dict[tuple, tuple[Node, int]] = {}

    def fn(node, args):
        key = member_of.get(node)
        if key is None:
            return _fold_slice(node, args)
        if key not in fused:
            fused[key] = _fused_node(node, args, chosen[key], key, stacked.get(key))
        whole, lo = fused[key]
        return Node("slice", (whole,), node.width, {"start": args[0].attrs["start"] - lo})
    return rewrite(cell, fn)


def _fused_node(node, args, members, key, stacked_param):
    """The one node computing a whole group: op over the union of the members' slices."""
    lo = min(m.args[0].attrs["start"] for m in members)
    width = sum(m.width for m in members)
    base = args[0].args[0]
    a = _slice(base, lo, width)
    if node.op in _UNARY_ELEMENTWISE:
        return Node(node.op, (a,), width), lo
    if key[2] == "slice":
        b = _slice(args[1].args[0], lo + key[4], width)
    elif key[2] == "param":
        b = stacked_param
    else:
        b = args[1]
    return Node(node.op, (a, b), width), lo


def _slice(base: Node, start: int, width: int) -> Node:
    if start == 0 and width == base.width:
        return base
    return Node("slice", (base,), width, {"start": start})


def _fold_slice(node, args):
    """slice(slice(a)) -> slice(a); a slice covering its whole source -> the source."""
    if node.op != "slice":
        return None
    start, src = node.attrs["start"], args[0]
    if src.op == "slice":
        start, src = start + src.attrs["start"], src.args[0]
    return _slice(src, start, node.width)


def fuse_elementwise(cell: Cell) -> Cell:
    for _ in range(64):
        fused = _fuse_round(cell)
        if fused is None:
            return cell
        cell = fused
    return cell


def cse(cell: Cell) -> Cell:
    table: dict[tuple, Node] = {}
    ids: dict[Node, int] = {}

    def fn(node, args):
        fresh = node if args == node.args else Node(node.op, args, node.width, dict(node.attrs))
        for a in args:
            ids.setdefault(a, len(ids))
        key = fresh.key(ids)
        if fresh.op != "const":
            fresh = table.setdefault(key, fresh)
        ids.setdefault(fresh, len(ids))
        return fresh
    return rewrite(cell, fn)


PASSES = {
    "onehot-to-gather": onehot_to_gather,
    "reassociate": reassociate,
    "fuse-products": fuse_products,
    "fuse-elementwise": fuse_elementwise,
    "cse": cse,
}


def _known(passes) -> None:
    unknown = [name for name in passes if name not in PASSES]
    if unknown:
        raise ValueError(f"unknown optimizer pass {unknown[0]!r}; the passes are {', '.join(PASSES)}")


def optimize_cell(cell: Cell, passes=tuple(PASSES)) -> Cell:
    _known(passes)
    positional_cell = any(n.op == "memory" for n in cell.nodes())
    if positional_cell:
        cell = mark_positional(cell)
    if "cse" in passes:         # first too: a value written twice (W·x − mean(W·x)) is one
        cell = cse(cell)        # product, so that fuse-products sees each matrix used once
        if positional_cell:
            cell = mark_positional(cell)
    for name in PASSES:
        if name in passes:
            cell = PASSES[name](cell)
            if positional_cell:             # new nodes of a pass carry no flag yet
                cell = mark_positional(cell)
    return cell


def optimize(network, passes=tuple(PASSES)):
    """Run the passes (in their fixed order) on every cell of a Network; an unknown pass
    name is a ValueError."""
    from nn2c.compiler.ir import Network
    _known(passes)
    return Network([optimize_cell(c, passes) for c in network.cells],
                   optimize_cell(network.readout, passes), network.vocab_size, network.hidden)

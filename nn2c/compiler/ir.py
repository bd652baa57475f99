"""The IR: one step of one layer (or of the readout) as a DAG of `Node`s over concrete widths.

Both backends read it: `nn2c.compiler.emit` writes it as VM instructions, `nn2c.backend.network`
runs it with PyTorch for training. Parameters live in `TensorSpec`s, stored the way the
VM wants them (a matrix W of shape (rows, cols) is stored transposed, (cols, rows), so
that a product is `x @ stored`); a `Part` records where a kernel parameter lives in a
stored tensor, so the optimizer may stack several parameters into one tensor and each
stays readable by its source name.

Node ops:
    onehot                 the token input of layer 0 as a one-hot vector (width V)
    input                  the cell's vector input (the previous layer's output)
    state                  a state's value at t-1 (attrs: name)
    param                  a stored tensor (attrs: tensor)
    const                  a scalar (attrs: value), width 0
    gather (param)         row lookup by token id: param[ids]
    matmul (x, param)      x @ param
    add sub mul (a, b)     element-wise; a scalar (width 0) broadcasts
    neg and the activations (a)      see `nn2run.ops`
    slice (a)              a[start:start+width] (attrs: start)
    concat (a, b, ...)

A seq2seq decoder adds two leaves, `memory` (the encoder's output at every position,
width H) and `final` (its output at each input's last position), and the ops `softmaxj`
and `sumj`. A node with attrs["positional"] holds one value per position, (batch, J,
width): the memory and every node with a positional argument, except `sumj`
(`mark_positional` sets the flag from the structure; `positional(node)` reads it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nn2run import params
from nn2run.ops import OPS, named

# The operators come from the registry (`nn2run.ops`); the IR adds its leaves.
LEAVES = ("input", "state", "param", "const", "memory", "final")
UNARY = tuple(n for n in named("elementwise", "activation") if OPS[n].arity == 1)       # neg, σ, tanh, …
ELEMENTWISE = tuple(n for n in named("elementwise") if OPS[n].arity == 2)              # add sub mul
KEEPS_OUTPUT = tuple(n for n in OPS if OPS[n].needs == "output")      # their derivative reads the output
IR_OPS = LEAVES + tuple(n for n in OPS if n != "copy")                  # copy is the emitter's own


@dataclass(eq=False)
class Node:
    op: str
    args: tuple = ()
    width: int = 0
    attrs: dict = field(default_factory=dict)

    def key(self, ids: dict) -> tuple:
        """Structural identity given a number for each argument (for CSE)."""
        return (self.op, tuple(ids[a] for a in self.args), self.width, tuple(sorted(self.attrs.items())))


@dataclass(frozen=True)
class Part:
    """Where kernel parameter `name` of `layer` (None: the readout) lives: columns
    [start, stop) of a matrix tensor (the parameter is that block transposed) or elements
    [start, stop) of a vector; the rule is `nn2run.params`."""
    name: str
    layer: int | None
    kind: str           # "matrix" | "vector"
    start: int
    stop: int

    @property
    def key(self) -> str:
        return params.key(self.name, self.layer)


@dataclass
class TensorSpec:
    name: str
    shape: tuple        # storage shape: (in, out) for matrices, (n,) for vectors
    parts: list[Part]


@dataclass
class Cell:
    """One step of one layer (layer is an int) or of the readout (layer is None)."""
    layer: int | None
    input: Node
    states: list[tuple[str, Node, Node]]       # (name, value at t-1, value at t)
    output: Node
    tensors: dict[str, TensorSpec]

    def roots(self) -> list[Node]:
        return [nxt for _, _, nxt in self.states] + [self.output]

    def nodes(self) -> list[Node]:
        """Every node reachable from the outputs, in a topological order (arguments first)."""
        return topological(self.roots())


def topological(roots) -> list[Node]:
    """Every node reachable from `roots`, arguments first, each root's in turn (iterative:
    deep graphs are fine)."""
    order, seen = [], set()
    stack = [(n, False) for n in reversed(list(roots))]
    while stack:
        node, expanded = stack.pop()
        if node in seen:
            continue
        if expanded:
            seen.add(node)
            order.append(node)
            continue
        stack.append((node, True))
        stack.extend((a, False) for a in reversed(node.args) if a not in seen)
    return order


@dataclass
class Network:
    """The whole step: the layers' cells, then the readout (logits over the vocabulary)."""
    cells: list[Cell]
    readout: Cell
    vocab_size: int
    hidden: int

    @property
    def all_cells(self) -> list[Cell]:
        return self.cells + [self.readout]

    def tensors(self) -> dict[str, TensorSpec]:
        out = {}
        for cell in self.all_cells:
            out.update(cell.tensors)
        return out


@dataclass
class Seq2SeqNetwork:
    """An encoder (the layers of a cell kernel over the source vocabulary), a decoder cell of
    layer `layers` whose output is the logits over the target vocabulary, and the bridge:
    state name -> its initial value, a DAG over the `final` leaf and parameters."""
    encoder: list[Cell]
    decoder: Cell
    bridge: dict[str, Node]
    source_vocab: int
    target_vocab: int
    hidden: int
    layers: int
    bridge_tensors: dict[str, TensorSpec] = field(default_factory=dict)   # the bridge's parameters

    @property
    def all_cells(self) -> list[Cell]:
        """Every cell, the bridge as one more (its values as the states' next values)."""
        leaf = Node("final", (), self.hidden)
        bridge = Cell(self.layers, leaf, [(name, None, n) for name, n in self.bridge.items()],
                      leaf, self.bridge_tensors)
        return self.encoder + [self.decoder, bridge]

    def tensors(self) -> dict[str, TensorSpec]:
        out = {}
        for cell in self.encoder + [self.decoder]:
            out.update(cell.tensors)
        out.update(self.bridge_tensors)
        return out


def positional(node: Node) -> bool:
    """Whether a node holds one value per position of the memory: (batch, J, width)."""
    return bool(node.attrs.get("positional"))


def mark_positional(cell: Cell) -> Cell:
    """Set attrs["positional"] on the memory and on every node with a positional argument
    (but sumj, which sums the positions away), and on no other node."""
    def fn(node, args):
        flag = node.op == "memory" or (node.op != "sumj" and any(positional(a) for a in args))
        if flag == positional(node) and args == node.args:
            return None
        attrs = {k: v for k, v in node.attrs.items() if k != "positional"}
        if flag:
            attrs["positional"] = True
        return Node(node.op, args, node.width, attrs)
    return rewrite(cell, fn)


def rewrite(cell: Cell, fn, new: dict | None = None) -> Cell:
    """Rebuild `cell` bottom-up: `fn(node, new_args)` returns the replacement node (or None
    to keep a copy of the node with the new arguments). Returns a new Cell. `new`, if given,
    is filled as the walk goes (old node -> its replacement), for passes that need
    the replacement of nodes other than the arguments."""
    new = {} if new is None else new
    for node in cell.nodes():
        args = tuple(new[a] for a in node.args)
        out = fn(node, args)
        if out is None:
            out = node if args == node.args else Node(node.op, args, node.width, dict(node.attrs))
        new[node] = out
    states = [(name, new.get(prev, prev), new[nxt]) for name, prev, nxt in cell.states]
    return Cell(cell.layer, new.get(cell.input, cell.input), states, new[cell.output], dict(cell.tensors))


def consumers(cell: Cell) -> dict[Node, list[Node]]:
    """Each node's users (None for a cell output)."""
    uses: dict[Node, list[Node]] = {}
    for node in cell.nodes():
        for a in node.args:
            uses.setdefault(a, []).append(node)
    for root in cell.roots():
        uses.setdefault(root, []).append(None)     # an output counts as a use
    return uses


def depends_on_state(cell: Cell) -> set[Node]:
    """The nodes whose value depends on a state (they must run inside the time loop)."""
    out = set()
    for node in cell.nodes():
        if node.op == "state" or any(a in out for a in node.args):
            out.add(node)
    return out


def addmm_pairs(nodes, inside: set[Node], uses) -> dict[Node, Node]:
    """add(x, matmul(a, W)) inside the loop, with the product used only there: emitted as one
    torch.addmm. Returns add -> the matmul it absorbs."""
    out = {}
    for n in nodes:
        if n.op != "add" or n not in inside or any(a.op == "const" for a in n.args):
            continue
        for a in n.args:
            if a.op == "matmul" and a in inside and len(uses.get(a, [])) == 1:
                out[n] = a
                break
    return out

"""Lowering: a checked kernel + sizes -> the IR (`nn2c.ir.Network`), one cell per layer.

Layer 0 reads the one-hot token (its input size is the vocabulary); layer k reads layer
k-1's output. The readout (`yₜ`, logits) runs once, on the top layer's output.
Lowering is literal: one node per operation of the equations. Speed is the optimizer's job.
"""

from __future__ import annotations

from . import ast
from .check import CheckedKernel
from .ir import Cell, Network, Node, Part, TensorSpec


def param_key(name: str, layer: int | None) -> str:
    """The name a parameter has in the .nnb parameter map: `W_f@0`, or `W_y` for the readout."""
    return name if layer is None else f"{name}@{layer}"


def tensor_name(name: str, layer: int | None) -> str:
    return f"readout.{name}" if layer is None else f"l{layer}.{name}"


class _Lowerer:
    def __init__(self, checked: CheckedKernel, params: dict, layer: int | None, sizes: dict):
        self.checked = checked
        self.params = params
        self.layer = layer
        self.sizes = sizes          # H, X, V
        self.env: dict[str, Node] = {}
        self.param_nodes: dict[str, Node] = {}
        self.tensors: dict[str, TensorSpec] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(d.value(**self.sizes) for d in self.params[name].shape)

    def param(self, name: str) -> Node:
        if name not in self.param_nodes:
            shape = self.shape(name)
            tname = tensor_name(name, self.layer)
            key = param_key(name, self.layer)
            if len(shape) == 2:
                spec = TensorSpec(tname, (shape[1], shape[0]), [Part(key, "matrix", 0, shape[0])])
            else:
                spec = TensorSpec(tname, shape, [Part(key, "vector", 0, shape[0])])
            self.tensors[tname] = spec
            self.param_nodes[name] = Node("param", (), shape[0], {"tensor": tname})
        return self.param_nodes[name]

    def expr(self, e) -> Node:
        if isinstance(e, ast.Num):
            return Node("const", (), 0, {"value": float(e.value)})
        if isinstance(e, ast.Var):
            if e.time is None and e.name in self.params:
                return self.param(e.name)
            return self.env[e.name if e.time != -1 else e.name + "ₜ₋₁"]
        if isinstance(e, ast.Neg):
            a = self.expr(e.operand)
            return Node("const", (), 0, {"value": -a.attrs["value"]}) if a.op == "const" else Node("neg", (a,), a.width)
        if isinstance(e, ast.Call):
            a = self.expr(e.arg)
            return Node(e.func, (a,), a.width)
        if isinstance(e, ast.Concat):
            parts = tuple(self.expr(p) for p in e.parts)
            return Node("concat", parts, sum(p.width for p in parts))
        a, b = self.expr(e.left), self.expr(e.right)
        if e.op == "matmul":
            return Node("matmul", (b, a), a.width)
        if a.op == "const" and b.op == "const":
            x, y = a.attrs["value"], b.attrs["value"]
            return Node("const", (), 0, {"value": {"add": x + y, "sub": x - y, "mul": x * y}[e.op]})
        return Node(e.op, (a, b), max(a.width, b.width))

    def cell(self, input_node: Node, equations, output: str, states) -> Cell:
        self.env[self.checked.input] = input_node
        prev = {}
        for s in states:
            prev[s] = Node("state", (), self.sizes["H"], {"name": s})
            self.env[s + "ₜ₋₁"] = prev[s]
        for eq in equations:
            self.env[eq.target.name] = self.expr(eq.expr)
        return Cell(self.layer, input_node, [(s, prev[s], self.env[s]) for s in states],
                    self.env[output], self.tensors)


def lower(checked: CheckedKernel, hidden: int, vocab: int, layers: int) -> Network:
    """The unoptimized network for `layers` stacked cells of `hidden` units over `vocab` tokens."""
    cells = []
    for layer in range(layers):
        x = vocab if layer == 0 else hidden
        lw = _Lowerer(checked, checked.params, layer, {"H": hidden, "X": x, "V": vocab})
        inp = Node("onehot", (), vocab) if layer == 0 else Node("input", (), hidden)
        cells.append(lw.cell(inp, checked.order, checked.output, checked.states))
    lw = _Lowerer(checked, checked.readout_params, None, {"H": hidden, "X": hidden, "V": vocab})
    lw.env[checked.output] = inp = Node("input", (), hidden)
    lw.env[checked.input] = inp
    y = lw.expr(checked.readout.expr)
    readout = Cell(None, inp, [], y, lw.tensors)
    return Network(cells, readout, vocab, hidden)

"""Lowering: a checked kernel + sizes -> the IR (`nn2c.compiler.ir.Network`), one cell per layer.

Layer 0 reads the one-hot token (its input size is the vocabulary); layer k reads layer
k-1's output. The readout (`yₜ`, logits) runs once, on the top layer's output. A cell that
reads its previous readout (`yₜ₋₁`, output feedback; one layer only) computes the readout
itself: `y` is one more state of the cell (zero before the first step), the cell's output
is the logits, and the network's readout passes them on.
Lowering is literal: one node per operation of the equations. Speed is the optimizer's job.
"""

from __future__ import annotations

import math
import operator

from nn2c.compiler.ir import Cell, Network, Node, Part, TensorSpec
from nn2c.lang import ast
from nn2c.lang.ast import FLOAT32_MAX, show
from nn2c.lang.check import CheckedKernel
from nn2c.lang.errors import KernelError
from nn2run import params


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
            tname = params.tensor_name(self.layer, [name])
            if len(shape) == 2:
                spec = TensorSpec(tname, (shape[1], shape[0]), [Part(name, self.layer, "matrix", 0, shape[0])])
            else:
                spec = TensorSpec(tname, shape, [Part(name, self.layer, "vector", 0, shape[0])])
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
            if a.op == "const" and e.func in _FOLD:     # σ(2): a number, as 1 − 2 is
                return _const(e, _FOLD[e.func], a.attrs["value"])
            return Node(e.func, (a,), 1 if e.func in ast.REDUCTIONS else a.width)
        if isinstance(e, ast.Concat):
            parts = tuple(self.expr(p) for p in e.parts)
            return Node("concat", parts, sum(p.width for p in parts))
        a, b = self.expr(e.left), self.expr(e.right)
        if e.op == "matmul":
            return Node("matmul", (b, a), a.width)
        if e.op == "div" and b.op == "const" and b.attrs["value"] == 0:
            _zero(e)
        if a.op == "const" and b.op == "const":
            return _const(e, _ARITHMETIC[e.op], a.attrs["value"], b.attrs["value"])
        return Node(e.op, (a, b), max(a.width, b.width))

    def cell(self, input_node: Node, equations, output: str, states) -> Cell:
        self.env[self.checked.input] = input_node
        prev = {}
        for s in states:
            prev[s] = Node("state", (), self.sizes["H"], {"name": s})
            self.env[s + "ₜ₋₁"] = prev[s]
        if self.checked.feedback is not None:
            prev["y"] = self.env["yₜ₋₁"] = Node("state", (), self.sizes["V"], {"name": "y"})
        for eq in equations:
            self.env[eq.target.name] = self.expr(eq.expr)
        cell = Cell(self.layer, input_node, [(s, prev[s], self.env[s]) for s in states],
                    self.env[output], self.tensors)
        return self._feedback(cell, prev["y"]) if "y" in prev else cell

    def _feedback(self, cell: Cell, prev_y: Node) -> Cell:
        """The readout inside the cell: yₜ (as written) is the state read as yₜ₋₁, and the
        cell's output is the logits."""
        lw = _Lowerer(self.checked, self.checked.readout_params, None, self.sizes)
        lw.env[self.checked.output] = cell.output
        expr = self.checked.readout.expr
        logits = readout_logits(lw, expr)
        y = Node("softmax", logits.args, logits.width) if logits.op == "logsoftmax" else logits
        cell.tensors.update(lw.tensors)
        return Cell(cell.layer, cell.input, cell.states + [("y", prev_y, y)], logits, cell.tensors)


# Operations on numbers, folded at compile time (as the VM computes them, in float64 here).
_ARITHMETIC = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}
_FOLD = {"sigmoid": lambda x: 0.5 * math.tanh(0.5 * x) + 0.5, "tanh": math.tanh,
         "relu": lambda x: max(x, 0.0), "exp": math.exp, "log": math.log, "sqrt": math.sqrt,
         "softmax": lambda x: 1.0, "logsoftmax": lambda x: 0.0}   # of one number: 1, log 1


def _const(e, fn, *args) -> Node:
    """The constant fn(*args) for expression `e`, or the KernelError saying why there is none."""
    try:
        value = fn(*args)
    except OverflowError:
        value = math.inf
    except ValueError:
        raise KernelError(f"{show(e)} is not a number", pos=e.pos) from None
    if not abs(value) <= FLOAT32_MAX:
        raise KernelError(f"{show(e)} is {value:g}, too large: the model computes in "
                          "float32, whose largest number is 3.4e38", pos=e.pos)
    return Node("const", (), 0, {"value": value})


def _zero(e) -> float:
    raise KernelError(f"{show(e)} divides by zero", pos=e.pos)


def readout_logits(lw: _Lowerer, expr) -> Node:
    """The logits of a readout: a readout ending in softmax defines a distribution, and its
    logits are that distribution's log-probabilities, log_softmax of the pre-activation
    (never the log of a softmax); any other readout's value is its logits as written."""
    if isinstance(expr, ast.Call) and expr.func == "softmax":
        z = lw.expr(expr.arg)
        return Node("logsoftmax", (z,), z.width)
    return lw.expr(expr)


def lower(checked: CheckedKernel, hidden: int, vocab: int, layers: int) -> Network:
    """The unoptimized network for `layers` stacked cells of `hidden` units over `vocab` tokens."""
    cells = []
    for layer in range(layers):
        x = vocab if layer == 0 else hidden
        lw = _Lowerer(checked, checked.params, layer, {"H": hidden, "X": x, "V": vocab})
        inp = Node("onehot", (), vocab) if layer == 0 else Node("input", (), hidden)
        cells.append(lw.cell(inp, checked.order, checked.output, checked.states))
    if checked.feedback is not None:          # the cell computed the readout: pass it on
        inp = Node("input", (), vocab)
        return Network(cells, Cell(None, inp, [], inp, {}), vocab, hidden)
    lw = _Lowerer(checked, checked.readout_params, None, {"H": hidden, "X": hidden, "V": vocab})
    lw.env[checked.output] = inp = Node("input", (), hidden)
    lw.env[checked.input] = inp
    y = readout_logits(lw, checked.readout.expr)
    readout = Cell(None, inp, [], y, lw.tensors)
    return Network(cells, readout, vocab, hidden)

"""Emit: the optimized IR -> a VM program (`nn2run.isa`), the parameter map and the
stored tensors; and the inverse bookkeeping between kernel parameters and tensors.
"""

from __future__ import annotations

import numpy as np

from nn2c.compiler.ir import Network, Node, TensorSpec
from nn2run import params
from nn2run.ops import ROWWISE


class _Emitter:
    def __init__(self):
        self.widths: list[int] = []
        self.code: list[list] = []
        self.reg: dict[Node, int] = {}

    def new(self, width: int) -> int:
        self.widths.append(width)
        return len(self.widths) - 1

    def operand(self, node: Node) -> list:
        if node.op == "param":
            return ["t", node.attrs["tensor"]]
        if node.op == "const":
            return ["k", node.attrs["value"]]
        return ["r", self.reg[node]]

    def owned(self, node: Node, taken: set) -> int:
        """A register holding `node` that no other state uses as its next value: copy if needed."""
        r = self.reg.get(node)
        if r is None or node.op in ("slice", "state", "input") or r in taken:
            src = self.operand(node)
            r = self.new(node.width)
            self.code.append(["copy", r, src])
        taken.add(r)
        return r

    def node(self, node: Node) -> None:
        if node in self.reg or node.op in ("param", "const", "state", "input"):
            return
        r = self.new(node.width)
        self.reg[node] = r
        if node.op == "onehot":
            self.code.append(["onehot", r])
        elif node.op == "gather":
            self.code.append(["gather", r, self.operand(node.args[0])])
        elif node.op == "slice":
            self.code.append(["slice", r, self.operand(node.args[0]), node.attrs["start"]])
        else:
            args = [self.operand(a) for a in node.args]
            if node.op in ROWWISE and args[0][0] != "r":    # softmax(b): the VM's reads a register
                src = self.new(node.width)
                self.code.append(["copy", src, args[0]])
                args = [["r", src]]
            self.code.append([node.op, r] + args)


def emit(network: Network) -> tuple[dict, dict]:
    """Returns (program, parameter map) for the whole step of `network`."""
    e = _Emitter()
    states, taken, below = [], set(), None
    for cell in network.all_cells:
        for _, prev, _ in cell.states:
            e.reg[prev] = e.new(prev.width)
        if cell.input.op == "input":
            e.reg[cell.input] = below
        for node in cell.nodes():
            e.node(node)
        for name, prev, nxt in cell.states:
            states.append({"name": name, "layer": cell.layer, "prev": e.reg[prev],
                           "next": e.owned(nxt, taken)})
        below = e.reg[cell.output]
    program = {"registers": e.widths, "states": states, "logits": below, "code": e.code}
    return program, param_map(network.tensors())


def slots(specs: dict[str, TensorSpec]) -> list[params.Slot]:
    """Where each kernel parameter lives in the stored tensors (the layout's rule: `nn2run.params`)."""
    return [params.Slot(p.name, p.layer, spec.name, p.kind, p.start, p.stop)
            for spec in specs.values() for p in spec.parts]


def param_map(specs: dict[str, TensorSpec]) -> dict:
    """The header's parameter map."""
    return params.write_map(slots(specs))


def logical_shapes(specs: dict[str, TensorSpec]) -> dict[str, tuple]:
    """Each kernel parameter's shape as the equations use it."""
    return {s.key: s.shape(specs[s.tensor].shape) for s in slots(specs)}


def param_roles(network: Network) -> dict[str, str]:
    """What each vector parameter does, by key: "gain" when every use multiplies a value
    element-wise (a normalization's γ), "bias" when every use adds to (or is subtracted from)
    one; parameters with other uses, and matrices, have no role."""
    uses: dict[str, set] = {}
    for cell in network.all_cells:
        for node in cell.nodes():
            for a in node.args:
                if a.op == "param":
                    role = {"mul": "gain", "add": "bias", "sub": "bias"}.get(node.op, "other")
                    uses.setdefault(a.attrs["tensor"], set()).add(role)
    roles = {}
    for name, spec in network.tensors().items():
        found = uses.get(name, {"other"})
        if len(spec.shape) == 1 and len(found) == 1 and found != {"other"}:
            roles.update({p.key: next(iter(found)) for p in spec.parts})
    return roles


def init_logical(specs: dict[str, TensorSpec], hidden: int, seed: int,
                 roles: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Initial kernel parameters, drawn per parameter (so the layout the optimizer picks does
    not change them): uniform in ±1/√hidden, as torch initializes its recurrent layers; with
    `roles` (`param_roles`), a gain starts at 1 and a bias at 0, so that a normalized cell
    starts as the plain cell. Every parameter draws, so roles do not change the others."""
    rng = np.random.default_rng(seed)
    k = 1.0 / np.sqrt(hidden)
    start = {"gain": 1.0, "bias": 0.0}
    out = {}
    for key, shape in sorted(logical_shapes(specs).items()):
        out[key] = rng.uniform(-k, k, size=shape).astype(np.float32)
        if (roles or {}).get(key) in start:
            out[key] = np.full(shape, start[roles[key]], np.float32)
    return out


def pack(specs: dict[str, TensorSpec], logical: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Kernel parameters (by key, shaped as the equations use them) -> stored tensors."""
    out = {name: np.zeros(spec.shape, dtype=np.float32) for name, spec in specs.items()}
    for s in slots(specs):
        s.put(out[s.tensor], logical[s.key])
    return out


def unpack(specs: dict[str, TensorSpec], tensors: dict) -> dict[str, np.ndarray]:
    """Stored tensors -> kernel parameters by key (the inverse of `pack`)."""
    return {s.key: s.view(np.asarray(tensors[s.tensor])).copy() for s in slots(specs)}

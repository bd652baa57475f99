"""The PyTorch backend: runs the same IR the VM runs, for training.

Each cell is turned into Python source (straight-line torch calls, one per IR node) and
compiled once. A layer runs over a whole sequence: the nodes that do not depend on the
state are *hoisted* — computed for all time steps at once in one large product — and
only the recurrent rest runs in the time loop. Layers run one after another, so layer
k's input projection is one (T·B, H) × (H, 4H) product, not T small ones.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .emit import pack
from .ir import Cell, Network, depends_on_state

_UNARY = {"sigmoid": "torch.sigmoid({})", "tanh": "torch.tanh({})", "relu": "torch.relu({})",
          "exp": "torch.exp({})", "log": "torch.log({})", "neg": "(-{})",
          "softmax": "torch.softmax({}, -1)"}
_BINARY = {"add": "({} + {})", "sub": "({} - {})", "mul": "({} * {})"}


def cell_source(cell: Cell, hoist: bool = True) -> str:
    """Python source of `run(xs, states, P) -> (outputs over time, final states)`."""
    nodes = cell.nodes()
    stateful = depends_on_state(cell)
    in_loop = {id(n) for n in nodes if id(n) in stateful or not hoist}
    names: dict[int, str] = {id(prev): f"s{i}" for i, (_, prev, _) in enumerate(cell.states)}
    params: dict[str, str] = {}
    for node in nodes:
        if node.op == "param":
            names[id(node)] = params.setdefault(node.attrs["tensor"], f"p{len(params)}")
        elif node.op == "const":
            names[id(node)] = repr(float(node.attrs["value"]))
    pre, loop, unbound = [], [], {}

    def ref(a, looped: bool) -> str:
        if not looped or id(a) in in_loop or a.op in ("param", "const", "state"):
            return names[id(a)]
        unbound[id(a)] = names[id(a)]
        return names[id(a)] + "_u[t]"

    for n, node in enumerate(nodes):
        if id(node) in names:
            continue
        looped = id(node) in in_loop
        names[id(node)] = f"v{n}"
        expr = _expr(node, [ref(a, looped) for a in node.args], "xs[t]" if looped else "xs")
        (loop if looped else pre).append(f"v{n} = {expr}")
    recurrent = [(i, nxt) for i, (_, _, nxt) in enumerate(cell.states) if id(nxt) in in_loop]
    out_looped = id(cell.output) in in_loop
    if cell.output.op in ("param", "const") or any(n.op in ("param", "const") for _, _, n in cell.states):
        raise ValueError("every output of a cell must depend on its input or state")
    body = ["def run(xs, states, P):"]
    body += [f"    {v} = P[{t!r}]" for t, v in params.items()]
    if cell.states:
        body.append("    " + "".join(f"s{i}, " for i in range(len(cell.states))) + "= states")
    body += [f"    {line}" for line in pre]
    body += [f"    {v}_u = {v}.unbind(0)" for v in unbound.values()]
    if loop:
        body.append("    outs = []")
        body.append("    for t in range(xs.shape[0]):")
        body += [f"        {line}" for line in loop]
        if recurrent:
            body.append("        " + "".join(f"s{i}, " for i, _ in recurrent) + "= "
                        + "".join(f"{names[id(nxt)]}, " for _, nxt in recurrent))
        if out_looped:
            body.append(f"        outs.append({names[id(cell.output)]})")
    body += [f"    s{i} = {names[id(nxt)]}[-1]" for i, (_, _, nxt) in enumerate(cell.states)
             if id(nxt) not in in_loop]
    result = "torch.stack(outs)" if out_looped else names[id(cell.output)]
    body.append(f"    return {result}, [{', '.join(f's{i}' for i in range(len(cell.states)))}]")
    return "\n".join(body) + "\n"


def _expr(node, args: list[str], xs: str) -> str:
    op = node.op
    if op == "onehot":
        return f"F.one_hot({xs}, {node.width}).float()"
    if op == "input":
        return xs
    if op == "gather":
        return f"F.embedding({xs}, {args[0]})"
    if op == "matmul":
        return f"({args[0]} @ {args[1]})"
    if op == "slice":
        s = node.attrs["start"]
        return f"{args[0]}[..., {s}:{s + node.width}]"
    if op == "concat":
        return f"torch.cat([{', '.join(args)}], -1)"
    if op in _UNARY:
        return _UNARY[op].format(args[0])
    return _BINARY[op].format(*args)


def compile_cell(cell: Cell, hoist: bool = True):
    source = cell_source(cell, hoist)
    namespace = {"torch": torch, "F": F}
    exec(compile(source, f"<nn2 cell {cell.layer}>", "exec"), namespace)
    return namespace["run"]


class TorchNetwork(torch.nn.Module):
    """A Network's parameters as torch Parameters (one per stored tensor) and its forward pass."""

    def __init__(self, network: Network, tensors: dict[str, np.ndarray], hoist: bool = True):
        super().__init__()
        self.network = network
        self.names = list(network.tensors())
        for i, name in enumerate(self.names):
            self.register_parameter(f"t{i}", torch.nn.Parameter(torch.from_numpy(np.array(tensors[name]))))
        self._cells = [compile_cell(c, hoist) for c in network.cells]
        self._readout = compile_cell(network.readout, hoist)

    def tensor_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"t{i}") for i, name in enumerate(self.names)}

    def initial_state(self, batch: int, device=None) -> list[list[torch.Tensor]]:
        dev = device or next(self.parameters()).device
        return [[torch.zeros(batch, prev.width, device=dev) for _, prev, _ in cell.states]
                for cell in self.network.cells]

    def forward(self, ids: torch.Tensor, state):
        """ids (T, B) token ids -> (logits (T, B, V), new state)."""
        P = self.tensor_dict()
        x, new_state = ids, []
        for run, s in zip(self._cells, state):
            x, s = run(x, s, P)
            new_state.append(s)
        logits, _ = self._readout(x, [], P)
        return logits, new_state

    def numpy_tensors(self) -> dict[str, np.ndarray]:
        return {name: t.detach().cpu().numpy().astype(np.float32) for name, t in self.tensor_dict().items()}


def init_tensors(network: Network, seed: int) -> dict[str, np.ndarray]:
    """Initial weights, drawn per kernel parameter (so the layout the optimizer picks does not
    change them): uniform in ±1/√hidden, as torch initializes its recurrent layers."""
    from .emit import logical_shapes
    specs = network.tensors()
    rng = np.random.default_rng(seed)
    k = 1.0 / np.sqrt(network.hidden)
    logical = {key: rng.uniform(-k, k, size=shape).astype(np.float32)
               for key, shape in sorted(logical_shapes(specs).items())}
    return pack(specs, logical)

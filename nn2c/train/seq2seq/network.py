"""The seq2seq network in the IR: the encoder's cells, the decoder's cell and the bridge.

The decoder cell reads, besides its token input and its states, two leaves: `memory`
(positional: the encoder's top-layer output at every source position, (batch, J, H)) and
`final` (plain: that output at each row's last position, (batch, H)). Its output node is
the logits over the target vocabulary (the readout is inside the cell). The bridge gives
states their value before the first step, as DAGs over `final` and parameters; a state
without one starts at zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nn2c.compiler.emit import init_logical, pack
from nn2c.compiler.ir import Cell, Node, TensorSpec


@dataclass
class Seq2SeqNetwork:       # the contract's dataclass; the compiler's own is used when present
    encoder: list[Cell]         # layer k reads layer k-1's output; layer 0 reads onehot over Vs
    decoder: Cell               # layer `layers`; input: onehot over Vt; output: the logits
    bridge: dict[str, Node]     # state name -> its initial value
    source_vocab: int
    target_vocab: int
    hidden: int
    layers: int

    def tensors(self) -> dict[str, TensorSpec]:
        out = {}
        for cell in self.encoder:
            out.update(cell.tensors)
        out.update(self.decoder.tensors)
        return out


try:        # the compiler's lowering defines the same dataclass
    from nn2c.compiler.seq2seq import Seq2SeqNetwork  # noqa: F811
except ImportError:
    pass


def nodes_of(roots) -> list[Node]:
    """Every node reachable from `roots`, arguments first."""
    order, seen = [], set()

    def visit(node):
        stack = [(node, False)]
        while stack:
            n, expanded = stack.pop()
            if n in seen:
                continue
            if expanded:
                seen.add(n)
                order.append(n)
                continue
            stack.append((n, True))
            stack.extend((a, False) for a in reversed(n.args) if a not in seen)

    for r in roots:
        visit(r)
    return order


def all_nodes(network: Seq2SeqNetwork) -> list[Node]:
    out = [n for cell in network.encoder for n in cell.nodes()]
    return out + nodes_of([*network.decoder.roots(), *network.bridge.values()])


def param_roles(network: Seq2SeqNetwork) -> dict[str, str]:
    """As `emit.param_roles` for language models: a vector parameter whose every use adds to a
    value is a bias (starts at 0), one whose every use multiplies one is a gain (starts at 1)."""
    uses: dict[str, set] = {}
    for node in all_nodes(network):
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


def init_tensors(network: Seq2SeqNetwork, seed: int) -> dict[str, np.ndarray]:
    """Initial stored tensors, drawn per kernel parameter (`emit.init_logical`)."""
    specs = network.tensors()
    return pack(specs, init_logical(specs, network.hidden, seed, param_roles(network)))

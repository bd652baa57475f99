"""The decoder cell (and the bridge) as torch source, with positional values.

A positional node's value is a (batch, J, width) tensor: one row per source position. Its
plain operands (batch, width) broadcast over the positions; `softmaxj` is the softmax over
the positions below each row's length (weight exactly 0 beyond it, as -inf gives), and
`sumj` sums those positions only. The nodes are split three ways:

    prepare   reads memory, final, parameters and constants only: computed once per batch
              (Bahdanau's U_a hⱼ, the bridge);
    hoist     reads the step's token but no state: computed for every step of a
              teacher-forced batch in one product (or for one step when decoding);
    step      the rest, once per decoder step.

An attention's context `sumj(mul(α, memory))`, α a `softmaxj` of width 1 read by nothing
else, is one batched product α(batch, 1, J) @ memory (as nn2run binds it): exact, since α is
0 where the mask excludes and prepare zeroes the memory there once per batch (whatever it
held), and several times faster than the product, the mask and the sum over (batch, J, H)
with their backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nn2c.backend.fused import torch_expr
from nn2c.compiler.ir import Cell, topological

TOKEN = ("onehot", "input", "gather")
LEAVES = ("param", "const", "state", "memory", "final")


def positional_nodes(nodes) -> set:
    """The per-position nodes: marked so, the memory, and whatever reads one except sumj."""
    out = set()
    for n in nodes:
        if n.op == "memory" or n.attrs.get("positional") or (n.op != "sumj" and any(a in out for a in n.args)):
            out.add(n)
    return out


def _classify(nodes):
    state_dep, token_dep = set(), set()
    for n in nodes:
        if n.op == "state" or any(a in state_dep for a in n.args):
            state_dep.add(n)
        if n.op in TOKEN or any(a in token_dep for a in n.args):
            token_dep.add(n)
    return state_dep, token_dep


class DecoderSource:
    """Renders `prepare(P, M, FIN, MASK) -> (K, initial states)`, `hoist(P, X, K, MASK) -> H`
    (X: the token ids of one or more steps) and `step(P, S, K, H, M, MASK) -> (logits, states)`."""

    def __init__(self, cell: Cell, bridge: dict):
        self.cell, self.bridge = cell, bridge
        self.states = [name for name, _, _ in cell.states]
        self.nodes = topological([*cell.roots(), *[bridge[s] for s in self.states if s in bridge]])
        self.pos = positional_nodes(self.nodes)
        state_dep, token_dep = _classify(self.nodes)
        self.where = {}
        for n in self.nodes:
            if n.op in LEAVES:
                continue
            if n in state_dep or (n in token_dep and n in self.pos):
                self.where[n] = "step"
            elif n in token_dep:
                self.where[n] = "hoist"
            else:
                self.where[n] = "prepare"
        self.params = {}
        for n in self.nodes:
            if n.op == "param":
                self.params.setdefault(n.attrs["tensor"], f"p{len(self.params)}")
        self.index = {n: i for i, n in enumerate(self.nodes)}
        users: dict = {}
        for n in self.nodes:
            for a in n.args:
                users.setdefault(a, []).append(n)
        self.prepared = [n for n in self.nodes if self.where.get(n) == "prepare"
                         and any(self.where.get(u) in ("hoist", "step") for u in users.get(n, []))]
        self.hoisted = [n for n in self.nodes if self.where.get(n) == "hoist"
                        and any(self.where.get(u) == "step" for u in users.get(n, []))]
        roots = list(dict.fromkeys([*(nxt for _, _, nxt in cell.states), cell.output]))
        self.hoisted += [n for n in roots if self.where.get(n) == "hoist" and n not in self.hoisted]
        self.prepared += [n for n in roots if self.where.get(n) == "prepare" and n not in self.prepared]
        self.inits = [bridge.get(s) for s in self.states]
        roots_set = set(roots)
        self.contexts = {}          # sumj node -> its α, where the context is one product
        for n in self.nodes:
            m = n.args[0] if n.op == "sumj" else None
            if m is None or m.op != "mul" or len(users.get(m, [])) != 1 or m in roots_set:
                continue
            alpha = [a for a in m.args if a.op != "memory"]
            if len(alpha) == 1 and len(m.args) == 2 and alpha[0].op == "softmaxj" and alpha[0].width == 1:
                self.contexts[n] = alpha[0]
        self.skipped = {n.args[0] for n in self.contexts}

    def name(self, n, stage: str) -> str:
        if n.op == "param":
            return self.params[n.attrs["tensor"]]
        if n.op == "const":
            return repr(float(n.attrs["value"]))
        if n.op == "state":
            return f"s{[p for _, p, _ in self.cell.states].index(n)}"
        if n.op == "memory":
            return "M"
        if n.op == "final":
            return "FIN"
        home = self.where[n]
        if home == stage:
            return f"v{self.index[n]}"
        if home == "prepare":
            return f"K[{self.prepared.index(n)}]"
        return f"H[{self.hoisted.index(n)}]"

    def expr(self, n, stage: str) -> str:
        args = [self.name(a, stage) for a in n.args]
        if n in self.pos:               # plain operands broadcast over the positions
            args = [f"{s}.unsqueeze(-2)" if a not in self.pos and a.op not in ("param", "const") else s
                    for a, s in zip(n.args, args)]
            if n.op == "concat":
                args = [f"{s}.expand(-1, M.shape[1], -1)" if a not in self.pos else s
                        for a, s in zip(n.args, args)]
        if n.op == "onehot":
            return f"F.one_hot(X, {n.width}).to(DT)"
        if n.op == "input":
            raise ValueError("the decoder's input is its previous token (onehot or gather), not a vector")
        if n.op == "gather":
            return f"F.embedding(X, {args[0]})"
        if n.op == "softmaxj":
            return f"{args[0]}.masked_fill(~MASK, float('-inf')).softmax(1)"
        if n in self.contexts:
            alpha, zeroed = self.name(self.contexts[n], stage), f"K[{len(self.prepared)}]"
            return f"torch.bmm({alpha}.transpose(1, 2), {zeroed}).squeeze(1)"
        if n.op == "sumj":
            return f"{args[0]}.masked_fill(~MASK, 0.0).sum(1)"
        return torch_expr(n, args)

    def _body(self, stage: str) -> list[str]:
        return [f"    v{self.index[n]} = {self.expr(n, stage)}" for n in self.nodes
                if self.where.get(n) == stage and n not in self.skipped]

    def _head(self, stage: str, extra: str = "") -> list[str]:
        """The parameters this stage reads, as locals."""
        used = {a.attrs["tensor"] for n in self.nodes if self.where.get(n) == stage for a in n.args if a.op == "param"}
        if stage == "prepare":
            used |= {n.attrs["tensor"] for n in self.inits if n is not None and n.op == "param"}
        return [f"    {v} = P[{t!r}]" for t, v in self.params.items() if t in used] + ([extra] if extra else [])

    def source(self) -> str:
        ref = lambda n, stage: "None" if n is None else self.name(n, stage)      # noqa: E731
        lines = ["def prepare(P, M, FIN, MASK):", *self._head("prepare", "    DT = M.dtype"), *self._body("prepare"),
                 f"    K = [{', '.join([*(f'v{self.index[n]}' for n in self.prepared), 'M.masked_fill(~MASK, 0.0)'])}]",
                 f"    return K, [{', '.join(ref(n, 'prepare') for n in self.inits)}]",
                 "", "def hoist(P, X, K, MASK):", *self._head("hoist", "    DT = P[next(iter(P))].dtype"),
                 *self._body("hoist"),
                 f"    return [{', '.join(f'v{self.index[n]}' for n in self.hoisted)}]",
                 "", "def step(P, S, K, H, M, MASK):", *self._head("step")]
        lines += [f"    s{i} = S[{i}]" for i in range(len(self.states))]
        lines += self._body("step")
        nexts = ", ".join(self.name(nxt, "step") for _, _, nxt in self.cell.states)
        lines.append(f"    return {self.name(self.cell.output, 'step')}, [{nexts}]")
        return "\n".join(lines) + "\n"


def compile_decoder(cell: Cell, bridge: dict):
    """(prepare, hoist, step, DecoderSource) for the decoder cell and its bridge."""
    src = DecoderSource(cell, bridge)
    ns = {"torch": torch, "F": F}
    exec(compile(src.source(), f"<nn2 decoder {cell.layer}>", "exec"), ns)
    return ns["prepare"], ns["hoist"], ns["step"], src

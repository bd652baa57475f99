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

from nn2c.backend.fused import FusedLoop, torch_expr
from nn2c.backend.fused import supported as fused_supported
from nn2c.backend.precision import check as check_precision
from nn2c.backend.precision import mm as low_mm
from nn2c.backend.precision import mm_bias_low
from nn2c.compiler.emit import init_logical, pack, param_roles
from nn2c.compiler.ir import Cell, Network, addmm_pairs, consumers, depends_on_state


def _split_plans(nodes) -> dict:
    """Bases whose slices do not overlap: cut each into pieces once with torch.split (one
    autograd node whose backward is one cat) instead of one indexing op per slice."""
    slices: dict = {}
    width = {}
    for n in nodes:
        if n.op == "slice":
            base = n.args[0]
            slices.setdefault(base, set()).add((n.attrs["start"], n.attrs["start"] + n.width))
            width[base] = base.width
    plans = {}
    for base, spans in slices.items():
        cuts = sorted({0, width[base]} | {a for a, _ in spans} | {b for _, b in spans})
        pieces = list(zip(cuts, cuts[1:]))
        if len(spans) > 1 and all(span in pieces for span in spans):
            plans[base] = pieces
    return plans


class _Codegen:
    """Straight-line torch source for one cell: hoisted part, then the time loop."""

    def __init__(self, cell: Cell, hoist: bool, loop=None, low: bool = False):
        self.cell, self.low = cell, low     # low: products in bf16 (MM), see nn2c.backend.precision
        self.fused = loop          # a FusedLoop replacing the time loop, or None
        self.nodes = cell.nodes()
        stateful = depends_on_state(cell)
        self.in_loop = {n for n in self.nodes if n in stateful or not hoist}
        self.names = {prev: f"s{i}" for i, (_, prev, _) in enumerate(cell.states)}
        self.params: dict[str, str] = {}
        for node in self.nodes:
            if node.op == "param":
                self.names[node] = self.params.setdefault(node.attrs["tensor"], f"p{len(self.params)}")
            elif node.op == "const":
                self.names[node] = repr(float(node.attrs["value"]))
        self.plans = _split_plans(self.nodes)
        uses = self.uses = consumers(cell)
        self.addmm = addmm_pairs(self.nodes, self.in_loop, uses)     # add -> matmul
        self.biased = self._biased(uses)                              # add -> (product, bias)
        self.absorbed = {m for m in self.addmm.values()} | {m for m, _ in self.biased.values()}
        self.pre, self.loop, self.unbound = [], [], {}
        self.split_done: set = set()        # bases already cut with torch.split

    def _biased(self, uses) -> dict:
        """Hoisted `gather(W) + b` and `x @ W + b` (b a vector, the product used once): the
        bias goes into the gather table (V rows, not T·B) or into one addmm."""
        out = {}
        for n in self.nodes:
            if n.op != "add" or n in self.in_loop:
                continue
            for k, m in enumerate(n.args):
                b = n.args[1 - k]
                if (m.op in ("gather", "matmul") and m not in self.in_loop and len(uses.get(m, [])) == 1
                        and b.op == "param" and len(self.cell.tensors[b.attrs["tensor"]].shape) == 1):
                    out[n] = (m, b)
                    break
        return out

    def _loop_only(self, node) -> bool:
        """Only the fused/native loop reads this hoisted value (nothing else sees its dtype)."""
        return (self.fused is not None and node in self.fused.ext
                and all(c is not None and c in self.in_loop for c in self.uses.get(node, [None])))

    def ref(self, a, looped: bool) -> str:
        if not looped or a in self.in_loop or a.op in ("param", "const", "state"):
            return self.names[a]
        self.unbound[a] = self.names[a]
        return self.names[a] + "_u[t]"

    def statement(self, n: int, node) -> None:
        looped = node in self.in_loop
        out = self.loop if looped else self.pre
        self.names[node] = f"v{n}"
        if node in self.absorbed:
            return                                  # emitted inside its add
        if node.op == "slice" and node.args[0] in self.plans:
            self._split(node, out, looped)
            return
        if node in self.biased:
            m, b = self.biased[node]
            w, bias = self.names[m.args[-1]], self.names[b]
            if m.op == "gather":
                out.append(f"v{n} = F.embedding(xs, {w} + {bias})")
            else:
                x = self.ref(m.args[0], False)
                # (widened, then the bias added in place: an add of bf16 to float32 is a slow pass;
                # left in bf16 when only the loop reads it: the loop widens it)
                if self.low and self._loop_only(node):
                    out.append(f"v{n} = MMB({x}, {w}, {bias})")
                else:
                    out.append(f"v{n} = MM({x}, {w}).add_({bias})" if self.low else
                               f"v{n} = torch.addmm({bias}, {x}.flatten(0, -2), {w}).unflatten(0, {x}.shape[:-1])")
            return
        if node in self.addmm:
            mm = self.addmm[node]
            other = node.args[1] if node.args[0] is mm else node.args[0]
            args = [self.ref(x, looped) for x in (other, *mm.args)]
            out.append(f"v{n} = MM({args[1]}, {args[2]}).add_({args[0]})" if self.low else
                       f"v{n} = torch.addmm({args[0]}, {args[1]}, {args[2]})")
            return
        expr = _expr(node, [self.ref(a, looped) for a in node.args], "xs[t]" if looped else "xs", self.low)
        out.append(f"v{n} = {expr}")

    def _split(self, node, out, looped) -> None:
        base = node.args[0]
        pieces = self.plans[base]
        key = self.names[base]
        targets = "".join(f"{key}_{i}, " for i in range(len(pieces)))
        if base not in self.split_done:
            self.split_done.add(base)
            sizes = [b - a for a, b in pieces]
            out.append(f"{targets}= torch.split({self.ref(base, looped)}, {sizes}, -1)")
        span = (node.attrs["start"], node.attrs["start"] + node.width)
        self.names[node] = f"{key}_{pieces.index(span)}"

    def source(self) -> str:
        for n, node in enumerate(self.nodes):
            if node not in self.names:
                self.statement(n, node)
        cell, names = self.cell, self.names
        k = len(cell.states)
        recurrent = [(i, nxt) for i, (_, _, nxt) in enumerate(cell.states) if nxt in self.in_loop]
        out_looped = cell.output in self.in_loop
        body = ["def run(xs, states, P):"]
        body += [f"    {v} = P[{t!r}]" for t, v in self.params.items()]
        body += [f"    {line}" for line in self.pre]
        if self.fused is not None:
            ext = ", ".join(f"SEQ({names[e]}, xs)" for e in self.fused.ext)
            params = ", ".join(names[p] for p in self.fused.params)
            body.append(f"    return LOOP(xs.shape[0], [{ext}], list(states), [{params}])")
            return "\n".join(body) + "\n"
        body += ["    " + "".join(f"s{i}, " for i in range(k)) + "= states"] if k else []
        body += [f"    {v}_u = SEQ({v}, xs).unbind(0)" for v in self.unbound.values()]
        if self.loop:
            body += ["    outs = []", "    for t in range(xs.shape[0]):"]
            body += [f"        {line}" for line in self.loop]
            if recurrent:
                body.append("        " + "".join(f"s{i}, " for i, _ in recurrent) + "= "
                            + "".join(f"{names[x]}, " for _, x in recurrent))
            if out_looped:
                body.append(f"        outs.append({names[cell.output]})")
        body += [f"    s{i} = {names[x]}[-1]" for i, (_, _, x) in enumerate(cell.states)
                 if x not in self.in_loop]
        result = "torch.stack(outs)" if out_looped else names[cell.output]
        body.append(f"    return {result}, [{', '.join(f's{i}' for i in range(k))}]")
        return "\n".join(body) + "\n"


def cell_source(cell: Cell, hoist: bool = True, loop=None, low: bool = False) -> str:
    """Python source of `run(xs, states, P) -> (outputs over time, final states)`; with
    `loop` (a FusedLoop) the time loop is that compiled forward/backward pair; with `low`
    the products take bf16 operands."""
    return _Codegen(cell, hoist, loop, low).source()


def _expr(node, args: list[str], xs: str, low: bool = False) -> str:
    op = node.op
    if op == "onehot":
        return f"F.one_hot({xs}, {node.width}).float()"
    if op == "input":
        return xs
    if op == "gather":
        return f"F.embedding({xs}, {args[0]})"
    return torch_expr(node, args, low)


def _seq(value: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """A hoisted value as a (T, B, width) sequence: one computed from parameters alone
    (no input) is the same vector at every step and in every stream."""
    if value.dim() == 3:
        return value
    return value.expand(xs.shape[0], xs.shape[1], value.shape[-1])


def compile_cell(cell: Cell, hoist: bool = True, fused: bool = False, precision: str = "fp32"):
    loop = FusedLoop(cell, precision) if fused and hoist and fused_supported(cell) else None
    source = cell_source(cell, hoist, loop, check_precision(precision) == "bf16")
    namespace = {"torch": torch, "F": F, "LOOP": loop, "SEQ": _seq, "MM": low_mm, "MMB": mm_bias_low}
    exec(compile(source, f"<nn2 cell {cell.layer}>", "exec"), namespace)
    return namespace["run"], loop


class TorchNetwork(torch.nn.Module):
    """A Network's parameters as torch Parameters (one per stored tensor, always float32) and
    its forward pass; `precision` says what the products compute in (nn2c.backend.precision)."""

    def __init__(self, network: Network, tensors: dict[str, np.ndarray], hoist: bool = True,
                 fused: bool = True, dropout: float = 0.0, precision: str = "fp32"):
        super().__init__()
        self.network, self.precision = network, check_precision(precision)
        self.dropout = dropout      # training only, on each layer's output; the file has none
        self.names = list(network.tensors())
        for i, name in enumerate(self.names):
            self.register_parameter(f"t{i}", torch.nn.Parameter(torch.from_numpy(np.array(tensors[name]))))
        self._cells, self.loops = [], []
        for cell in network.cells:
            run, loop = compile_cell(cell, hoist, fused, precision)
            self._cells.append(run)
            if loop is not None:
                self.loops.append(loop)
        # the readout's products stay float32 under bf16: logits rounded to 8 significant bits
        # cost ~0.03 nats/char at equal steps on tinyshakespeare (2×256, 1,200 steps: val
        # 1.6690 against float32's 1.6455; with a float32 readout 1.6329), for ~1% of the work
        self._readout, _ = compile_cell(network.readout, hoist, precision="fp32")

    def loop_kind(self) -> str:
        """What runs the recurrent loops where the parameters are now: "native" (generated C,
        CPU), "fused" (the compiler's loop in torch) or "autograd" (per step)."""
        if not self.loops or len(self.loops) < len(self._cells):
            return "autograd"
        params = list(self.parameters())
        return "+".join(sorted({loop.kind_for(params) for loop in self.loops}))

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
            if self.dropout and self.training and self.network.readout.output.op != "input":
                # (a cell with output feedback computes the readout itself: no dropout)
                x = F.dropout(x, self.dropout)
        logits, _ = self._readout(x, [], P)
        return logits, new_state

    def numpy_tensors(self) -> dict[str, np.ndarray]:
        return {name: t.detach().cpu().numpy().astype(np.float32) for name, t in self.tensor_dict().items()}


def init_tensors(network: Network, seed: int) -> dict[str, np.ndarray]:
    """Initial stored tensors (see `emit.init_logical`): gains 1, biases 0, the rest uniform."""
    specs = network.tensors()
    return pack(specs, init_logical(specs, network.hidden, seed, param_roles(network)))

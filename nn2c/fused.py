"""The fused recurrent loop: a forward and a backward derived by the compiler from the IR.

Autograd through a Python time loop records every small op of every step and, on the way
back, computes each weight gradient as T small products. Here the compiler writes both
directions itself: the forward runs the loop without recording, keeping only the values
the derivatives need; the backward walks the steps in reverse applying each node's
derivative rule, and computes every weight gradient at the end as one large product
over all steps (Aᵀ·G with T·B rows). Wrapped in one `torch.autograd.Function` per layer.

Which nodes are in the loop, which are hoisted (externals, given as whole sequences),
and the order of evaluation come from `nn2c.ir`; the derivative rules are below.
"""

from __future__ import annotations

import warnings
from typing import List, Tuple

import torch

from . import native
from .ir import KEEPS_OUTPUT, Cell, addmm_pairs, consumers, depends_on_state

# torch source for each element-wise IR op (also used by the per-step code in torch_backend)
TORCH_OPS = {"sigmoid": "torch.sigmoid({})", "tanh": "torch.tanh({})", "relu": "torch.relu({})",
        "exp": "torch.exp({})", "log": "torch.log({})", "neg": "(-{})", "softmax": "torch.softmax({}, -1)",
        "add": "({} + {})", "sub": "({} - {})", "mul": "({} * {})", "matmul": "({} @ {})"}
# derivative of an activation given its upstream gradient g, its output y and its input x
_DERIV = {"sigmoid": "torch.ops.aten.sigmoid_backward({g}, {y})", "tanh": "torch.ops.aten.tanh_backward({g}, {y})",
          "relu": "torch.ops.aten.threshold_backward({g}, {y}, 0)", "exp": "({g} * {y})", "log": "({g} / {x})",
          "neg": "(-{g})", "softmax": "({y} * ({g} - ({g} * {y}).sum(-1, keepdim=True)))"}


def torch_expr(node, args: list[str]) -> str:
    """torch source for an element-wise, slice, concat or product node, given its arguments'."""
    if node.op == "slice":
        s = node.attrs["start"]
        return f"{args[0]}[..., {s}:{s + node.width}]"
    if node.op == "concat":
        return f"torch.cat([{', '.join(args)}], -1)"
    return TORCH_OPS[node.op].format(*args)


class _LoopCode:
    """Generates `forward(E, S, P, T)` and `backward(saved, gouts, gS, E, P)` for one cell."""

    def __init__(self, cell: Cell):
        self.cell = cell
        nodes = cell.nodes()
        stateful = depends_on_state(cell)
        self.body = [n for n in nodes if n in stateful and n.op != "state"]
        in_body = {n for n in self.body}
        self.states = [prev for _, prev, _ in cell.states]
        self.ext, self.params = [], []
        for n in self.body:
            for a in n.args:
                if a.op == "param" and a not in self.params:
                    self.params.append(a)
                elif a not in in_body and a.op not in ("param", "const", "state") and a not in self.ext:
                    self.ext.append(a)
        self.uses = consumers(cell)
        self.name = {}
        for i, s in enumerate(self.states):
            self.name[s] = f"s{i}"
        for i, e in enumerate(self.ext):
            self.name[e] = f"E{i}[t]"
        for i, p in enumerate(self.params):
            self.name[p] = f"P{i}"
        for i, n in enumerate(self.body):
            self.name[n] = f"v{i}"
        self.saved = self._needed()

    def val(self, node) -> str:
        if node.op == "const":
            return repr(float(node.attrs["value"]))
        return self.name[node]

    def _needed(self) -> list:
        """Values the backward reads, saved per step by the forward."""
        need = []
        for n in self.body:
            if n.op == "mul":
                need += [a for a in n.args if a.op != "const"]
            elif n.op in KEEPS_OUTPUT:
                need.append(n)
            elif n.op == "log":
                need.append(n.args[0])
            elif n.op == "matmul":
                need.append(n.args[0])
        out = []
        for x in need:
            if x.op != "param" and x not in out and x not in self.ext:
                out.append(x)
        return out

    # --- forward -----------------------------------------------------------------------------
    def _expr(self, n) -> str:
        return torch_expr(n, [self.val(a) for a in n.args])

    def forward_source(self) -> str:
        k = len(self.states)
        fused = addmm_pairs(self.body, {n for n in self.body}, self.uses)
        skip = {m for m in fused.values()}
        saved_names = {x: f"k{j}" for j, x in enumerate(self.saved)}
        lines = ["def forward(E: List[Tensor], S: List[Tensor], P: List[Tensor], T: int)"
                 " -> Tuple[Tensor, List[Tensor], List[List[Tensor]]]:",
                 *self._unpack(), "    outs: List[Tensor] = []"]
        lines += [f"    k{j}: List[Tensor] = []" for j in range(len(self.saved))]
        lines.append("    for t in range(T):")
        for n in self.body:
            if n in skip:
                continue
            if n in fused:
                mm = fused[n]
                other = next(a for a in n.args if a is not mm)
                expr = f"torch.addmm({self.val(other)}, {self.val(mm.args[0])}, {self.val(mm.args[1])})"
            else:
                expr = self._expr(n)
            lines.append(f"        {self.name[n]} = {expr}")
        lines += [f"        {saved_names[x]}.append({self.val(x)})" for x in self.saved]
        lines.append("        " + ", ".join(f"s{i}" for i in range(k)) + " = "
                     + ", ".join(self.val(nxt) for _, _, nxt in self.cell.states))
        lines.append(f"        outs.append({self.val(self.cell.output)})")
        lines.append(f"    return torch.stack(outs), [{', '.join(f's{i}' for i in range(k))}], "
                     f"[{', '.join(f'k{j}' for j in range(len(self.saved)))}]")
        return "\n".join(lines) + "\n"

    def _unpack(self, states: bool = True) -> list[str]:
        groups = (("E", "E", self.ext), ("s", "S", self.states if states else []), ("P", "P", self.params))
        return [f"    {name}{i} = {group}[{i}]" for name, group, items in groups for i in range(len(items))]

    # --- backward ----------------------------------------------------------------------------
    def bval(self, x) -> str:
        """A forward value as the backward reads it at step t."""
        if x.op == "const":
            return repr(float(x.attrs["value"]))
        if x.op == "param" or x in self.ext:
            return self.name[x]
        return f"k{self.saved.index(x)}[t]"

    def backward_source(self) -> str:
        lines = ["def backward(K: List[List[Tensor]], gouts: Tensor, gS: List[Tensor], E: List[Tensor],"
                 " P: List[Tensor], T: int) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:",
                 *self._unpack(states=False)]
        loop = []
        lines += [f"    k{j} = K[{j}]" for j in range(len(self.saved))]
        lines += [f"    gs{i} = gS[{i}]" for i in range(len(self.states))]
        lines.append("    B = gouts.shape[1]")
        lines += [f"    gE{i}: List[Tensor] = []" for i in range(len(self.ext))]
        lines += [f"    gP{i} = torch.zeros_like(P{i})" for i in range(len(self.params))]
        matmuls = [n for n in self.body if n.op == "matmul"]
        lines += [f"    gM{j}: List[Tensor] = []" for j in range(len(matmuls))]
        # g @ Wᵀ with a contiguous Wᵀ made once: a transposed operand is a slower product
        lines += [f"    {p}T = {p}.t().contiguous()" for p in dict.fromkeys(self.name[m.args[1]] for m in matmuls)]
        contrib: dict = {self.cell.output: ["gouts[t]"]}
        for i, (_, _, nxt) in enumerate(self.cell.states):
            contrib.setdefault(nxt, []).append(f"gs{i}")
        slices: dict = {}
        for idx in range(len(self.body) - 1, -1, -1):
            n = self.body[idx]
            total = self._assemble(contrib.get(n, []), slices.get(n, []), n.width, idx, loop)
            if total is None:
                continue
            loop.append(f"g{idx} = {total}")
            self._rule(n, f"g{idx}", contrib, slices, loop, matmuls)
        for i, e in enumerate(self.ext):
            total = " + ".join(contrib.get(e, [])) or f"torch.zeros_like(E{i}[t])"
            loop.append(f"gE{i}.append({total})")
        new = [" + ".join(contrib.get(s, [])) or f"torch.zeros_like(gs{i})" for i, s in enumerate(self.states)]
        loop.append(", ".join(f"gs{i}" for i in range(len(new))) + " = " + ", ".join(new))
        lines.append("    for t in range(T - 1, -1, -1):")
        lines += [f"        {line}" for line in loop]
        for j, m in enumerate(matmuls):       # every weight gradient: one product over all steps
            p = self.name[m.args[1]]
            a = self.saved.index(m.args[0])
            # gM was filled from the last step back: flip it to line up with the forward's k
            lines.append(f"    g{p} = g{p} + torch.cat(k{a}).t() @ torch.stack(gM{j}).flip(0).flatten(0, 1)")
        lines.append(f"    return [{', '.join(f'torch.stack(gE{i}).flip(0)' for i in range(len(self.ext)))}], "
                     f"[{', '.join(f'gs{i}' for i in range(len(self.states)))}], "
                     f"[{', '.join(f'gP{i}' for i in range(len(self.params)))}]")
        return "\n".join(lines) + "\n"

    def _assemble(self, terms, pieces, width, idx, loop) -> str | None:
        parts = list(terms)
        if pieces:
            pieces = sorted(pieces)
            if all(a + w <= b for (a, w, _), (b, _, _) in zip(pieces, pieces[1:])):
                cat, at = [], 0
                for start, w, g in pieces:
                    if start > at:
                        cat.append(f"gouts.new_zeros([B, {start - at}])")
                    cat.append(g)
                    at = start + w
                if at < width:
                    cat.append(f"gouts.new_zeros([B, {width - at}])")
                parts.append(cat[0] if len(cat) == 1 else f"torch.cat([{', '.join(cat)}], -1)")
            else:
                loop.append(f"b{idx} = gouts.new_zeros([B, {width}])")
                loop += [f"b{idx}.narrow(1, {s}, {w}).add_({g})" for s, w, g in pieces]
                parts.append(f"b{idx}")
        return " + ".join(parts) if parts else None

    def _give(self, a, expr, contrib, loop) -> None:
        if a.op == "const":
            return
        if a.op == "param":
            p = self.name[a]
            loop.append(f"g{p} = g{p} + ({expr}).sum(0)")
            return
        contrib.setdefault(a, []).append(expr)

    def _rule(self, n, g, contrib, slices, loop, matmuls) -> None:
        a = n.args
        if n.op == "add":
            for x in a:
                self._give(x, g, contrib, loop)
        elif n.op == "sub":
            self._give(a[0], g, contrib, loop)
            self._give(a[1], f"(-{g})", contrib, loop)
        elif n.op == "mul":
            self._give(a[0], f"({g} * {self.bval(a[1])})", contrib, loop)
            self._give(a[1], f"({g} * {self.bval(a[0])})", contrib, loop)
        elif n.op == "matmul":
            self._give(a[0], f"({g} @ {self.name[a[1]]}T)", contrib, loop)
            loop.append(f"gM{matmuls.index(n)}.append({g})")
        elif n.op == "slice":
            slices.setdefault(a[0], []).append((n.attrs["start"], n.width, g))
        elif n.op == "concat":
            at = 0
            for x in a:
                self._give(x, f"{g}[:, {at}:{at + x.width}]", contrib, loop)
                at += x.width
        else:
            y = self.bval(n) if n.op in KEEPS_OUTPUT else ""
            x = self.bval(a[0]) if n.op == "log" else ""
            self._give(a[0], _DERIV[n.op].format(g=g, y=y, x=x), contrib, loop)


def supported(cell: Cell) -> bool:
    """The fused loop needs every output of the cell computed inside the loop, and products
    whose left operand is a vector (the IR guarantees a parameter on the right)."""
    stateful = depends_on_state(cell)
    roots = [cell.output] + [nxt for _, _, nxt in cell.states]
    ok_ops = set(TORCH_OPS) | {"slice", "concat", "state"}
    return bool(cell.states) and all(r in stateful and r.op != "state" for r in roots) \
        and all(n.op in ok_ops for n in cell.nodes() if n in stateful)


class FusedLoop:
    """The compiled forward and backward of one cell's time loop."""

    def __init__(self, cell: Cell, script: bool = True):
        code = _LoopCode(cell)
        self.ext, self.params = code.ext, code.params
        self.forward_src, self.backward_src = code.forward_source(), code.backward_source()
        ns = {"torch": torch, "List": List, "Tuple": Tuple, "Tensor": torch.Tensor}
        exec(compile(self.forward_src, f"<nn2 loop {cell.layer} forward>", "exec"), ns)
        exec(compile(self.backward_src, f"<nn2 loop {cell.layer} backward>", "exec"), ns)
        self.fwd, self.bwd = ns["forward"], ns["backward"]
        self.scripted = False
        if script:
            self._script()
        self.cell = cell
        self._native, self.native_error = None, None
        if not native.enabled():
            self.native_error = "turned off by NN2_NATIVE"
        elif (why := native.supported(cell)) is not None:
            self.native_error = why

    @property
    def kind(self) -> str:
        """What runs the loop for CPU float32 tensors: native (generated C), torchscript or python."""
        return self.kind_for([])

    def kind_for(self, tensors) -> str:
        """What runs the loop for these tensors (the rule `implementation` applies)."""
        if self.native_error is None and native.NativeLoop.usable(tensors):
            return "native"
        return "torchscript" if self.scripted else "python"

    def implementation(self, tensors):
        """The native loop for CPU float32 tensors (built on first use), else this loop."""
        if self.kind_for(tensors) == "native":
            if self._native is None:
                try:
                    self._native = native.NativeLoop(self.cell, self.ext, self.params)
                except native.NativeUnavailable as e:
                    self.native_error = str(e)
                    return self
            return self._native
        return self

    def _script(self) -> None:
        """Run both loops in TorchScript's interpreter (less overhead per op than Python);
        the Python functions stay if this torch cannot compile them."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                unit = torch.jit.CompilationUnit(self.forward_src + "\n" + self.backward_src)
            self.fwd, self.bwd, self.scripted = unit.forward, unit.backward, True
        except Exception:       # noqa: BLE001 — any failure means: use the Python version
            self.scripted = False

    def __call__(self, T: int, E: list, S: list, P: list):
        outs, *finals = _Loop.apply(self, T, len(E), len(S), *E, *S, *P)
        return outs, finals


class _Loop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loop: FusedLoop, T: int, n_e: int, n_s: int, *tensors):
        E, S, P = tensors[:n_e], tensors[n_e:n_e + n_s], tensors[n_e + n_s:]
        impl = loop.implementation(tensors)
        outs, finals, K = impl.fwd(list(E), list(S), list(P), T)
        ctx.loop, ctx.T, ctx.K, ctx.n_e = impl, T, K, n_e
        ctx.save_for_backward(*E, *P)
        ctx.state_like = [torch.zeros_like(s) for s in S]
        ctx.out_shape = outs.shape
        return (outs, *finals)

    @staticmethod
    def backward(ctx, gouts, *gS):
        saved = ctx.saved_tensors
        E, P = saved[:ctx.n_e], saved[ctx.n_e:]
        gS = [g if g is not None else z for g, z in zip(gS, ctx.state_like)]
        if gouts is None:
            gouts = ctx.state_like[0].new_zeros(ctx.out_shape)
        gE, gSi, gP = ctx.loop.bwd(ctx.K, gouts, gS, E, P, ctx.T)
        return (None, None, None, None, *gE, *gSi, *gP)

"""The fused recurrent loop: the compiler's forward and backward of a cell's time loop,
rendered as torch source.

Autograd through a Python time loop records every small op of every step and, on the way
back, computes each weight gradient as T small products. Here the compiler writes both
directions itself: the forward runs the loop without recording, keeping only the values
the derivatives need; the backward (derived as data by `nn2c.compiler.backward`) walks the steps
in reverse, and computes every weight gradient at the end as one large product over all
steps (Aᵀ·G with T·B rows). Wrapped in one `torch.autograd.Function` per layer.

This loop runs on a GPU, without a C compiler, and for what the native loop
(`nn2c.backend.native`) does not support; on the CPU the native loop runs instead where it can.
"""

from __future__ import annotations

import torch

from nn2c.backend import native
from nn2c.backend import precision as precision_
from nn2c.compiler.backward import Backward, Deriv, Grad, derive
from nn2c.compiler.ir import Cell, Node, addmm_pairs, consumers
from nn2run.ops import REDUCTIONS, check_table, named

# torch source for each operator (also used by the per-step code in torch_backend)
TORCH_OPS = {"add": "({} + {})", "sub": "({} - {})", "mul": "({} * {})", "neg": "(-{})",
             "sigmoid": "torch.sigmoid({})", "tanh": "torch.tanh({})", "relu": "torch.relu({})",
             "softmax": "torch.softmax({}, -1)", "exp": "torch.exp({})", "log": "torch.log({})",
             "matmul": "({} @ {})", "div": "({} / {})", "sqrt": "torch.sqrt({})",
             "logsoftmax": "torch.log_softmax({}, -1)", "mean": "{}.mean(-1, keepdim=True)",
             "sum": "{}.sum(-1, keepdim=True)", "max": "{}.amax(-1, keepdim=True)"}
# an activation's derivative: g the upstream gradient, v what the derivative reads (nn2run.ops)
TORCH_DERIV = {"sigmoid": "torch.ops.aten.sigmoid_backward({g}, {v})",
               "tanh": "torch.ops.aten.tanh_backward({g}, {v})",
               "relu": "torch.ops.aten.threshold_backward({g}, {v}, 0)",
               "softmax": "({v} * ({g} - ({g} * {v}).sum(-1, keepdim=True)))",
               "exp": "({g} * {v})", "log": "({g} / {v})", "sqrt": "({g} / (2 * {v}))",
               "logsoftmax": "({g} - torch.exp({v}) * {g}.sum(-1, keepdim=True))"}
# a reduction's derivative over the w columns of its operand a (result v, upstream gradient g)
# (ties share max's gradient equally, as torch's amax does)
TORCH_REDUCE = {"sum": "{g}.expand(-1, {w})", "mean": "({g} / {w}).expand(-1, {w})",
                "max": "({g} * ({a} == {v}) / ({a} == {v}).sum(-1, keepdim=True))"}
check_table("nn2c.backend.fused TORCH_OPS", TORCH_OPS, named("elementwise", "activation", "reduction", "product"))
check_table("nn2c.backend.fused TORCH_DERIV", TORCH_DERIV, named("activation"))
check_table("nn2c.backend.fused TORCH_REDUCE", TORCH_REDUCE, REDUCTIONS)


def torch_expr(node, args: list[str], low: bool = False) -> str:
    """torch source for an element-wise, slice, concat or product node, given its arguments';
    with `low`, a product is MM (`nn2c.backend.precision.mm`: bf16 operands)."""
    if node.op == "matmul" and low:
        return f"MM({args[0]}, {args[1]})"
    if node.op == "slice":
        s = node.attrs["start"]
        return f"{args[0]}[..., {s}:{s + node.width}]"
    if node.op == "concat":
        return f"torch.cat([{', '.join(args)}], -1)"
    return TORCH_OPS[node.op].format(*args)


def _names(bw: Backward) -> dict:
    lp = bw.loop
    names = {s: f"s{i}" for i, s in enumerate(lp.states)}
    names.update({e: f"E{i}[t]" for i, e in enumerate(lp.ext)})
    names.update({p: f"P{i}" for i, p in enumerate(lp.params)})
    names.update({n: f"v{i}" for i, n in enumerate(lp.body)})
    return names


def _const(node: Node) -> str:
    return repr(float(node.attrs["value"]))


def _weights(bw: Backward, names: dict) -> list[str]:
    """The products' weights (each the right operand of a product), once each."""
    return list(dict.fromkeys(names[w.param] for w in bw.weights))


def forward_source(bw: Backward, low: bool = False) -> str:
    """`forward(E, S, P, T) -> (outputs, final states, saved values)`; with `low` the
    products take bf16 operands (each weight rounded once, before the loop)."""
    lp, names = bw.loop, _names(bw)
    val = lambda x: _const(x) if x.op == "const" else names[x]      # noqa: E731
    weight = lambda x: names[x] + "L" if low else names[x]          # noqa: E731
    k = len(lp.states)
    fused = addmm_pairs(lp.body, set(lp.body), consumers(lp.cell))
    skip = set(fused.values())
    lines = ["def forward(E, S, P, T):", *_unpack(bw, low=low), "    outs = []"]
    if low:
        lines += [f"    {p}L = LOW({p})" for p in _weights(bw, names)]
    lines += [f"    k{j} = []" for j in range(len(bw.saved))]
    lines.append("    for t in range(T):")
    for n in lp.body:
        if n in skip:
            continue
        if n in fused:
            mm = fused[n]
            other = next(a for a in n.args if a is not mm)
            expr = (f"({val(other)} + MMS({val(mm.args[0])}, {weight(mm.args[1])}))" if low else
                    f"torch.addmm({val(other)}, {val(mm.args[0])}, {val(mm.args[1])})")
        elif n.op == "matmul":
            expr = torch_expr(n, [val(n.args[0]), weight(n.args[1])], low)
        else:
            expr = torch_expr(n, [val(a) for a in n.args])
        lines.append(f"        {names[n]} = {expr}")
    lines += [f"        k{j}.append({val(x)})" for j, x in enumerate(bw.saved)]
    lines.append("        " + ", ".join(f"s{i}" for i in range(k)) + " = "
                 + ", ".join(val(nxt) for _, _, nxt in lp.cell.states))
    lines.append(f"        outs.append({val(lp.cell.output)})")
    lines.append(f"    return torch.stack(outs), [{', '.join(f's{i}' for i in range(k))}], "
                 f"[{', '.join(f'k{j}' for j in range(len(bw.saved)))}]")
    return "\n".join(lines) + "\n"


def _unpack(bw: Backward, states: bool = True, low: bool = False) -> list[str]:
    """The arguments by name; with `low` the external sequences widened (one given in bf16
    is a hoisted bf16 product's result; the element-wise work is float32)."""
    lp = bw.loop
    groups = (("E", "E", lp.ext), ("s", "S", lp.states if states else ()), ("P", "P", lp.params))
    return [f"    {name}{i} = {group}[{i}]{'.float()' if low and name == 'E' else ''}"
            for name, group, items in groups for i in range(len(items))]


class _Backward:
    """Renders `backward(K, gouts, gS, E, P, T) -> (gE, gS, gP)` from a Backward."""

    def __init__(self, bw: Backward, low: bool = False):
        self.bw, self.names, self.low = bw, _names(bw), low
        self.index = {n: i for i, n in enumerate(bw.loop.body)}
        self.saved = {x: j for j, x in enumerate(bw.saved)}
        self.pieces: dict = {}          # target -> [(start, width, expr)]
        self.loop: list[str] = []

    def value(self, x) -> str:
        if isinstance(x, Grad):
            return f"g{self.index[x.of]}"
        if isinstance(x, Deriv):
            a = [self.value(v) for v in x.args]
            if x.op == "neg":
                return f"(-{a[0]})"
            if x.op == "mul":
                return f"({a[0]} * {a[1]})"
            if x.op == "div":
                return f"({a[0]} / {a[1]})"
            if x.op == "rsum":
                return f"{a[0]}.sum(-1, keepdim=True)"
            if x.op in REDUCTIONS:
                return TORCH_REDUCE[x.op].format(g=a[0], a=a[1] if len(a) > 1 else "",
                                                 v=a[2] if len(a) > 2 else "", w=x.width)
            if x.op == "cols":
                return f"{a[0]}[:, {x.start}:{x.start + x.width}]"
            if x.op == "matmul_t":
                wt = f"{self.names[x.args[1]]}T"
                return f"MM({a[0]}, {wt})" if self.low else f"({a[0]} @ {wt})"
            return TORCH_DERIV[x.op].format(g=a[0], v=a[1])
        if x.op == "const":
            return _const(x)
        if x.op == "param" or x in self.bw.loop.ext:
            return self.names[x]
        return f"k{self.saved[x]}[t]"

    def total(self, target, idx) -> str | None:
        """The gradient of `target` at this step from its pieces, or None when none reach it."""
        pieces = self.pieces.get(target, [])
        whole = [e for s, w, e in pieces if s == 0 and w == target.width]
        parts: dict = {}
        for s, w, e in pieces:
            if not (s == 0 and w == target.width):
                parts.setdefault((s, w), []).append(e)
        out = list(whole)
        spans = sorted(parts)
        if spans and all(a + w <= b for (a, w), (b, _) in zip(spans, spans[1:])):
            cat, at = [], 0
            for s, w in spans:
                if s > at:
                    cat.append(f"gouts.new_zeros([B, {s - at}])")
                cat.append(" + ".join(parts[(s, w)]))
                at = s + w
            if at < target.width:
                cat.append(f"gouts.new_zeros([B, {target.width - at}])")
            out.append(cat[0] if len(cat) == 1 else f"torch.cat([{', '.join(cat)}], -1)")
        elif spans:
            self.loop.append(f"b{idx} = gouts.new_zeros([B, {target.width}])")
            self.loop += [f"b{idx}.narrow(1, {s}, {w}).add_({' + '.join(parts[(s, w)])})" for s, w in spans]
            out.append(f"b{idx}")
        return " + ".join(out) if out else None

    def source(self) -> str:
        bw, lp = self.bw, self.bw.loop
        products = [w.product for w in bw.weights]
        lines = ["def backward(K, gouts, gS, E, P, T):", *_unpack(bw, states=False, low=self.low)]
        lines += [f"    k{j} = K[{j}]" for j in range(len(bw.saved))]
        lines += [f"    gs{i} = gS[{i}]" for i in range(len(lp.states))]
        lines.append("    B = gouts.shape[1]")
        lines += [f"    gE{i} = []" for i in range(len(lp.ext))]
        lines += [f"    gP{i} = torch.zeros_like(P{i})" for i in range(len(lp.params))]
        lines += [f"    gM{j} = []" for j in range(len(products))]
        # g @ Wᵀ with a contiguous Wᵀ made once: a transposed operand is a slower product
        lines += [f"    {p}T = LOW({p}).t().contiguous()" if self.low else f"    {p}T = {p}.t().contiguous()"
                  for p in _weights(bw, self.names)]
        self.pieces = {lp.cell.output: [(0, lp.cell.output.width, "gouts[t]")]}
        for i, (_, _, nxt) in enumerate(lp.cell.states):
            self.pieces.setdefault(nxt, []).append((0, nxt.width, f"gs{i}"))
        for rule in bw.rules:
            n = rule.node
            total = self.total(n, self.index[n])
            if total is None:
                continue
            self.loop.append(f"g{self.index[n]} = {total}")
            for term in rule.terms:
                expr = self.value(term.value)
                if term.target.op == "param":
                    p = self.names[term.target]
                    self.loop.append(f"g{p} = g{p} + ({expr}).sum(0)")
                else:
                    self.pieces.setdefault(term.target, []).append((term.start, term.width, expr))
            if n in products:
                self.loop.append(f"gM{products.index(n)}.append(g{self.index[n]})")
        for i, e in enumerate(lp.ext):
            self.loop.append(f"gE{i}.append({self.total(e, f'e{i}') or f'torch.zeros_like(E{i}[t])'})")
        new = [self.total(s, f"s{i}") or f"torch.zeros_like(gs{i})" for i, s in enumerate(lp.states)]
        self.loop.append(", ".join(f"gs{i}" for i in range(len(new))) + " = " + ", ".join(new))
        lines.append("    for t in range(T - 1, -1, -1):")
        lines += [f"        {line}" for line in self.loop]
        for j, w in enumerate(bw.weights):       # every weight gradient: one product over all steps
            p = self.names[w.param]
            # gM was filled from the last step back: flip it to line up with the forward's k
            a, g = f"torch.cat(k{self.saved[w.input]}).t()", f"torch.stack(gM{j}).flip(0).flatten(0, 1)"
            lines.append(f"    g{p} = g{p} + MMS({a}, {g})" if self.low else f"    g{p} = g{p} + {a} @ {g}")
        lines.append(f"    return [{', '.join(f'torch.stack(gE{i}).flip(0)' for i in range(len(lp.ext)))}], "
                     f"[{', '.join(f'gs{i}' for i in range(len(lp.states)))}], "
                     f"[{', '.join(f'gP{i}' for i in range(len(lp.params)))}]")
        return "\n".join(lines) + "\n"


def supported(cell: Cell) -> bool:
    """The fused loop needs every output of the cell computed inside the loop, and products
    whose left operand is a vector (the IR guarantees a parameter on the right)."""
    lp = derive(cell).loop if cell.states else None
    if lp is None:
        return False
    inside = set(lp.body)
    ok = set(TORCH_OPS) | {"slice", "concat"}
    return all(r in inside for r in lp.cell.roots()) and all(n.op in ok for n in lp.body)


class FusedLoop:
    """The compiled forward and backward of one cell's time loop; on the CPU, the native
    loop runs them where it can (`loop_kind` says which ran last). `precision`: what the
    products compute in (`nn2c.backend.precision`)."""

    def __init__(self, cell: Cell, precision: str = "fp32"):
        self.backward = derive(cell)
        self.cell, self.precision = cell, precision_.check(precision)
        low = precision == "bf16"
        self.ext, self.params = list(self.backward.loop.ext), list(self.backward.loop.params)
        self.forward_src = forward_source(self.backward, low)
        self.backward_src = _Backward(self.backward, low).source()
        ns = {"torch": torch, "MM": precision_.mm, "MMS": precision_.mm_sum, "LOW": precision_.low}
        exec(compile(self.forward_src, f"<nn2 loop {cell.layer} forward>", "exec"), ns)
        exec(compile(self.backward_src, f"<nn2 loop {cell.layer} backward>", "exec"), ns)
        self.fwd, self.bwd = ns["forward"], ns["backward"]
        self.native_error = native.unavailable(cell)
        self.last_kind: str | None = None       # what ran the last forward: "native" or "fused"
        self._native: dict = {}

    @property
    def kind(self) -> str:
        """What runs the loop for CPU float32 tensors: "native" (generated C) or "fused"."""
        return self.kind_for([])

    def kind_for(self, tensors) -> str:
        """What runs the loop for these tensors (the rule `implementation` applies)."""
        usable = native.usable(tensors, self.precision == "bf16")
        return "native" if self.native_error is None and usable else "fused"

    def implementation(self, tensors, n_e: int = 0):
        """The native loop for CPU float32 tensors (built on first use; with bf16 products
        one per set of external sequences given in bf16, the first n_e tensors), else this loop."""
        if self.kind_for(tensors) == "native":
            half = tuple(i for i, e in enumerate(tensors[:n_e]) if e.dtype == torch.bfloat16)
            if half not in self._native:
                try:
                    self._native[half] = native.NativeLoop(self.backward, self.precision, half)
                except native.NativeUnavailable as e:
                    self.native_error = str(e)
                    return self
            return self._native[half]
        return self

    def __call__(self, T: int, E: list, S: list, P: list):
        outs, *finals = _Loop.apply(self, T, len(E), len(S), *E, *S, *P)
        return outs, finals


def _own_precision(device_types=("cuda", "cpu")):
    """The loop computes in its own precision whatever autocast region it is called in: in
    one, its inputs arrive in float32 and it runs (forward and backward) with autocast off;
    else the backward would multiply bf16 gradients by float32 values and fail, and the
    final states, which go on to the next window and into `.numpy()`, would be bf16."""
    def decorate(fwd, bwd):
        for device_type in device_types:
            fwd = torch.amp.custom_fwd(fwd, device_type=device_type, cast_inputs=torch.float32)
            bwd = torch.amp.custom_bwd(bwd, device_type=device_type)
        return staticmethod(fwd), staticmethod(bwd)
    return decorate


class _Loop(torch.autograd.Function):
    def forward(ctx, loop: FusedLoop, T: int, n_e: int, n_s: int, *tensors):
        E, S, P = tensors[:n_e], tensors[n_e:n_e + n_s], tensors[n_e + n_s:]
        impl = loop.implementation(tensors, n_e)
        loop.last_kind = "fused" if impl is loop else "native"
        outs, finals, K = impl.fwd(list(E), list(S), list(P), T)
        ctx.loop, ctx.T, ctx.K, ctx.n_e = impl, T, K, n_e
        ctx.save_for_backward(*E, *P)
        ctx.state_like = [torch.zeros_like(s) for s in S]
        ctx.out_shape = outs.shape
        return (outs, *finals)

    def backward(ctx, gouts, *gS):
        saved = ctx.saved_tensors
        E, P = saved[:ctx.n_e], saved[ctx.n_e:]
        gS = [g if g is not None else z for g, z in zip(gS, ctx.state_like)]
        if gouts is None:
            gouts = ctx.state_like[0].new_zeros(ctx.out_shape)
        gE, gSi, gP = ctx.loop.bwd(ctx.K, gouts, gS, E, P, ctx.T)
        return (None, None, None, None, *gE, *gSi, *gP)

    forward, backward = _own_precision()(forward, backward)

"""The Python driver of a native loop: `forward(E, S, P, T)` and `backward(K, gouts, gS, E, P, T)`
with the fused loop's signatures, rendered from the Plan as straight-line Python that
allocates the buffers once per call, then runs each step's C functions (through ctypes)
and products (torch calls writing into the buffers), and after the loop every weight
gradient as one product over all steps. `nn2c.backend.fused` wraps it in the autograd Function.
"""

from __future__ import annotations

import ctypes

import torch

from nn2c.backend.native.build import build
from nn2c.backend.native.plan import Group, Plan, Rows, Seed, Where
from nn2c.backend.native.plan import plan as make_plan
from nn2c.backend.native.render import c_source
from nn2c.backend.precision import check, mm_sum
from nn2c.backend.precision import low as LOW
from nn2c.compiler.backward import Backward, Deriv, Grad


def _table(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _arrays(table) -> str:
    return ", ".join(python for _, python in table)


def _ref(plan: Plan, node, whole: bool = False) -> str:
    """A forward value as a torch view: at step t (for the product calls) or, with `whole`,
    over all steps as (T, B, w) (for the weight gradients)."""
    where, what, off = plan.value_of(node)
    if where is Where.PARAM:
        base = plan.loop.params[what]
        v = f"P[{what}]"
        return v if off == 0 and node.width == base.width else f"{v}[{off}:{off + node.width}]"
    if where is Where.STATE:
        buf = plan.state_bufs[what]
        step, seq, width = f"{buf.name}u[t]", f"{buf.name}[:T]", buf.width
    elif where is Where.EXT:
        step, seq, width = f"E{what}u[t]", f"E[{what}]", plan.loop.ext[what].width
    else:
        step = f"{what.name}u[t + {what.shift}]" if what.shift else f"{what.name}u[t]"
        seq, width = (f"{what.name}[1:]" if what.shift else what.name), what.width
    full = off == 0 and node.width == width
    if full:
        return seq if whole else step
    return f"{seq}[:, :, {off}:{off + node.width}]" if whole else f"{step}[:, {off}:{off + node.width}]"


def _into(dst: str, how: str, x: str, w: str, low: bool, added: str | None = None) -> str:
    """A product x @ w written into the float32 view dst: `how` is "set", "add" (dst +=)
    or "plus" (dst = added + x @ w). In bf16 (`low`) the product is a bf16 result (MM,
    `precision.mm_sum`; torch's CPU products write no float32 from bf16), widened as it is
    written in."""
    if low:
        return {"set": f"{dst}.copy_(MM({x}, {w}))", "add": f"{dst}.add_(MM({x}, {w}))",
                "plus": f"torch.add({added}, MM({x}, {w}), out={dst})"}[how]
    return {"set": f"torch.mm({x}, {w}, out={dst})", "add": f"{dst}.addmm_({x}, {w})",
            "plus": f"torch.addmm({added}, {x}, {w}, out={dst})"}[how]


def forward_source(plan: Plan, low: bool = False) -> str:
    lp = plan.loop
    f = ["def forward(E, S, P, T):", "    B = S[0].shape[0]",
         "    E = [e.contiguous() for e in E]", "    P = [p.contiguous() for p in P]"]
    weights = dict.fromkeys(lp.params.index(p.weight) for p in plan.products)
    f += [f"    P{i}L = LOW(P[{i}])" if low else f"    P{i}L = P[{i}]" for i in sorted(weights)]
    for i, b in enumerate(plan.state_bufs):
        f += [f"    {b.name} = torch.empty(T + 1, B, {b.width}, dtype=F32)", f"    {b.name}[0] = S[{i}]"]
    into = {plan.values[p.node].name: p.into for p in plan.products if p.into is not None}
    for b in plan.value_bufs:
        f.append(f"    {b.name} = E[{into[b.name]}]" if b.name in into
                 else f"    {b.name} = torch.empty(T, B, {b.width}, dtype=F32)")
    f.append(f"    SCRATCH = torch.empty({plan.scratch[0]}, dtype=F32)")
    f.append(f"    A = table([{_arrays(plan.forward_table())}])")
    saved = [b.name for b in (*plan.state_bufs, *plan.value_bufs)]
    f += [f"    {name}u = {name}.unbind(0)" for name in saved]
    f += [f"    E{i}u = E[{i}].unbind(0)" for i in range(len(lp.ext))]
    f.append("    for t in range(T):")
    for g, item in enumerate(plan.schedule):
        if isinstance(item, Group):
            f.append(f"        f{g}(t, B, A)")
            continue
        dst, x, w = _ref(plan, item.node), _ref(plan, item.input), f"P{lp.params.index(item.weight)}L"
        if item.into is not None:
            f.append(f"        {_into(dst, 'add', x, w, low)}")
        elif item.added is None:
            f.append(f"        {_into(dst, 'set', x, w, low)}")
        else:
            f.append(f"        {_into(dst, 'plus', x, w, low, _ref(plan, item.added))}")
    out = plan.values[lp.cell.output]
    f.append(f"    K = [{', '.join(saved)}]")
    f.append(f"    return {out.name + '[1:]' if out.rows is Rows.STATE else out.name}, "
             f"[{', '.join(b.name + '[T]' for b in plan.state_bufs)}], K")
    return "\n".join(f) + "\n"


def _product_lines(plan: Plan, bg, low: bool) -> list[str]:
    """A product's backward at step t: the seeds into its gradient, then its input's gradient
    (g @ Wᵀ) and its added operand's (g itself)."""
    lp, lines = plan.loop, []
    g = f"{plan.grads[bg.product.node].name}u[t]"
    for w in bg.writes:
        buf = w.slot.buffer
        if buf.rows is Rows.PAIR:
            view = f"{buf.name}[t & 1]"
        else:
            view = f"{buf.name}u[t]" if buf.rows is Rows.STEP else f"{buf.name}[0]"
        if w.start or w.width != buf.width:
            view = f"{view}[:, {w.start}:{w.start + w.width}]"
        if isinstance(w.value, Seed):
            src = "GOUT[t]" if w.value.state is None else f"{plan.gs_bufs[w.value.state].name}[(t + 1) & 1]"
            lines.append(f"{view}.add_({src})" if w.add else f"{view}.copy_({src})")
        elif isinstance(w.value, Deriv):          # g @ Wᵀ
            wt = f"WT{lp.params.index(w.value.args[1])}"
            lines.append(_into(view, "add" if w.add else "set", g, wt, low))
        else:
            assert isinstance(w.value, Grad)
            lines.append(f"{view}.add_({g})" if w.add else f"{view}.copy_({g})")
    return lines


def backward_source(plan: Plan, low: bool = False) -> str:
    lp = plan.loop
    saved = [b.name for b in (*plan.state_bufs, *plan.value_bufs)]
    r = ["def backward(K, gouts, gS, E, P, T):", "    B = gouts.shape[1]",
         f"    {', '.join(saved)}{',' if len(saved) == 1 else ''} = K",
         "    E = [e.contiguous() for e in E]", "    P = [p.contiguous() for p in P]",
         "    GOUT = gouts.contiguous()", f"    SCRATCH = torch.empty({plan.scratch[1]}, dtype=F32)"]
    for b in plan.grad_bufs:
        alloc = "zeros" if b.name in plan.zeroed and b.rows is Rows.STEP else "empty"
        r.append(f"    {b.name} = torch.{alloc}({'T' if b.rows is Rows.STEP else '1'}, B, {b.width}, dtype=F32)")
        if b.rows is Rows.STEP:
            r.append(f"    {b.name}u = {b.name}.unbind(0)")
    for i, b in enumerate(plan.gs_bufs):
        r += [f"    {b.name} = torch.empty(2, B, {b.width}, dtype=F32)", f"    {b.name}[T & 1] = gS[{i}]"]
    for i, b in enumerate(plan.ge_bufs):
        if i in plan.ext_is_grad:
            r.append(f"    {b.name} = {plan.ext_is_grad[i].name}")     # the product's gradient is E's
            continue
        alloc = "zeros" if b.name in plan.zeroed or b.name not in plan.written else "empty"
        r.append(f"    {b.name} = torch.{alloc}(T, B, {b.width}, dtype=F32)")
    r += [f"    GP{i} = torch.zeros_like(P[{i}])" for i in range(len(lp.params))]
    weights = dict.fromkeys(lp.params.index(p.weight) for p in plan.products)
    r += [f"    WT{i} = {f'LOW(P[{i}])' if low else f'P[{i}]'}.t().contiguous()" for i in sorted(weights)]
    r.append(f"    A = table([{_arrays(plan.backward_table())}])")
    r.append("    for t in range(T - 1, -1, -1):")
    for b in (*plan.grad_bufs, *plan.gs_bufs):
        if b.name in plan.zeroed and b.rows is Rows.ONE:
            r.append(f"        {b.name}.zero_()")
        elif b.name in plan.zeroed and b.rows is Rows.PAIR:
            r.append(f"        {b.name}[t & 1].zero_()")
    for bg in plan.reverse:
        if bg.product is None:
            r.append(f"        b{bg.index}(t, B, A)")
        else:
            r += [f"        {line}" for line in _product_lines(plan, bg, low)]
    for p in plan.products:
        i = lp.params.index(p.weight)
        x, g = f"{_ref(plan, p.input, whole=True)}.flatten(0, 1).t()", f"{plan.grads[p.node].name}.flatten(0, 1)"
        r.append(f"    {_into(f'GP{i}', 'add', x, g, low)}")
    r += [f"    GP{i}[{off}:{off + w}] += {gm.name}.sum((0, 1))" for i, off, w, gm in plan.param_sums]
    r += [f"    GE{i}[:, :, {off}:{off + w}] += {gm.name}" for i, off, w, gm in plan.ext_adds]
    r.append(f"    return [{', '.join(b.name for b in plan.ge_bufs)}], "
             f"[{', '.join(f'{b.name}[0]' for b in plan.gs_bufs)}], "
             f"[{', '.join(f'GP{i}' for i in range(len(lp.params)))}]")
    return "\n".join(r) + "\n"


class NativeLoop:
    """fwd/bwd with the fused loop's signatures, running the generated C. The forward owns
    the sequences E it is given: a product may accumulate into one in place."""

    def __init__(self, backward: Backward, precision: str = "fp32"):
        self.plan = make_plan(backward)
        self.c_src = c_source(self.plan)
        low = check(precision) == "bf16"
        self.forward_src, self.backward_src = forward_source(self.plan, low), backward_source(self.plan, low)
        self._lib = build(self.c_src)
        ns = {"torch": torch, "table": _table, "F32": torch.float32, "MM": mm_sum, "LOW": LOW}
        for g, item in enumerate(self.plan.schedule):
            if isinstance(item, Group):
                for prefix in ("f", "b"):
                    fn = getattr(self._lib, f"nn2_{prefix}{g}")
                    fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
                    fn.restype = None
                    ns[f"{prefix}{g}"] = fn
        layer = backward.loop.cell.layer
        exec(compile(self.forward_src, f"<nn2 native loop {layer} forward>", "exec"), ns)
        exec(compile(self.backward_src, f"<nn2 native loop {layer} backward>", "exec"), ns)
        self.fwd, self.bwd = ns["forward"], ns["backward"]

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
from nn2c.backend.native.low import Low, low_plan
from nn2c.backend.native.plan import Buffer, Group, Plan, Product, Rows, Seed, Where
from nn2c.backend.native.plan import plan as make_plan
from nn2c.backend.native.render import c_source, tables
from nn2c.backend.precision import LOW as BF16
from nn2c.backend.precision import check
from nn2c.backend.precision import low as LOW
from nn2c.compiler.backward import Backward, Deriv, Grad


def _table(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _arrays(table) -> str:
    return ", ".join(python for _, python in table)


def _ref(plan: Plan, node, whole: bool = False, low: bool = False) -> str:
    """A forward value as a torch view: at step t (for the product calls) or, with `whole`,
    over all steps as (T, B, w) (for the weight gradients); with `low`, its bf16 copy
    (`nn2c.backend.native.low`)."""
    where, what, off = plan.value_of(node)
    tag = "L" if low else ""
    if where is Where.PARAM:
        base = plan.loop.params[what]
        v = f"P{what}L" if low else f"P[{what}]"
        return v if off == 0 and node.width == base.width else f"{v}[{off}:{off + node.width}]"
    if where is Where.STATE:
        buf = plan.state_bufs[what]
        step, seq, width = f"{buf.name}{tag}u[t]", f"{buf.name}{tag}[:T]", buf.width
    elif where is Where.EXT:
        step, seq, width = f"E{what}{tag}u[t]", f"E{what}L" if low else f"E[{what}]", plan.loop.ext[what].width
    else:
        name = what.name + tag
        step = f"{name}u[t + {what.shift}]" if what.shift else f"{name}u[t]"
        seq, width = (f"{name}[1:]" if what.shift else name), what.width
    full = off == 0 and node.width == width
    if full:
        return seq if whole else step
    return f"{seq}[:, :, {off}:{off + node.width}]" if whole else f"{step}[:, {off}:{off + node.width}]"


def _into(dst: str, how: str, x: str, w: str, added: str | None = None) -> str:
    """A float32 product x @ w written into the view dst: `how` is "set", "add" (dst +=)
    or "plus" (dst = added + x @ w)."""
    return {"set": f"torch.mm({x}, {w}, out={dst})", "add": f"{dst}.addmm_({x}, {w})",
            "plus": f"torch.addmm({added}, {x}, {w}, out={dst})"}[how]


def _rows(buf: Buffer) -> str:
    return "T + 1" if buf.rows is Rows.STATE else "T"


def _low_forward_setup(plan: Plan, lo: Low) -> list[str]:
    """The bf16 operands: weights and read-only inputs rounded once, the copies the C writes,
    a staging block per product."""
    f = [f"    P{i}L = LOW(P[{i}])" for i in lo.param_inputs]
    f += [f"    E{i}L = EH{i}" if i in lo.half_exts else f"    E{i}L = LOW(E[{i}])" for i in lo.ext_inputs]
    states = {b.name: i for i, b in enumerate(plan.state_bufs)}
    for name, c in lo.copies.items():
        f.append(f"    {c.name} = torch.empty({_rows(c)}, B, {c.width}, dtype=BF16)")
        if name in states:
            f.append(f"    {c.name}[0] = S[{states[name]}]")
    f += [f"    Z{g} = torch.empty(B, {p.node.width}, dtype=BF16)" for g, p in lo.staged.items()]
    return f


def _low_saved(lo: Low) -> list[str]:
    """What a bf16 forward keeps for the backward besides the float32 buffers (and the
    float32 widening of an external sequence given in bf16)."""
    return [*(c.name for c in lo.copies.values()), *(f"E{i}L" for i in lo.ext_inputs),
            *(f"E{i}F" for i in lo.half_exts)]


def forward_source(plan: Plan, lo: Low | None = None) -> str:
    lp = plan.loop
    f = ["def forward(E, S, P, T):", "    B = S[0].shape[0]",
         "    E = [e.contiguous() for e in E]", "    P = [p.contiguous() for p in P]"]
    for i in lo.half_exts if lo else ():           # widened by the C, step by step
        fresh = "EH{i}.float()" if lo.first_group is None else f"torch.empty(T, B, {lp.ext[i].width}, dtype=F32)"
        f += [f"    EH{i} = E[{i}]", f"    E[{i}] = E{i}F = {fresh.format(i=i)}"]
    for i, b in enumerate(plan.state_bufs):
        f += [f"    {b.name} = torch.empty(T + 1, B, {b.width}, dtype=F32)", f"    {b.name}[0] = S[{i}]"]
    into = {plan.values[p.node].name: p.into for p in plan.products if p.into is not None}
    for b in plan.value_bufs:
        f.append(f"    {b.name} = E[{into[b.name]}]" if b.name in into
                 else f"    {b.name} = torch.empty(T, B, {b.width}, dtype=F32)")
    weights = dict.fromkeys(lp.params.index(p.weight) for p in plan.products)
    f += _low_forward_setup(plan, lo) if lo else [f"    P{i}L = P[{i}]" for i in weights]
    f.append(f"    SCRATCH = torch.empty({plan.scratch[0]}, dtype=F32)")
    f.append(f"    A = table([{_arrays(tables(plan, lo)[0])}])")
    saved = [b.name for b in (*plan.state_bufs, *plan.value_bufs)]
    unbound = [*saved, *(c.name for c in lo.copies.values())] if lo else saved
    f += [f"    {name}u = {name}.unbind(0)" for name in unbound]
    f += [f"    E{i}u = E[{i}].unbind(0)" for i in range(len(lp.ext))]
    f += [f"    E{i}Lu = E{i}L.unbind(0)" for i in (lo.ext_inputs if lo else ())]
    f.append("    for t in range(T):")
    for g, item in enumerate(plan.schedule):
        if isinstance(item, Group):
            f.append(f"        f{g}(t, B, A)")
            continue
        if lo:
            x, w = _ref(plan, item.input, low=True), f"P{lp.params.index(item.weight)}L"
            f.append(f"        torch.mm({x}, {w}, out=Z{g})")
            f += [] if g in lo.widen_in else [f"        w{g}(t, B, A)"]
            continue
        dst, x, w = _ref(plan, item.node), _ref(plan, item.input), f"P{lp.params.index(item.weight)}L"
        if item.into is not None:
            f.append(f"        {_into(dst, 'add', x, w)}")
        elif item.added is None:
            f.append(f"        {_into(dst, 'set', x, w)}")
        else:
            f.append(f"        {_into(dst, 'plus', x, w, _ref(plan, item.added))}")
    out = plan.values[lp.cell.output]
    f.append(f"    K = [{', '.join(saved + (_low_saved(lo) if lo else []))}]")
    f.append(f"    return {out.name + '[1:]' if out.rows is Rows.STATE else out.name}, "
             f"[{', '.join(b.name + '[T]' for b in plan.state_bufs)}], K")
    return "\n".join(f) + "\n"


def _product_lines(plan: Plan, g: int, bg, lo: Low | None) -> list[str]:
    """A product's backward at step t: the seeds into its gradient, then its input's gradient
    (g @ Wᵀ) and its added operand's (g itself). With bf16 products the gradient is
    rounded into its bf16 copy once complete, and g @ Wᵀ staged and widened, by the C
    (`nn2c.backend.native.low`: c and v where no group does it)."""
    lp, lines = plan.loop, []
    g_ref = f"{plan.grads[bg.product.node].name}u[t]"
    seeds = [w for w in bg.writes if isinstance(w.value, Seed)]
    for w in (*seeds, None, *(w for w in bg.writes if not isinstance(w.value, Seed))):
        if w is None:
            lines += [f"c{g}(t, B, A)"] if lo and g not in lo.round_in else []
            continue
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
            if lo:
                lines.append(f"torch.mm({lo.grad_copies[g].name}u[t], {wt}, out=ZB{g})")
                lines += [] if g in lo.grad_widen_in else [f"v{g}(t, B, A)"]
            else:
                lines.append(_into(view, "add" if w.add else "set", g_ref, wt))
        else:
            assert isinstance(w.value, Grad)
            lines.append(f"{view}.add_({g_ref})" if w.add else f"{view}.copy_({g_ref})")
    return lines


def _low_backward_setup(lo: Low) -> list[str]:
    b = []
    for c in lo.grad_copies.values():
        b += [f"    {c.name} = torch.empty(T, B, {c.width}, dtype=BF16)", f"    {c.name}u = {c.name}.unbind(0)"]
    b += [f"    ZB{g} = torch.empty(B, {p.input.width}, dtype=BF16)" for g, p in lo.staged.items()]
    return b


def _weight_gradient(plan: Plan, g: int, p, lo: Low | None) -> str:
    """GP += Xᵀ G over all steps (T·B rows), one product after the loop; in bf16 from the
    bf16 copies of both operands, its bf16 result widened as it is added."""
    i = plan.loop.params.index(p.weight)
    if lo:
        x, gm = _ref(plan, p.input, whole=True, low=True), lo.grad_copies[g].name
        return f"    GP{i}.add_(torch.mm({x}.flatten(0, 1).t(), {gm}.flatten(0, 1)))"
    x, gm = _ref(plan, p.input, whole=True), plan.grads[p.node].name
    return f"    GP{i}.addmm_({x}.flatten(0, 1).t(), {gm}.flatten(0, 1))"


def backward_source(plan: Plan, lo: Low | None = None) -> str:
    lp = plan.loop
    saved = [b.name for b in (*plan.state_bufs, *plan.value_bufs)] + (_low_saved(lo) if lo else [])
    r = ["def backward(K, gouts, gS, E, P, T):", "    B = gouts.shape[1]",
         f"    {', '.join(saved)}{',' if len(saved) == 1 else ''} = K",
         "    E = [e.contiguous() for e in E]", "    P = [p.contiguous() for p in P]",
         "    GOUT = gouts.contiguous()", f"    SCRATCH = torch.empty({plan.scratch[1]}, dtype=F32)"]
    r += [f"    E[{i}] = E{i}F" for i in (lo.half_exts if lo else ())]
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
    r += _low_backward_setup(lo) if lo else []
    weights = dict.fromkeys(lp.params.index(p.weight) for p in plan.products)
    r += [f"    WT{i} = {f'LOW(P[{i}])' if lo else f'P[{i}]'}.t().contiguous()" for i in sorted(weights)]
    r.append(f"    A = table([{_arrays(tables(plan, lo)[1])}])")
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
            r += [f"        {line}" for line in _product_lines(plan, bg.index, bg, lo)]
    r += [_weight_gradient(plan, g, p, lo) for g, p in enumerate(plan.schedule) if isinstance(p, Product)]
    r += [f"    GP{i}[{off}:{off + w}] += {gm.name}.sum((0, 1))" for i, off, w, gm in plan.param_sums]
    r += [f"    GE{i}[:, :, {off}:{off + w}] += {gm.name}" for i, off, w, gm in plan.ext_adds]
    half = lo.half_exts if lo else ()
    ge = [f"{plan.ext_is_grad[i].name}L" if i in half and i in plan.ext_is_grad else b.name
          for i, b in enumerate(plan.ge_bufs)]     # (autograd casts the others to bf16)
    r.append(f"    return [{', '.join(ge)}], "
             f"[{', '.join(f'{b.name}[0]' for b in plan.gs_bufs)}], "
             f"[{', '.join(f'GP{i}' for i in range(len(lp.params)))}]")
    return "\n".join(r) + "\n"


class NativeLoop:
    """fwd/bwd with the fused loop's signatures, running the generated C. The forward owns
    the sequences E it is given: a product may accumulate into one in place."""

    def __init__(self, backward: Backward, precision: str = "fp32", half_exts: tuple = ()):
        self.plan = make_plan(backward)
        lo = low_plan(self.plan, half_exts) if check(precision) == "bf16" else None
        self.c_src = c_source(self.plan, lo)
        self.forward_src, self.backward_src = forward_source(self.plan, lo), backward_source(self.plan, lo)
        self._lib = build(self.c_src)
        ns = {"torch": torch, "table": _table, "F32": torch.float32, "BF16": BF16, "LOW": LOW}
        for g, item in enumerate(self.plan.schedule):
            # a group: its forward (f) and backward (b); a bf16 product: its widening (w), its
            # gradient's rounding (c) and g @ Wᵀ's widening (v, when it has an input gradient)
            prefixes = ("f", "b") if isinstance(item, Group) else ("w", "c", "v") if lo else ()
            for prefix in prefixes:
                fn = getattr(self._lib, f"nn2_{prefix}{g}", None)
                if fn is None:
                    continue
                fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
                fn.restype = None
                ns[f"{prefix}{g}"] = fn
        layer = backward.loop.cell.layer
        exec(compile(self.forward_src, f"<nn2 native loop {layer} forward>", "exec"), ns)
        exec(compile(self.backward_src, f"<nn2 native loop {layer} backward>", "exec"), ns)
        self.fwd, self.bwd = ns["forward"], ns["backward"]

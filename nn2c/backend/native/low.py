"""What a native loop with bf16 products (`--precision bf16`) adds to its Plan.

torch on the CPU has no bf16 × bf16 -> float32 product and each torch call is a pass of
its own: rounding a product's operand to bf16 before the call and widening its bf16 result
after it would be two more calls per product and step. Instead the generated C does both
inside the loop:
  * every buffer a product reads at step t gets a bf16 copy (`<name>L`, the same rows),
    written by the C function that writes the float32 value, in the same pass (a state's
    copy starts from the initial state, cast once; an external sequence is cast once,
    before the loop);
  * a product writes its bf16 result into a staging block (`Z<g>`, B rows), widened into the
    float32 value (with the folded sum added in the same pass) at the start of the group
    that follows it, or by a function of its own (`nn2_w<g>`) where no group follows;
  * in the backward each product's gradient gets a bf16 copy over all steps (`GM…L`), the
    operand of both g @ Wᵀ and the weight gradient after the loop, rounded at the end of the
    group that completes the gradient (else by `nn2_c<g>`), and g @ Wᵀ is staged (`ZB<g>`)
    and widened into its gradient slot at the start of the next group (else by `nn2_v<g>`).
The weights are rounded once per call, the element-wise work and every float32 buffer are
as in the float32 loop; the bf16 copies of the forward go into the saved values (the weight
gradients' left operands). An external sequence may arrive in bf16 (a hoisted bf16
product's result, `nn2c.backend.network`): the first group widens its row into a float32
buffer at each step, a product reads it as it is, and its gradient goes back in bf16 (the
product gradient's copy, where that is the whole of it).
"""

from __future__ import annotations

from dataclasses import dataclass

from nn2c.backend.native.plan import Buffer, NativeUnavailable, Plan, Product, Rows, Seed, Where
from nn2c.compiler.backward import Deriv


@dataclass(frozen=True)
class Low:
    copies: dict            # buffer name -> Buffer of its bf16 copy (same rows)
    ext_inputs: tuple       # external sequences a product reads (cast once)
    param_inputs: tuple     # parameters a product reads, as its input or its weight (cast once)
    staged: dict            # schedule index of a product -> its Product
    grad_copies: dict       # schedule index of a product -> Buffer of its gradient's bf16 copy
    widen_in: dict          # product -> the group whose forward starts with its widening
    round_in: dict          # product -> the group whose backward ends with its gradient's rounding
    grad_widen_in: dict     # product -> the group whose backward starts with g @ Wᵀ's widening
    half_exts: tuple        # external sequences given in bf16 (`EH<i>`), widened into E<i> by the C
    first_group: int | None     # the group whose forward starts by widening them (None: no group,
                                # they are widened once before the loop)

    def forward_table(self) -> tuple[tuple[str, str], ...]:
        return (*((b.name, b.name) for b in self.copies.values()),
                *((f"Z{g}", f"Z{g}") for g in self.staged), *((f"EH{i}", f"EH{i}") for i in self.half_exts))

    def backward_table(self) -> tuple[tuple[str, str], ...]:
        return (*((b.name, b.name) for b in self.grad_copies.values()),
                *((f"ZB{g}", f"ZB{g}") for g in self.staged))


def low_plan(plan: Plan, half_exts: tuple = ()) -> Low:
    copies, exts, params = {}, [], []
    for p in plan.products:
        params.append(plan.loop.params.index(p.weight))
        where, what, _ = plan.value_of(p.input)
        if where is Where.STATE:
            buf = plan.state_bufs[what]
        elif where is Where.BUFFER:
            buf = what
        elif where is Where.EXT:
            exts.append(what)
            continue
        elif where is Where.PARAM:
            params.append(what)
            continue
        else:       # cannot happen: the plan gives every product's input a buffer
            raise NativeUnavailable("a product whose input has no buffer")
        copies.setdefault(buf.name, Buffer(f"{buf.name}L", buf.width, buf.rows))
    staged = {g: item for g, item in enumerate(plan.schedule) if isinstance(item, Product)}
    grad_copies = {g: Buffer(f"{plan.grads[p.node].name}L", p.node.width, Rows.STEP) for g, p in staged.items()}
    first = next((g for g, item in enumerate(plan.schedule) if not isinstance(item, Product)), None)
    return Low(copies, tuple(dict.fromkeys(exts)), tuple(dict.fromkeys(params)), staged, grad_copies,
               *_folds(plan, staged), tuple(half_exts), first)


def _folds(plan: Plan, staged: dict) -> tuple[dict, dict, dict]:
    """Where the widenings and roundings around the products run inside a group's C function
    (a call and a pass fewer each), by row as the group's own work does: a product's
    widening at the start of the first group after it (only products lie between, and no
    product reads a product); its gradient's rounding at the end of the group just before
    its backward (which completes the gradient, when no seed arrives in between); g @ Wᵀ's
    widening at the start of the group just after (when it is the product's last write)."""
    schedule, reverse = plan.schedule, plan.reverse
    widen_in, round_in, grad_widen_in = {}, {}, {}
    for g in staged:
        k = g + 1
        while k < len(schedule) and isinstance(schedule[k], Product):
            k += 1
        if k < len(schedule):
            widen_in[g] = k
    for pos, bg in enumerate(reverse):
        if bg.product is None:
            continue
        before = reverse[pos - 1] if pos > 0 else None
        after = reverse[pos + 1] if pos + 1 < len(reverse) else None
        if before is not None and before.product is None and not any(isinstance(w.value, Seed) for w in bg.writes):
            round_in[bg.index] = before.index
        w = input_write(bg)
        if w is not None and w is bg.writes[-1] and after is not None and after.product is None:
            grad_widen_in[bg.index] = after.index
    return widen_in, round_in, grad_widen_in


def input_write(bg):
    """The write of a product's backward that is g @ Wᵀ (into its input's gradient), or None."""
    return next((w for w in bg.writes if isinstance(w.value, Deriv)), None)

"""Decoder kernels of a seq2seq model: a cell that reads the encoder's memory.

A decoder kernel declares its memory (`memory hⱼ`: the encoder's top-layer output at
position j, width H) and may read `hₙ` (the output at each input's last position). Values
marked ⱼ (`eₜⱼ`) are per position; `softmaxⱼ(…)` normalizes over the positions and `Σⱼ(…)`
sums over them. `X₀ = …` is the bridge: state X's value before the first step, from `hₙ`
and parameters only (a state without one starts at zero).

`check_decoder(kernel)` settles names, order and shapes as `nn2c.lang.check` does for a
cell, and adds the rules of positions: a per-position value is reduced (Σⱼ) before it
reaches a state, the output or the logits; softmaxⱼ and Σⱼ take a per-position operand; a
value is written with ⱼ exactly when it is per position. A score (softmaxⱼ's operand, a
reduction's value) has one column, which broadcasts over the other operand of ⊙ + − ⊘;
a matrix side that nothing ties (an attention's inner size) is H.
The memory and the final value are renamed `hⱼ` and `hₙ` here (one name each, apart from
any step value `hₜ`), and so they reach `nn2c.compiler.seq2seq`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nn2c.lang.ast import BinOp, Call, Concat, Equation, Expr, Kernel, Neg, Pos, Var, show, variables, walk
from nn2c.lang.check import _check_varying, _classify, _definitions, _input, _matrices, _order, _output
from nn2c.lang.errors import KernelError
from nn2c.lang.shapes import ONE, REDUCTIONS, Dim, H, Param, Shapes


@dataclass(frozen=True)
class CheckedDecoder:
    kernel: Kernel
    memory: str                # the memory's name as the equations read it: "hⱼ"
    final: str                 # the last position's output: "hₙ"
    input: str                 # the previous target token, size X (= the target vocabulary)
    output: str
    states: tuple[str, ...]
    order: tuple[Equation, ...]    # the cell's equations in dependency order (readout excluded)
    readout: Equation              # inside the decoder cell: its value is the logits
    bridge: dict[str, Equation]    # state -> its `X₀ = …` equation
    params: dict[str, Param]       # the cell's and the readout's (layer L)
    bridge_params: dict[str, Param]
    sizes: dict[str, Dim]
    positional: frozenset[str]     # step values per position
    prepared: frozenset[str]       # step values built from memory, final and parameters alone


def check_decoder(kernel: Kernel) -> CheckedDecoder:
    """Check a parsed decoder kernel; raise `KernelError` at the first mistake."""
    try:
        return _check(kernel)
    except KernelError as e:
        raise e.with_source(kernel.filename, kernel.source) from None


# --- the memory's names -------------------------------------------------------------------

def _rename(expr: Expr, memory: str) -> Expr:
    """hⱼ (the memory) and hₙ as names of their own; other uses of ⱼ must be step values."""
    if isinstance(expr, Var):
        if expr.index == "j" and expr.time is None:
            if expr.name != memory:
                raise KernelError(f"{expr} is per position, but the memory is {memory}ⱼ; a "
                                  f"value of this step per position is written {expr.name}ₜⱼ",
                                  pos=expr.pos)
            return Var(memory + "ⱼ", None, expr.pos)
        if expr.index == "n":
            return Var(memory + "ₙ", None, expr.pos)
        return expr
    if isinstance(expr, Call):
        return dataclasses.replace(expr, arg=_rename(expr.arg, memory))
    if isinstance(expr, Neg):
        return dataclasses.replace(expr, operand=_rename(expr.operand, memory))
    if isinstance(expr, BinOp):
        return dataclasses.replace(expr, left=_rename(expr.left, memory), right=_rename(expr.right, memory))
    if isinstance(expr, Concat):
        return dataclasses.replace(expr, parts=tuple(_rename(p, memory) for p in expr.parts))
    return expr


def _split(kernel: Kernel, memory: str) -> tuple[list[Equation], dict[str, Equation]]:
    cell, bridge = [], {}
    for eq in kernel.equations:
        t = eq.target
        if t.index == "j" and t.time is None:
            raise KernelError(f"cannot assign to {t}: the memory is the encoder's output",
                              pos=t.pos)
        if t.index == "n":
            raise KernelError(f"cannot assign to {t}: it is the encoder's last output", pos=t.pos)
        eq = Equation(t, _rename(eq.expr, memory), eq.pos)
        if t.index == "0":
            if t.name in bridge:
                raise KernelError(f"{t} is defined twice (first at {bridge[t.name].target.pos})",
                                  pos=t.pos)
            bridge[t.name] = eq
        else:
            cell.append(eq)
    return cell, bridge


# --- the checks ---------------------------------------------------------------------------

def _check(kernel: Kernel) -> CheckedDecoder:
    if kernel.memory is None:
        raise KernelError("a decoder kernel declares its memory first: `memory hⱼ`")
    memory, final = kernel.memory.name + "ⱼ", kernel.memory.name + "ₙ"
    equations, bridge = _split(kernel, kernel.memory.name)
    if not equations:
        raise KernelError("the kernel has no step equations")
    defs = _definitions(equations)
    cell = [eq for eq in equations if eq.target.name != "y"]
    states, undefined, params = _classify(cell, defs)
    for name in (memory, final):
        params.pop(name, None)
    input_name = _input(kernel, undefined, defs, params)
    output = _output(kernel, defs, states)
    readout = _readout(defs, output, memory)
    matrices = _matrices(cell + [readout] + list(bridge.values()), defs)
    order = _order(cell, defs, kernel.source)
    _check_varying(order, input_name, output, states)
    positional = _positions(order, readout, defs, memory, output, states)
    bridge_vars = _check_bridge(bridge, states, final, params)
    if not any(v.name in (memory, final) for v in variables(cell + [readout] + list(bridge.values()))):
        raise KernelError(f"no equation reads the memory {memory} or its last value {final}: the "
                          "translations would not depend on the input", pos=kernel.memory.pos)
    readout_vars = {v.name: v for v in variables([readout])
                    if v.time is None and v.name not in (memory, final)}
    shapes = _DecoderShapes(matrices, input_name, states, output, memory, final)
    values = {input_name: kernel.declared_input or undefined[input_name]}
    values.update({eq.target.name: eq.target for eq in cell + [readout]})
    sizes = shapes.solve(order + list(bridge.values()), readout, values,
                         tuple(equations) + tuple(bridge.values()) + (readout,))
    return CheckedDecoder(kernel, memory, final, input_name, output, tuple(states), tuple(order),
                          readout, bridge, shapes.params({**params, **readout_vars}),
                          shapes.params(bridge_vars), sizes, frozenset(positional),
                          frozenset(_prepared(order, memory, final, params)))


def _readout(defs, output: str, memory: str) -> Equation:
    eq = defs.get("y")
    if eq is None:
        p = Pos(0, 0)
        expr = BinOp("add", BinOp("matmul", Var("W_y", None, p), Var(output, 0, p), p),
                     Var("b_y", None, p), p)
        return Equation(Var("y", 0, p), expr, p)
    for v in variables([eq]):
        if v.time == -1 or v.name == memory or (v.time == 0 and v.name not in defs):
            raise KernelError(f"the readout may use this step's values, hₙ, numbers and "
                              f"parameters, not {v}", pos=v.pos)
    return eq


def _per_position(e: Expr, positional: set, memory: str) -> bool:
    """Whether e is per position; softmaxⱼ and Σⱼ must be given a per-position operand."""
    if isinstance(e, Var):
        return e.name == memory or (e.time == 0 and e.name in positional)
    if isinstance(e, Call):
        inner = _per_position(e.arg, positional, memory)
        if e.func in ("softmaxj", "sumj") and not inner:
            what = "normalizes" if e.func == "softmaxj" else "sums"
            raise KernelError(f"{e.spelled or e.func}(…) {what} over the positions j, but "
                              f"{show(e.arg)} is not per position", pos=e.pos)
        return inner and e.func != "sumj"
    if isinstance(e, Neg):
        return _per_position(e.operand, positional, memory)
    if isinstance(e, BinOp):
        left, right = (_per_position(e.left, positional, memory),
                       _per_position(e.right, positional, memory))
        return left or right
    if isinstance(e, Concat):
        flags = [_per_position(p, positional, memory) for p in e.parts]
        if any(flags) and not all(flags):
            raise KernelError(f"{show(e)} joins values per position and plain values; "
                              "reduce them first (Σⱼ)", pos=e.pos)
        return all(flags)
    return False


def _first_positional(e: Expr, positional: set, memory: str) -> Var:
    """The first per-position name outside a Σⱼ in e: where an error points."""
    for node in walk(e):
        if isinstance(node, Var) and _per_position(node, positional, memory):
            return node
    return e


def _positions(order, readout, defs, memory, output, states) -> set[str]:
    positional: set[str] = set()
    for eq in list(order) + [readout]:
        t = eq.target
        if _per_position(eq.expr, positional, memory):
            v = _first_positional(eq.expr, positional, memory)
            reach = ("the logits" if t.name == "y" else f"the state {t.name}ₜ" if t.name in states
                     else f"the output {t.name}ₜ" if t.name == output else None)
            if reach:
                raise KernelError(f"{v} is per position: reduce it over the positions (Σⱼ(…)) "
                                  f"before it reaches {reach}", pos=v.pos)
            if t.index != "j":
                raise KernelError(f"{t} is per position (it reads {v}): write {t.name}ₜⱼ, or "
                                  "reduce it over the positions with Σⱼ(…)", pos=t.pos)
            positional.add(t.name)
        elif t.index == "j":
            raise KernelError(f"{t} is marked per position but reads nothing per position; "
                              f"write {t.name}ₜ", pos=t.pos)
    for v in variables(list(order) + [readout]):
        if v.time == 0 and v.name in defs and v.index != defs[v.name].target.index:
            raise KernelError(f"{v} is written {defs[v.name].target} where it is defined",
                              pos=v.pos)
    return positional


def _check_bridge(bridge, states, final, params) -> dict[str, Var]:
    """A bridge sets a state from hₙ and its own parameters; returns those parameters."""
    found: dict[str, Var] = {}
    for name, eq in bridge.items():
        if name not in states:
            raise KernelError(f"{eq.target} sets the initial value of a state, but no "
                              f"{name}ₜ₋₁ is read", pos=eq.target.pos)
        for v in variables([eq]):
            if v.time is not None or v.name != final and v.name.endswith("ⱼ"):
                raise KernelError(f"the bridge {eq.target} may read only {final}, numbers and "
                                  f"parameters, not {v}", pos=v.pos)
            if v.name == final:
                continue
            if v.name in params:
                raise KernelError(f"{v.name} is a parameter of the step (first used at "
                                  f"{params[v.name].pos}); the bridge needs its own", pos=v.pos)
            found.setdefault(v.name, v)
    return found


def _prepared(order, memory, final, params) -> set[str]:
    """Step values computed once per input: from memory, final and parameters alone."""
    out: set[str] = set()
    for eq in order:
        names = [v for v in variables([eq])]
        if names and all(v.name in (memory, final) or (v.time is None and v.name in params)
                         or (v.time == 0 and v.name in out) for v in names):
            out.add(eq.target.name)
    return out


class _DecoderShapes(Shapes):
    """Shapes with the memory and final value of width H, and one-column scores that
    broadcast: softmaxⱼ's operand and a reduction's value have width 1."""

    def __init__(self, matrices, input_name, states, output, memory, final):
        super().__init__(matrices, input_name, states, output)
        self.bound[self.var(memory)] = H
        self.bound[self.var(final)] = H
        self.broadcasts: list[tuple] = []   # (result, left, right, node)

    def one(self, v: int, e: Expr, pos: Pos) -> int:
        d = self.dim(v)
        if d is not None and d != ONE:
            raise KernelError(f"{show(e)} is a score, one number per position, but has {d}",
                              pos=pos)
        self.bound[self.find(v)] = ONE
        return v

    def size(self, e: Expr, depth: int = 1):
        if isinstance(e, Call) and e.func in REDUCTIONS:
            super().size(e, depth)
            v = self.new()
            self.bound[v] = ONE
            return v
        if isinstance(e, Call) and e.func == "softmaxj":
            return self.one(self.size(e.arg, depth + 1), e.arg, e.pos)
        if isinstance(e, BinOp) and e.op != "matmul":
            left, right = self.size(e.left, depth + 1), self.size(e.right, depth + 1)
            if left is None or right is None:
                return right if left is None else left
            result = self.new()
            self.broadcasts.append((result, left, right, e))
            return result
        return super().size(e, depth)

    def _settle_broadcasts(self, guess: bool) -> bool:
        """Settle the element-wise ops whose operands tell their size; with `guess`, also
        one with only one operand known (or none), taken as equal sizes."""
        for item in list(self.broadcasts):
            result, left, right, node = item
            dl, dr = self.dim(left), self.dim(right)
            if dl == ONE or dr == ONE:
                other = right if dl == ONE else left
                self.agree(result, other, node, node.right if dl == ONE else node.left, node.pos)
            elif (dl is not None and dr is not None) or guess:
                self.agree(left, right, node.left, node.right, node.pos)
                self.agree(result, left, node, node.left, node.pos)
            else:
                continue
            self.broadcasts.remove(item)
            return True
        return False

    def _propagate(self) -> None:
        pending = sorted(self.constraints, key=lambda c: c[0])
        while pending or self.broadcasts:
            self._settle_concats()
            if self._settle_broadcasts(guess=False):
                continue
            known = [sum(self.dim(c[i]) is not None for i in (1, 2)) for c in pending]
            if pending and (max(known) > 0 or not self.broadcasts):
                _, a, b, left, right, pos = pending.pop(known.index(max(known)))
                self.agree(a, b, left, right, pos)
            else:
                self._settle_broadcasts(guess=True)
        self._settle_concats()
        self._inner_sizes()

    def _inner_sizes(self) -> None:
        """A matrix side nothing else ties (the inner size of an attention, the columns of
        v_a and the rows of W_a and U_a) is H."""
        for rows, cols in self.matrix.values():
            for side in (rows, cols):
                if self.dim(side) is None:
                    self.bound[self.find(side)] = H
                    self._settle_concats()

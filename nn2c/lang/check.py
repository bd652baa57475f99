"""Kernel → `CheckedKernel`: what every name is, the equations' order, and every shape.

`check(kernel)` decides which names are the input, state (`hₜ₋₁`), step values and
parameters; sorts the cell's equations by dependency (a cycle is an error); picks the
output and the readout (`yₜ = W_y·hₜ + b_y` unless the kernel writes its own); and has
`nn2c.lang.shapes` infer every size as a `Dim` (a sum of H, X, V). Every mistake is a
`KernelError` pointing into the source; `nn2c.lang.typos` tells a likely typo (a time index
written wrong) before the error it would cause elsewhere. Pure Python: imports nn2c.lang
modules only (no torch, no numpy, no lark).
"""

from __future__ import annotations

from dataclasses import dataclass

from nn2c.lang import typos
from nn2c.lang.ast import (
    FUNCTIONS,
    POSITIONS,
    BinOp,
    Call,
    Equation,
    Expr,
    Kernel,
    Pos,
    Var,
    show,
    start,
    variables,
    walk,
)
from nn2c.lang.errors import KernelError
from nn2c.lang.shapes import Dim, Param, Shapes


@dataclass(frozen=True)
class CheckedKernel:
    kernel: Kernel
    input: str                 # base name of the cell input, size X
    output: str                # base name of the cell output, size H
    states: tuple[str, ...]    # names used with ₜ₋₁, in order of their defining equations
    order: tuple[Equation, ...]   # the cell's equations in dependency order (readout excluded)
    readout: Equation          # yₜ = …, the kernel's own or yₜ = W_y·hₜ + b_y
    params: dict[str, Param]   # cell parameters, in order of first use
    readout_params: dict[str, Param]
    sizes: dict[str, Dim]      # every vector by base name: input, states, step values, "y"
    feedback: Var | None = None   # the first use of yₜ₋₁ (output feedback: the previous readout)


def check(kernel: Kernel) -> CheckedKernel:
    """Check a parsed kernel; raise `KernelError` at the first mistake."""
    try:
        return _check(kernel)
    except KernelError as e:
        raise e.with_source(kernel.filename, kernel.source) from None


# --- names -------------------------------------------------------------------------------

def _definitions(equations) -> dict[str, Equation]:
    defs: dict[str, Equation] = {}
    for eq in equations:
        t = eq.target
        if t.time == -1:
            raise KernelError(f"cannot assign to {t}: it is the previous step's value; "
                              f"define {t.name}ₜ instead", pos=t.pos)
        if t.name in defs:
            raise KernelError(f"{t} is defined twice (first at {defs[t.name].target.pos})",
                              pos=t.pos)
        defs[t.name] = eq
    return defs


def _classify(cell, defs) -> tuple[list[str], dict[str, Var], dict[str, Var]]:
    """States, undefined ₜ names (input candidates) and parameters, each by first use."""
    states, undefined, params = [], {}, {}
    for v in variables(cell):
        if v.name == "y" and v.time == -1:
            continue                    # output feedback: the previous step's readout
        if v.name == "y" and "y" in defs:
            raise KernelError(f"{v} is this step's readout; the cell can use the previous "
                              "one, yₜ₋₁", pos=v.pos)
        if v.time == -1:
            if v.name not in defs or defs[v.name].target.time != 0:
                raise KernelError(f"undefined name: {v} is state, but no equation defines "
                                  f"{v.name}ₜ", pos=v.pos)
            if v.name not in states:
                states.append(v.name)
        elif v.name not in defs:
            (undefined if v.time == 0 else params).setdefault(v.name, v)
    order = {eq.target.name: i for i, eq in enumerate(cell)}
    states.sort(key=order.__getitem__)
    return states, undefined, params


def _input(kernel: Kernel, undefined: dict[str, Var], defs, params: dict[str, Var]) -> str:
    declared = kernel.declared_input
    if declared is not None:
        if declared.name in defs:
            raise KernelError(f"{declared} is declared as the input but defined at "
                              f"{defs[declared.name].target.pos}", pos=declared.pos)
        extra = [v for n, v in undefined.items() if n != declared.name]
        if extra:
            raise KernelError(f"undefined name: {extra[0]} (the input is {declared})",
                              pos=extra[0].pos)
        if declared.name not in undefined and declared.name not in params:
            raise KernelError(f"the input {declared} is declared, but no equation reads it; a "
                              "cell that ignores its input would predict the same at every token",
                              pos=declared.pos)
        return declared.name
    if len(undefined) > 1:
        names = list(undefined.values())
        raise KernelError("cannot tell which is the input: " + ", ".join(map(str, names)) +
                          f" are all undefined; define the others or declare `input {names[0]}`",
                          pos=names[1].pos)
    if not undefined:
        raise typos.no_input(kernel, params)
    return next(iter(undefined))


def _output(kernel: Kernel, defs, states: list[str]) -> str:
    declared = kernel.declared_output
    if declared is not None:
        if declared.name not in defs:
            raise KernelError(f"the output {declared} is not defined by an equation",
                              pos=declared.pos)
        return declared.name
    if "h" in defs:
        return "h"
    if len(states) == 1:
        return states[0]
    raise KernelError("cannot infer the output; add `output hₜ`",
                      pos=kernel.equations[-1].target.pos)


def _matrices(equations, defs) -> dict[str, Var]:
    """Parameters used as the left operand of a matrix product, by first such use."""
    matrices, left_ids = {}, set()
    for eq in equations:
        for node in walk(eq.expr):
            if isinstance(node, Call) and node.func not in FUNCTIONS:
                raise KernelError(f"unknown function '{node.spelled or node.func}'", pos=node.pos)
            if not (isinstance(node, BinOp) and node.op == "matmul"):
                continue
            left = node.left
            if not isinstance(left, Var) or left.time is not None or left.name in defs:
                _missing_operator(left)
                where = f" ({left} is defined at {defs[left.name].target.pos})" \
                    if isinstance(left, Var) and left.name in defs else ""
                raise KernelError("the left operand of a matrix product must be a parameter "
                                  f"(a weight matrix), not {show(left)}{where}",
                                  pos=start(left))
            matrices.setdefault(left.name, left)
            left_ids.add(id(left))
    for v in variables(equations):
        if v.name in matrices and v.time is None and id(v) not in left_ids:
            raise KernelError(f"{v.name} is used as a matrix at {matrices[v.name].pos} and as "
                              "a vector here", pos=v.pos)
    return matrices


def _missing_operator(left: Expr) -> None:
    """`W xₜ U hₜ₋₁` reads as ((W·xₜ)·U)·hₜ₋₁: say that an operator is missing after xₜ."""
    factors = []
    while isinstance(left, BinOp) and left.op == "matmul":
        factors.insert(0, left.right)
        left = left.left
    factors.insert(0, left)
    for value, after in zip(factors[1:], factors[2:]):
        if not isinstance(value, Var) or value.time is not None:
            raise KernelError(f"an operator (+ − ⊙) is missing between {show(value)} and "
                              f"{show(after)}: a product is a matrix times a vector",
                              pos=start(after))


def _readout(kernel: Kernel, defs, output: str, cell_params) -> tuple[Equation, dict[str, Var]]:
    eq = defs.get("y")
    if eq is None:
        p = Pos(0, 0)
        expr = BinOp("add", BinOp("matmul", Var("W_y", None, p), Var(output, 0, p), p),
                     Var("b_y", None, p), p)
        return Equation(Var("y", 0, p), expr, p), {"W_y": Var("W_y", None, p),
                                                   "b_y": Var("b_y", None, p)}
    params = {}
    for v in variables([eq]):
        if v.time is None and v.name not in defs:
            if v.name in cell_params:
                raise KernelError(f"{v.name} is a parameter of the cell (first used at "
                                  f"{cell_params[v.name].pos}); the readout needs its own",
                                  pos=v.pos)
            params.setdefault(v.name, v)
        elif not (v.name == output and v.time == 0):
            raise KernelError(f"the readout may use only {output}ₜ, numbers and its own "
                              f"parameters, not {v}", pos=v.pos)
    return eq, params


def _check(kernel: Kernel) -> CheckedKernel:
    if not kernel.equations:
        raise KernelError("the kernel has no equations")
    _not_a_decoder(kernel)
    defs = _definitions(kernel.equations)
    typos.check_names(kernel, defs)
    cell = [eq for eq in kernel.equations if eq.target.name != "y"]
    states, undefined, params = _classify(cell, defs)
    input_name = _input(kernel, undefined, defs, params)
    for name, v in params.items():
        if name == input_name or name in states:
            raise KernelError(f"{name} is used without a time index; write {name}ₜ or "
                              f"{name}ₜ₋₁", pos=v.pos)
    output = _output(kernel, defs, states)
    readout, readout_vars = _readout(kernel, defs, output, params)
    matrices = _matrices(cell + [readout], defs)
    order = _order(cell, defs, kernel.source)
    _check_varying(order, input_name, output, states)
    shapes = Shapes(matrices, input_name, states, output)
    input_var = kernel.declared_input or undefined[input_name]
    values = {input_name: input_var}
    values.update({eq.target.name: eq.target for eq in cell + [readout]})
    try:
        sizes = shapes.solve(order, readout, values, kernel.equations + (readout,))
    except KernelError as e:
        unsized = [v for n, v in params.items()
                   if n not in shapes.matrix and shapes.dim(shapes.names.get(n)) is None]
        raise (typos.glued_input(kernel, input_var) or typos.unknown_vector(kernel, unsized)
               or e) from None
    feedback = next((v for v in variables(cell) if v.name == "y" and v.time == -1), None)
    return CheckedKernel(kernel, input_name, output, tuple(states), tuple(order), readout,
                         shapes.params(params), shapes.params(readout_vars), sizes, feedback)


def _not_a_decoder(kernel: Kernel) -> None:
    """Position subscripts belong to decoder kernels, which `nn2c.lang.decoder` checks."""
    if kernel.memory is not None:
        raise KernelError(f"this kernel reads a memory ({kernel.memory}): it is a seq2seq "
                          "decoder, compiled with an encoder (nn2c train --task seq2seq)",
                          pos=kernel.memory.pos)
    for node in (n for eq in kernel.equations for n in walk(eq.expr)):
        if isinstance(node, Call) and node.func in POSITIONS:
            raise KernelError(f"{node.spelled or node.func}(…) runs over the positions j of a "
                              "decoder's memory, but the kernel declares no memory; a decoder "
                              "starts with `memory hⱼ`", pos=node.pos)
    for v in [eq.target for eq in kernel.equations] + variables(kernel.equations):
        if v.index == "j":
            raise KernelError(f"{v} is a value per position, but the kernel declares no "
                              f"memory; a decoder starts with `memory {v.name}ⱼ`", pos=v.pos)


def check_layers(checked: CheckedKernel, layers: int) -> None:
    """Output feedback needs one layer: the readout runs on the top layer, and a cell reading
    it would be a loop through every layer of the step."""
    if checked.feedback is not None and layers > 1:
        k = checked.kernel
        raise KernelError(f"{checked.feedback} feeds the readout back into the cell, which needs "
                          f"one layer, not {layers} (--layers 1)",
                          pos=checked.feedback.pos).with_source(k.filename, k.source)


def _check_varying(order: list[Equation], input_name: str, output: str, states) -> None:
    """The output and every state must depend on the input or on a previous state: a value
    made of parameters alone would be the same at every step."""
    varying: set[str] = set()
    for eq in order:
        if any(v.time == -1 or v.name == input_name or v.name in varying for v in variables([eq])):
            varying.add(eq.target.name)
        elif eq.target.name == output or eq.target.name in states:
            raise KernelError(f"{eq.target} depends on neither the input nor a previous state, so it "
                              "would be the same at every step", pos=eq.target.pos)


# --- order -------------------------------------------------------------------------------

def _order(cell: list[Equation], defs, source: str) -> list[Equation]:
    """Equations sorted by dependency within the step; ties keep source order."""
    index = {eq.target.name: i for i, eq in enumerate(cell)}
    deps = [{index[v.name] for v in variables([eq]) if v.time != -1 and v.name in index}
            for eq in cell]
    done: list[int] = []
    while len(done) < len(cell):
        ready = [i for i in range(len(cell)) if i not in done and deps[i] <= set(done)]
        if not ready:
            raise _cycle(cell, deps, [i for i in range(len(cell)) if i not in done], source)
        done.append(ready[0])
    return [cell[i] for i in done]


def _cycle(cell, deps, remaining, source: str) -> KernelError:
    for i in remaining:
        if i in deps[i]:
            return typos.self_use(cell[i], source)
    path, node = [], remaining[0]
    while node not in path:
        path.append(node)
        node = min(d for d in deps[node] if d in remaining)
    loop = path[path.index(node):]
    first = loop.index(min(loop))
    loop = loop[first:] + loop[:first]
    names = [str(cell[i].target) for i in loop + loop[:1]]
    return KernelError("cycle: " + " → ".join(names), pos=cell[loop[0]].target.pos)

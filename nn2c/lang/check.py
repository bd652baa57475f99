"""Kernel → `CheckedKernel`: what every name is, the equations' order, and every shape.

`check(kernel)` decides which names are the input, state (`hₜ₋₁`), step values and
parameters; sorts the cell's equations by dependency (a cycle is an error); picks the
output and the readout (`yₜ = W_y·hₜ + b_y` unless the kernel writes its own); and
infers every size as a `Dim` (a sum of H, X, V) by unification. Every mistake is a
`KernelError` pointing into the source; `nn2c.lang.typos` tells a likely typo (a time index
written wrong) before the error it would cause elsewhere. Pure Python: imports nn2c.lang.ast,
nn2c.lang.errors and nn2c.lang.typos only (no torch, no numpy, no lark).
"""

from __future__ import annotations

from dataclasses import dataclass

from nn2c.lang import typos
from nn2c.lang.ast import FUNCTIONS, REDUCTIONS, BinOp, Call, Concat, Equation, Expr, Kernel, Neg, Num, Pos, Var, walk
from nn2c.lang.errors import KernelError


@dataclass(frozen=True)
class Dim:
    """A symbolic vector size: a sum of symbols (H hidden, X input, V vocabulary)."""
    terms: tuple[tuple[str, int], ...]

    @staticmethod
    def of(coeffs: dict[str, int]) -> Dim:
        return Dim(tuple(sorted((s, c) for s, c in coeffs.items() if c)))

    def __add__(self, other: Dim) -> Dim:
        coeffs = dict(self.terms)
        for s, c in other.terms:
            coeffs[s] = coeffs.get(s, 0) + c
        return Dim.of(coeffs)

    def __sub__(self, other: Dim) -> Dim:
        return self + Dim(tuple((s, -c) for s, c in other.terms))

    def __str__(self) -> str:
        text = "".join(("+" if c > 0 else "-") + (str(abs(c)) if abs(c) != 1 else "") + s
                       for s, c in self.terms)
        return text.lstrip("+") or "0"

    def factor(self) -> str:
        """The size as a factor of a shape: H×(H+X), not H×H+X."""
        return f"({self})" if len(self.terms) > 1 else str(self)

    def value(self, H: int, X: int, V: int) -> int:
        sizes = {"H": H, "X": X, "V": V}
        return sum(sizes[s] * c for s, c in self.terms)


H, X, V = Dim((("H", 1),)), Dim((("X", 1),)), Dim((("V", 1),))


def shape_text(shape) -> str:
    """A parameter's shape as it is printed: `H×X`, `H×(H+X)`, `H`; `?` for an unknown size."""
    return "×".join("?" if d is None else d.factor() for d in shape)


@dataclass(frozen=True)
class Param:
    name: str                  # as written, e.g. "W_f"
    shape: tuple[Dim, ...]     # (rows, cols) for a matrix, (n,) for a vector
    pos: Pos                   # first use


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


# --- showing expressions in messages -------------------------------------------------

_PREC = {"add": 1, "sub": 1, "mul": 2, "div": 2, "matmul": 4}
_SYMBOL = {"add": " + ", "sub": " − ", "mul": " ⊙ ", "div": " ⊘ ", "matmul": "·"}


def show(expr: Expr, outer: int = 0) -> str:
    """An expression in the kernel's notation, with only the parentheses it needs."""
    if isinstance(expr, Num):
        return f"{expr.value:g}"
    if isinstance(expr, Var):
        return str(expr)
    if isinstance(expr, Call):
        return f"{expr.spelled or expr.func}({show(expr.arg)})"
    if isinstance(expr, Concat):
        return "[" + "; ".join(show(p) for p in expr.parts) + "]"
    prec = 3 if isinstance(expr, Neg) else _PREC[expr.op]
    text = ("−" + show(expr.operand, 3) if isinstance(expr, Neg) else
            show(expr.left, prec) + _SYMBOL[expr.op] + show(expr.right, prec + 1))
    return f"({text})" if prec < outer else text


# --- names -------------------------------------------------------------------------------

def _vars(equations) -> list[Var]:
    return [n for eq in equations for n in walk(eq.expr) if isinstance(n, Var)]


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
    for v in _vars(cell):
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
                                  pos=_start(left))
            matrices.setdefault(left.name, left)
            left_ids.add(id(left))
    for v in _vars(equations):
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
                              pos=_start(after))


def _scalar(expr: Expr) -> str:
    """What a vector-less expression is called in a message: a reduction's value is a scalar."""
    return "scalar" if any(isinstance(n, Call) and n.func in REDUCTIONS for n in walk(expr)) else "number"


def _start(expr: Expr) -> Pos:
    while isinstance(expr, BinOp):
        expr = expr.left
    return expr.pos


def _readout(kernel: Kernel, defs, output: str, cell_params) -> tuple[Equation, dict[str, Var]]:
    eq = defs.get("y")
    if eq is None:
        p = Pos(0, 0)
        expr = BinOp("add", BinOp("matmul", Var("W_y", None, p), Var(output, 0, p), p),
                     Var("b_y", None, p), p)
        return Equation(Var("y", 0, p), expr, p), {"W_y": Var("W_y", None, p),
                                                   "b_y": Var("b_y", None, p)}
    params = {}
    for v in _vars([eq]):
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
    shapes = _Shapes(matrices, input_name, states, output)
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
    feedback = next((v for v in _vars(cell) if v.name == "y" and v.time == -1), None)
    return CheckedKernel(kernel, input_name, output, tuple(states), tuple(order), readout,
                         shapes.params(params), shapes.params(readout_vars), sizes, feedback)


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
        if any(v.time == -1 or v.name == input_name or v.name in varying for v in _vars([eq])):
            varying.add(eq.target.name)
        elif eq.target.name == output or eq.target.name in states:
            raise KernelError(f"{eq.target} depends on neither the input nor a previous state, so it "
                              "would be the same at every step", pos=eq.target.pos)


# --- order -------------------------------------------------------------------------------

def _order(cell: list[Equation], defs, source: str) -> list[Equation]:
    """Equations sorted by dependency within the step; ties keep source order."""
    index = {eq.target.name: i for i, eq in enumerate(cell)}
    deps = [{index[v.name] for v in _vars([eq]) if v.time != -1 and v.name in index}
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


# --- shapes ------------------------------------------------------------------------------

class _Shapes:
    """Union-find over size variables; a class may be bound to a Dim."""

    def __init__(self, matrices, input_name, states, output):
        self.parent: list[int] = []
        self.bound: dict[int, Dim] = {}
        self.names: dict[str, int] = {}     # vector names and vector parameters
        self.matrix: dict[str, tuple[int, int]] = {m: (self.new(), self.new()) for m in matrices}
        self.columns = {cols for _, cols in self.matrix.values()}
        self.concats: list[tuple[int, list[int], Concat]] = []
        self.constraints: list[tuple] = []   # (rank, a, b, left, right, pos): size a = size b
        self.equation = 0
        for name, dim in [(input_name, X), (output, H)] + [(s, H) for s in states]:
            self.bound[self.var(name)] = dim

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def var(self, name: str) -> int:
        if name not in self.names:
            self.names[name] = self.new()
        return self.names[name]

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def dim(self, v: int | None) -> Dim | None:
        return None if v is None else self.bound.get(self.find(v))

    def unify(self, a: int, b: int) -> bool:
        a, b = self.find(a), self.find(b)
        if a == b:
            return True
        da, db = self.bound.get(a), self.bound.get(b)
        if da is not None and db is not None and da != db:
            return False
        self.parent[b] = a
        if da is None and db is not None:
            self.bound[a] = db
        return True

    def agree(self, a, b, left: Expr, right: Expr, pos: Pos) -> None:
        if not self.unify(a, b):
            columns = " columns" if a in self.columns else ""
            raise KernelError(f"shapes do not agree: {show(left)} has {self.dim(a)}{columns} "
                              f"but {show(right)} has {self.dim(b)}", pos=pos)

    def require(self, depth: int, a: int, b: int, left: Expr, right: Expr, pos: Pos) -> None:
        self.constraints.append(((self.equation, depth), a, b, left, right, pos))

    def size(self, e: Expr, depth: int = 1) -> int | None:
        """The size variable of an expression (None for a scalar), recording constraints."""
        if isinstance(e, Num):
            return None
        if isinstance(e, Var):
            return self.var(e.name)
        if isinstance(e, Call) and e.func in REDUCTIONS:
            if self.size(e.arg, depth + 1) is None:
                raise KernelError(f"{show(e)} reduces a number; {e.spelled or e.func}(…) takes "
                                  "a vector", pos=e.pos)
            return None                 # a scalar: it broadcasts like a number
        if isinstance(e, (Neg, Call)):
            return self.size(e.operand if isinstance(e, Neg) else e.arg, depth + 1)
        if isinstance(e, Concat):
            return self._concat(e, depth)
        if e.op == "matmul":
            rows, cols = self.matrix[e.left.name]
            right = self.size(e.right, depth + 1)
            if right is None:
                raise KernelError(f"the right operand of {show(e)} must be a vector, not a "
                                  f"{_scalar(e.right)}", pos=_start(e.right))
            self.require(depth, cols, right, e.left, e.right, e.pos)
            return rows
        left, right = self.size(e.left, depth + 1), self.size(e.right, depth + 1)
        if left is None or right is None:
            return right if left is None else left
        self.require(depth, left, right, e.left, e.right, e.pos)
        return left

    def _concat(self, e: Concat, depth: int) -> int:
        parts = []
        for p in e.parts:
            v = self.size(p, depth + 1)
            if v is None:
                raise KernelError(f"cannot concatenate the {_scalar(p)} {show(p)}; "
                                  "[…] joins vectors", pos=_start(p))
            parts.append(v)
        result = self.new()
        self.concats.append((result, parts, e))
        return result

    def solve(self, order, readout, values: dict[str, Var], source_order) -> dict[str, Dim]:
        """Unify every equation, settle concatenations, and report what stays unknown."""
        self.bound[self.var("y")] = V
        for self.equation, eq in enumerate(list(order) + [readout]):
            value = self.size(eq.expr)
            if value is None:
                raise KernelError(f"{eq.target} = {show(eq.expr)} is a {_scalar(eq.expr)}; "
                                  "a step value must be a vector", pos=eq.target.pos)
            self.require(0, self.var(eq.target.name), value, eq.target, eq.expr, eq.target.pos)
        self._propagate()
        self._unknown_params(source_order, set(values))
        sizes = {}
        for name, v in values.items():
            dim = self.dim(self.var(name))
            if dim is None:
                raise KernelError(f"cannot infer the size of {v}", pos=v.pos)
            sizes[name] = dim
        return sizes

    def _propagate(self) -> None:
        """Apply constraints outward from known sizes, so a conflict shows where fronts meet.

        Each round applies the first constraint (equations in order, outer before inner)
        with both sides known, else one side known, else any.
        """
        pending = sorted(self.constraints, key=lambda c: c[0])
        while pending:
            self._settle_concats()
            known = [sum(self.dim(c[i]) is not None for i in (1, 2)) for c in pending]
            pick = known.index(max(known))
            _, a, b, left, right, pos = pending.pop(pick)
            self.agree(a, b, left, right, pos)
        self._settle_concats()

    def _settle_concats(self) -> None:
        changed = True
        while changed:
            changed = False
            for result, parts, node in self.concats:
                dims = [self.dim(p) for p in parts]
                total, known = self.dim(result), [d for d in dims if d is not None]
                if len(known) == len(dims):
                    whole = sum(known, Dim(()))
                    if total is None:
                        self.bound[self.find(result)] = whole
                        changed = True
                    elif total != whole:
                        raise KernelError(f"shapes do not agree: {show(node)} has {whole} "
                                          f"but must have {total}", pos=node.pos)
                elif total is not None and len(known) == len(dims) - 1:
                    rest = total - sum(known, Dim(()))
                    if not rest.terms or any(c < 0 for _, c in rest.terms):
                        raise KernelError(f"shapes do not agree: {show(node)} must have "
                                          f"{total}, more than its parts", pos=node.pos)
                    self.bound[self.find(parts[dims.index(None)])] = rest
                    changed = True

    def _unknown_params(self, equations, values: set[str]) -> None:
        for v in _vars(equations):
            if v.time is not None or v.name in values:
                continue
            dims = self.matrix.get(v.name, (self.names.get(v.name),))
            shown = [self.dim(d) for d in dims]
            if None in shown:
                text = shape_text(shown)
                raise KernelError(f"cannot infer the shape of {v.name}: it is {text}, and "
                                  "nothing ties the ? to H, X or V", pos=v.pos)

    def params(self, found: dict[str, Var]) -> dict[str, Param]:
        out = {}
        for name, v in found.items():
            dims = self.matrix.get(name, (self.names.get(name),))
            out[name] = Param(name, tuple(self.dim(d) for d in dims), v.pos)
        return out

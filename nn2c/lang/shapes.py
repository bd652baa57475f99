"""The sizes of a kernel's vectors and parameters, inferred by unification.

`Shapes` gives every vector, and each side of every matrix, a size variable; the
equations tie them together (union-find) and bind some to a `Dim` (a sum of H, X, V).
Constraints apply outward from the known sizes, so a conflict is reported where two
fronts meet. `nn2c.lang.check` drives it once names and order are settled.
"""

from __future__ import annotations

from dataclasses import dataclass

from nn2c.lang.ast import REDUCTIONS, Call, Concat, Expr, Neg, Num, Pos, Var, show, start, variables, walk
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
        sizes = {"H": H, "X": X, "V": V, "1": 1}
        return sum(sizes[s] * c for s, c in self.terms)


H, X, V = Dim((("H", 1),)), Dim((("X", 1),)), Dim((("V", 1),))
ONE = Dim((("1", 1),))      # one column: a score per position in a decoder kernel


def shape_text(shape) -> str:
    """A parameter's shape as it is printed: `H×X`, `H×(H+X)`, `H`; `?` for an unknown size."""
    return "×".join("?" if d is None else d.factor() for d in shape)


@dataclass(frozen=True)
class Param:
    name: str                  # as written, e.g. "W_f"
    shape: tuple[Dim, ...]     # (rows, cols) for a matrix, (n,) for a vector
    pos: Pos                   # first use


def _scalar(expr: Expr) -> str:
    """What a vector-less expression is called in a message: a reduction's value is a scalar."""
    return "scalar" if any(isinstance(n, Call) and n.func in REDUCTIONS for n in walk(expr)) else "number"


class Shapes:
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
                                  f"{_scalar(e.right)}", pos=start(e.right))
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
                                  "[…] joins vectors", pos=start(p))
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
        for v in variables(equations):
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

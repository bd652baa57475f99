"""The kernel AST: plain dataclasses, produced by `nn2c.lang.parse`, consumed by `nn2c.lang.check`.

No lark object crosses this boundary. Every node carries a `Pos` so that any later
pass can point at the source; `show` writes an expression back in the kernel's notation
for messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nn2run.ops import OPS, named

# The functions the language knows, by canonical name: the activations and the reductions
# of the operator registry. Aliases (`σ`, `where σ_g = σ`) are resolved by the parser/checker
# to one of these. A reduction (mean, sum, max) gives a scalar.
FUNCTIONS = named("activation", "reduction", "positions")
POSITIONS = named("positions")          # softmaxⱼ, Σⱼ: over a decoder's memory positions
REDUCTIONS = named("reduction")
BUILTIN_ALIASES = {spelled: name for name in FUNCTIONS for spelled in (name, *OPS[name].spellings)}
FLOAT32_MAX = 3.4028234663852886e38     # the largest number a model computes with (float32)


@dataclass(frozen=True)
class Pos:
    line: int       # 1-based
    column: int     # 1-based, in characters
    end_column: int | None = None   # exclusive; None = one character

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


@dataclass(frozen=True)
class Num:
    value: float
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Var:
    """A name with an optional time index: time 0 is `xₜ`, -1 is `hₜ₋₁`, None is no subscript.

    In a decoder kernel (one with `memory hⱼ`) `index` may be "j" (a value per position:
    `hⱼ`, `eₜⱼ`), "n" (the memory at each input's last position: `hₙ`) or "0" (a bridge
    equation's target: `s₀`)."""
    name: str
    time: int | None
    pos: Pos = field(compare=False)
    index: str | None = None

    def __str__(self) -> str:
        return (self.name + {None: "", 0: "ₜ", -1: "ₜ₋₁"}[self.time]
                + {None: "", "j": "ⱼ", "n": "ₙ", "0": "₀"}[self.index])


@dataclass(frozen=True)
class Call:
    func: str       # canonical name from FUNCTIONS (after alias resolution)
    arg: Expr
    pos: Pos = field(compare=False)
    spelled: str = field(default="", compare=False)   # as written, for messages


@dataclass(frozen=True)
class BinOp:
    op: str         # "add" | "sub" | "mul" | "div" (element-wise) | "matmul"
    left: Expr
    right: Expr
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Neg:
    operand: Expr
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Concat:
    parts: tuple[Expr, ...]
    pos: Pos = field(compare=False)


Expr = Num | Var | Call | BinOp | Neg | Concat


@dataclass(frozen=True)
class Equation:
    target: Var
    expr: Expr
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Kernel:
    """A parsed kernel file, before any checking."""
    equations: tuple[Equation, ...]
    source: str
    filename: str
    aliases: dict = field(default_factory=dict)        # spelled name -> canonical function
    declared_input: Var | None = None                   # from `input xₜ`
    declared_output: Var | None = None                  # from `output hₜ`
    memory: Var | None = None                           # from `memory hⱼ` (a decoder kernel)


def walk(expr: Expr):
    """Yield every node of an expression, parents before children."""
    yield expr
    if isinstance(expr, BinOp):
        yield from walk(expr.left)
        yield from walk(expr.right)
    elif isinstance(expr, (Call,)):
        yield from walk(expr.arg)
    elif isinstance(expr, Neg):
        yield from walk(expr.operand)
    elif isinstance(expr, Concat):
        for p in expr.parts:
            yield from walk(p)


def variables(equations) -> list[Var]:
    """Every name used on the right of the equations, in source order."""
    return [n for eq in equations for n in walk(eq.expr) if isinstance(n, Var)]


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


def start(expr: Expr) -> Pos:
    """Where an expression begins in the source: its leftmost operand."""
    while isinstance(expr, BinOp):
        expr = expr.left
    return expr.pos

"""Likely typos in a kernel, told as what was probably meant.

A time index written wrong does not fail where it is written: `h_{t-}` or `h'` reads as a
parameter, and the checker only fails later, at a name the user did not get wrong (the
matrix in front of it, or the missing input). These checks find such names first.

Only patterns that a working kernel cannot contain are reported unconditionally: a
parameter spelled as a step value's name plus a broken time index or a prime, a function
name used without its parentheses, a kernel without any time index, a step value that
uses itself. Weaker patterns (a broken time index on any name, a name glued to the input
like `Wxₜ`) only explain an error the checker has already found.
"""

from __future__ import annotations

import re

from nn2c.lang.ast import BUILTIN_ALIASES, BinOp, Kernel, Pos, Var, walk
from nn2c.lang.errors import KernelError, time_index_hint

# A split point: where a subscript starts (an ASCII `_` or a Unicode subscript character).
_SPLIT = re.compile(r"[_\u2080-\u209c]")
# A subscript that reads as a time index written wrong, once `_`, braces and spaces are
# dropped: t or T with a stray sign or digits (t-, t1, t_1, tm1, T, T-1, ₜ₁, ₜ₋), or
# a sign and 1 without the t (₋₁, -1).
_BROKEN_TIME = re.compile(r"[tTₜ][-−–—‐₋]?[\d₀-₉]*|[tT]m\d|[-−–—‐₋][1₁]")
_DASHES = "–—‐"     # dashes that look like a minus sign
_PRIMES = "'′″‴"


def written(v: Var, source: str) -> str:
    """A name as the kernel writes it (`h_{t-}`, not the normalised `h_{t-}` or `h′`)."""
    lines = source.split("\n")
    if v.pos is None or not 1 <= v.pos.line <= len(lines) or v.pos.end_column is None:
        return str(v)
    return lines[v.pos.line - 1][v.pos.column - 1:v.pos.end_column - 1]


def broken_time_tail(text: str) -> int | None:
    """Where a subscript that looks like a broken time index starts in `text`, or None."""
    for m in _SPLIT.finditer(text):
        if m.start() == 0:
            continue
        compact = re.sub(r"[_{}\s]", "", text[m.start():])
        if _BROKEN_TIME.fullmatch(compact):
            return m.start()
    return None


def _vars(kernel: Kernel) -> list[Var]:
    return [n for eq in kernel.equations for n in walk(eq.expr) if isinstance(n, Var)]


def _tail_error(v: Var, text: str, at: int, hint: str, prefix: str = "") -> KernelError:
    tail = text[at:]
    message = f"{prefix}{text} is not a time index; {hint}"
    if "T" in tail:
        message += " (the time index is a lowercase t)"
    dashes = [ch for ch in tail if ch in _DASHES]
    if dashes:
        message += f" ('{dashes[0]}', U+{ord(dashes[0]):04X}, is a dash, not a minus sign)"
    pos = Pos(v.pos.line, v.pos.column + at, v.pos.end_column)
    return KernelError(message, pos=pos)


def check_names(kernel: Kernel, defs: dict) -> None:
    """Raise `KernelError` at a name no working kernel would contain (see the module doc)."""
    every = _vars(kernel) + [eq.target for eq in kernel.equations]
    every += [d for d in (kernel.declared_input, kernel.declared_output) if d is not None]
    if all(v.time is None for v in every):
        first = kernel.equations[0].target
        raise KernelError(f"no name has a time index: write this step's values as "
                          f"{first.name}ₜ (or {first.name}_t), the previous step's as "
                          f"{first.name}ₜ₋₁ (or {first.name}_{{t-1}}) and the input as xₜ "
                          "(or x_t)", pos=first.pos)
    values = set(defs) | {v.name for v in every if v.time is not None}
    functions = set(BUILTIN_ALIASES) | set(kernel.aliases)
    for v in _vars(kernel):
        if v.time is not None or v.name in defs:
            continue
        if v.name in functions:
            raise KernelError(f"{v.name} is a function: write {v.name}(…), with its argument "
                              "in parentheses", pos=v.pos)
        # The base is looked up in the normalised name (v.name), the caret placed in the
        # name as written.
        text, at = written(v, kernel.source), broken_time_tail(v.name)
        if at is not None and v.name[:at] in values and broken_time_tail(text) is not None:
            raise _tail_error(v, text, broken_time_tail(text), time_index_hint(v.name[:at]))
        base = v.name.rstrip(_PRIMES)
        if base != v.name and base in values:
            raise KernelError(f"{text} would be a parameter, not the value {base}; "
                              f"{time_index_hint(base)}", pos=v.pos)


def no_input(kernel: Kernel, params: dict[str, Var]) -> KernelError:
    """The error for a kernel without an undefined ₜ name, at the name most likely meant."""
    for v in params.values():
        text = written(v, kernel.source)
        at = broken_time_tail(text)
        if at is not None:
            base = text[:at]
            return _tail_error(v, text, at, f"the input is written {base}ₜ or {base}_t",
                               "cannot infer the input: ")
    operands = [n.right for eq in kernel.equations for n in walk(eq.expr)
                if isinstance(n, BinOp) and n.op == "matmul"]
    for v in operands:
        if isinstance(v, Var) and v.name in params and v.time is None:
            return KernelError(f"cannot infer the input: no undefined name has a time index; "
                               f"if {v.name} is the input, write {v.name}ₜ (or {v.name}_t)",
                               pos=v.pos)
    return KernelError("cannot infer the input: every ₜ name is defined; add `input xₜ`",
                       pos=kernel.equations[0].target.pos)


def self_use(eq, source: str) -> KernelError:
    """`hₜ = … hₜ …`: the step value used in its own equation, at the use."""
    for v in walk(eq.expr):
        if isinstance(v, Var) and v.name == eq.target.name and v.time != -1:
            text, base = written(v, source), eq.target.name
            message = f"{eq.target} uses itself within the step; {time_index_hint(base)}"
            line = source.split("\n")[v.pos.line - 1]
            if v.pos.end_column and re.match(r"\s*[-−]\s*1(?!\d)", line[v.pos.end_column - 1:]):
                message += f" ({text}-1 reads as {text} − 1)"
            return KernelError(message, pos=v.pos)
    return KernelError(f"cycle: {eq.target} → {eq.target}", pos=eq.target.pos)


def glued_input(kernel: Kernel, input_var: Var) -> KernelError | None:
    """`Wxₜ` or `W_xₜ` read as the input's name, when the kernel meant W·xₜ or W_x·xₜ."""
    m = re.fullmatch(r"([A-ZΑ-Ω][\w′]*?)_?([a-zα-ω])", input_var.name)
    if kernel.declared_input is not None or m is None:
        return None
    product = f"{m.group(1) if '_' not in input_var.name else input_var.name} {m.group(2)}ₜ"
    return KernelError(f"{written(input_var, kernel.source)} is read as one name, the input; "
                       f"for a product write {product}", pos=input_var.pos)


def unknown_vector(kernel: Kernel, unknown: list[Var]) -> KernelError | None:
    """Of the parameters whose size is unknown, one with a broken time index."""
    for v in unknown:
        text = written(v, kernel.source)
        at = broken_time_tail(text)
        if at is not None:
            return _tail_error(v, text, at, time_index_hint(text[:at]))
    return None

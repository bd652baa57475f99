"""Kernel text → `nn2c.lang.ast.Kernel`: the one place lark is used.

`parse(source, filename)` checks bracket balance (for precise messages), parses with
grammar/kernel.lark (LALR, contextual lexer), and turns the tree into AST dataclasses
with one Transformer. Names are normalised here: NFC, `'` → `′`, `_{hf}` → `_hf`, and
a trailing time index (`ₜ`, `ₜ₋₁`, `_t`, `_{t}`, `_{t-1}`, `_{t−1}`) is split off into
`Var.time`. Function names are resolved to their canonical names (builtin aliases and
the kernel's own `where` aliases). Every failure is a `KernelError` with a position.
No lark object leaves this module; the runtime (nn2run) never imports it.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from nn2c.lang.ast import (
    BUILTIN_ALIASES,
    FLOAT32_MAX,
    POSITIONS,
    BinOp,
    Call,
    Concat,
    Equation,
    Kernel,
    Neg,
    Num,
    Pos,
    Var,
)
from nn2c.lang.errors import KernelError, describe_char, time_index_hint

_PARSER: Lark | None = None

_TIME_SUFFIX = re.compile(r"(ₜ₋₁|ₜ|_t|_\{\s*t\s*\}|_\{\s*t\s*[-−]\s*1\s*\})$")
_OTHER_TIME = re.compile(r"(ₜ[₊₋][₀-₉]+|_\{\s*t\s*[-−+]\s*\d+\s*\})$")
_BRACED_WORD = re.compile(r"_\{(\w+)\}")
# Position subscripts of a decoder kernel: ⱼ (U+2C7C) and ₜⱼ always; the ASCII forms
# (_j, _{j}, _tj, _{tj}) only in a kernel that declares a memory, where nothing else uses them.
_POSITION = re.compile(r"(ₜ?ⱼ)$")
_ASCII_POSITION = re.compile(r"(_\{?\s*t?\s*j\s*\}?)$")
_INITIAL = re.compile(r"(₀|_0|_\{\s*0\s*\})$")
_OPENERS, _CLOSERS = {"(": ")", "[": "]"}, {")": "(", "]": "["}
# How deep one expression may nest (a sum of n terms is n − 1 deep): every pass after the parser
# recurses once per level, and Python's stack holds a few hundred levels at most.
MAX_NESTING = 100
# How many names, numbers and operations a kernel may hold in all: the checker's shape
# inference takes time quadratic in them (~2 s at the limit; the largest sample has 379).
MAX_TERMS = 2000
MAX_SOURCE_CHARS = 1 << 18

# How the parser's expectations read to a person, in the order they are listed.
_WORDS = {"NAME": "a name", "NUMBER": "a number", "LPAR": "'('", "LSQB": "'['",
          "PLUS": "'+'", "MINUS": "'−'", "MUL": "'⊙'", "MATMUL": "'·'", "EQUAL": "'='",
          "RPAR": "')'", "RSQB": "']'", "SEMI": "';'", "COMMA": "','", "WHERE": "'where'",
          "INPUT": "'input'", "OUTPUT": "'output'", "MEMORY": "'memory'", "_NL": "end of line", "$END": "end of file"}


def grammar_path() -> Path:
    """grammar/kernel.lark: inside the package when installed, else at the repo root."""
    from nn2c.resources import resource
    return resource("grammar", "kernel.lark")


class _BracketContinuation:
    """Postlexer: a newline inside open brackets continues the equation."""
    always_accept = ("_NL",)   # so the contextual lexer hands every newline to us

    def process(self, stream):
        depth = 0
        for tok in stream:
            if tok.type in ("LPAR", "LSQB"):
                depth += 1
            elif tok.type in ("RPAR", "RSQB"):
                depth = max(depth - 1, 0)
            elif tok.type == "_NL" and depth:
                continue
            yield tok


def _parser() -> Lark:
    global _PARSER
    if _PARSER is None:
        _PARSER = Lark(grammar_path().read_text(encoding="utf-8"), parser="lalr",
                       lexer="contextual", propagate_positions=True,
                       maybe_placeholders=False, postlex=_BracketContinuation())
    return _PARSER


def parse(source: str, filename: str = "<kernel>") -> Kernel:
    """Parse kernel text into a `Kernel`; raise `KernelError` pointing at the first mistake."""
    source = source.removeprefix("\ufeff")   # a byte-order mark some editors write
    if len(source) > MAX_SOURCE_CHARS:           # parsing takes ~10 s a megabyte
        raise KernelError(f"the kernel is too large: {len(source):,} characters; a kernel is at most "
                          f"{MAX_SOURCE_CHARS:,} (the equations of one step)", filename)
    try:
        _check_brackets(source)
        try:
            tree = _parser().parse(source if source.endswith("\n") else source + "\n")
        except UnexpectedInput as e:
            raise _syntax_error(e, source) from None
        _check_size(tree)
        aliases = _aliases(tree)
        try:
            statements = _ToAst(aliases, _memory_name(tree)).transform(tree)
        except VisitError as e:
            raise e.orig_exc from None
        return _kernel(statements, source, filename, aliases)
    except KernelError as e:
        raise e.with_source(filename, source) from None


# --- names -------------------------------------------------------------------------

def normalise_name(text: str) -> str:
    """One spelling per name: NFC (ĥ = h + U+0302), ' → ′, _{hf} → _hf."""
    text = unicodedata.normalize("NFC", text).replace("'", "′")
    return _BRACED_WORD.sub(r"_\1", text)


def split_time(text: str, pos: Pos) -> tuple[str, int | None]:
    """`hₜ₋₁` → ("h", -1), `x_t` → ("x", 0), `W_f` → ("W_f", None)."""
    m = _TIME_SUFFIX.search(text)
    if m is None or m.start() == 0:
        if _OTHER_TIME.search(text):
            raise KernelError(f"unsupported time index in '{text}': only ₜ and ₜ₋₁ are "
                              "allowed", pos=pos)
        return normalise_name(text), None
    time = -1 if m.group(1).endswith(("₁", "1}", "1 }")) else 0
    return normalise_name(text[:m.start()]), time


def split_name(text: str, pos: Pos, memory: str | None = None,
               target: bool = False) -> tuple[str, int | None, str | None]:
    """A name's base, time and position index (`nn2c.lang.ast.Var`): `eₜⱼ` → ("e", 0, "j"),
    `hⱼ` → ("h", None, "j"), with memory h: `hₙ` → ("h", None, "n"); a target `s₀` →
    ("s", None, "0"). Without a memory only the Unicode ⱼ is a position subscript."""
    m = _POSITION.search(text) or (memory is not None and _ASCII_POSITION.search(text)) or None
    if m is not None and m.start() > 0:
        base = text[:m.start()]
        if _TIME_SUFFIX.search(base) or _OTHER_TIME.search(base):
            raise KernelError(f"'{text}': a value per position is this step's (eₜⱼ) or the "
                              "memory's (hⱼ); values of the previous step are kept only as states",
                              pos=pos)
        time = 0 if "t" in m.group(1) or "ₜ" in m.group(1) else None
        return normalise_name(base), time, "j"
    if memory is not None and normalise_name(text) in (memory + "ₙ", memory + "_n"):
        return memory, None, "n"
    init = _INITIAL.search(text) if memory is not None and target else None
    if init is not None and init.start() > 0:
        name, time = split_time(text[:init.start()], pos)
        if time is None:
            return name, None, "0"
    name, time = split_time(text, pos)
    return name, time, None


def _check_size(tree) -> None:
    """Refuse an expression nested deeper than MAX_NESTING, or a kernel of more than
    MAX_TERMS terms, without recursion."""
    equations = sorted(tree.find_data("equation"), key=lambda eq: (eq.meta.line, eq.meta.column))
    stack = [(eq.children[2], 1) for eq in equations]
    while stack:
        node, depth = stack.pop()
        inner = [c for c in node.children if isinstance(c, Tree)]
        if depth > MAX_NESTING and inner:      # a name or a number nests nothing
            raise KernelError(f"expression nested more than {MAX_NESTING} levels deep (a sum "
                              "nests one level a term); split it into several equations",
                              pos=Pos(node.meta.line, node.meta.column))
        stack.extend((c, depth + 1) for c in inner)
    terms = 0
    for eq in equations:
        terms += sum(1 for _ in eq.children[2].iter_subtrees())
        if terms > MAX_TERMS:
            raise KernelError(f"the kernel is too large: more than {MAX_TERMS} names, numbers and "
                              "operations by this equation; a kernel is the equations of one step",
                              pos=Pos(eq.meta.line, eq.meta.column))


def _memory_name(tree) -> str | None:
    """The base name of the memory declared by `memory hⱼ`, or None."""
    for decl in tree.find_data("memory_decl"):
        text = str(decl.children[1])
        m = _POSITION.search(text) or _ASCII_POSITION.search(text)
        return normalise_name(text[:m.start()] if m and m.start() > 0 else text)
    return None


def _pos(tok_or_meta) -> Pos:
    line, col = tok_or_meta.line, tok_or_meta.column
    end = tok_or_meta.end_column if getattr(tok_or_meta, "end_line", None) == line else None
    return Pos(line, col, end)


def _aliases(tree) -> dict[str, str]:
    """The kernel's `where` bindings, spelled → canonical; a target may be an earlier alias."""
    pending, bound = [], {}
    for a in sorted(tree.find_data("alias"), key=lambda a: (a.meta.line, a.meta.column)):
        name, target = normalise_name(a.children[0]), normalise_name(a.children[2])
        if name in bound:
            first, was = bound[name]
            if was != target:
                raise KernelError(f"{name} is bound twice: to {was} at {first}, to {target} here",
                                  pos=_pos(a.children[0]))
            continue
        bound[name] = _pos(a.children[0]), target
        pending.append((name, target, a.children[2]))
    known, out = dict(BUILTIN_ALIASES), {}
    while pending:
        progress = [p for p in pending if p[1] in known]
        if not progress:
            name, target, tok = pending[0]
            raise KernelError(f"unknown function '{target}' in where clause; known: "
                              f"{', '.join(BUILTIN_ALIASES)}", pos=_pos(tok))
        for name, target, _tok in progress:
            if BUILTIN_ALIASES.get(name, known[target]) != known[target]:
                raise KernelError(f"{name} is a built-in function ({BUILTIN_ALIASES[name]}); an "
                                  f"alias names a new one, as in `where σ_g = {target}`",
                                  pos=bound[name][0])
            known[name] = out[name] = known[target]
        pending = [p for p in pending if p[1] not in known or p[0] not in out]
    return out


# --- tree → AST ----------------------------------------------------------------------

@v_args(inline=True)
class _ToAst(Transformer):
    def __init__(self, aliases: dict[str, str], memory: str | None = None):
        super().__init__()
        self.functions = {**BUILTIN_ALIASES, **aliases}
        self.memory = memory

    def var(self, tok: Token, target: bool = False) -> Var:
        pos = _pos(tok)
        name, time, index = split_name(str(tok), pos, self.memory, target)
        return Var(name, time, pos, index)

    def num(self, tok: Token) -> Num:
        value = float(str(tok).replace("−", "-"))
        if value > FLOAT32_MAX:
            raise KernelError(f"the number {tok} is too large: the model computes in float32, "
                              "whose largest number is 3.4e38", pos=_pos(tok))
        return Num(value, _pos(tok))

    def group(self, _lpar, expr, _rpar):
        return expr

    def add(self, left, op, right):
        return BinOp("add", left, right, _pos(op))

    def sub(self, left, op, right):
        return BinOp("sub", left, right, _pos(op))

    def mul(self, left, op, right):
        return BinOp("div" if str(op) in "⊘/" else "mul", left, right, _pos(op))

    def matmul(self, left, op, right):
        # A number times a vector (2·x, 2 x) is a scalar product, not a matrix product.
        return BinOp("mul" if isinstance(left, Num) else "matmul", left, right, _pos(op))

    def juxtapose(self, left, right):
        name = left.right if isinstance(left, BinOp) and left.op == "matmul" else left
        if isinstance(name, Var) and isinstance(right, Concat) and len(right.parts) == 1 \
                and _is_time(right.parts[0]) and name.pos.line == right.pos.line \
                and name.pos.end_column == right.pos.column:
            raise KernelError(f"{name}[{_show_time(right.parts[0])}] is not a time index; "
                              f"{time_index_hint(str(name))}",
                              pos=Pos(name.pos.line, name.pos.column, right.pos.end_column))
        return BinOp("mul" if isinstance(left, Num) else "matmul", left, right, right.pos)

    def neg(self, op, operand):
        return Neg(operand, _pos(op))

    @v_args(meta=True)
    def concat(self, meta, children):
        parts = tuple(c for c in children if not isinstance(c, Token))
        return Concat(parts, _pos(meta))

    def call(self, name: Token, _lpar, arg, rpar) -> Call:
        spelled, pos = normalise_name(str(name)), _pos(name)
        if spelled not in self.functions:
            if _is_time(arg):
                raise KernelError(f"{spelled}({_show_time(arg)}) is not a time index; "
                                  f"{time_index_hint(spelled)}",
                                  pos=Pos(pos.line, pos.column, _pos(rpar).end_column))
            known = ", ".join(f for f, name in self.functions.items()   # positions: decoders only
                              if self.memory is not None or name not in POSITIONS)
            close = _close_function(spelled, self.functions)
            if close and spelled.startswith(close + "_"):
                raise KernelError(f"unknown function '{spelled}'; add `where {spelled} = "
                                  f"{close}` if it is {close} (known functions: {known})",
                                  pos=pos)
            if close:
                raise KernelError(f"unknown function '{spelled}'; did you mean '{close}'? "
                                  f"(known functions: {known})", pos=pos)
            raise KernelError(f"unknown function '{spelled}' (for a product write "
                              f"{spelled}·(…); known functions: {known})", pos=pos)
        return Call(self.functions[spelled], arg, pos, spelled)

    @v_args(meta=True)
    def equation(self, meta, children):
        target = self.var(children[0], target=True)
        return [("equation", Equation(target, children[2], _pos(meta)))]

    def where(self, *_children):
        return []   # aliases were collected before the transform

    def input_decl(self, _kw, name):
        return [("input", self.var(name))]

    def output_decl(self, _kw, name):
        return [("output", self.var(name))]

    def memory_decl(self, _kw, name):
        return [("memory", Var(self.memory, None, _pos(name), "j"))]

    def start(self, *statements):
        return [item for s in statements for item in s]


def _is_time(expr) -> bool:
    """`t`, `t-1`, `T − 1`: a time index written as an expression, as in h(t-1) or h[t-1]."""
    if isinstance(expr, BinOp) and expr.op in ("add", "sub") and isinstance(expr.right, Num):
        expr = expr.left
    return isinstance(expr, Var) and expr.name in ("t", "T") and expr.time is None


def _show_time(expr) -> str:
    if isinstance(expr, Var):
        return expr.name
    return f"{expr.left.name}{'-' if expr.op == 'sub' else '+'}{expr.right.value:g}"


def _close_function(spelled: str, functions) -> str | None:
    """The known function a misspelled name most likely means (`Tanh`, `sigma`, `tahn`)."""
    if "_" in spelled and spelled.split("_")[0] in functions:
        return spelled.split("_")[0]     # textbook notation: σ_g, φ_h without their `where`
    lower = {f.lower(): f for f in functions}
    close = difflib.get_close_matches(spelled.lower(), list(lower), n=1, cutoff=0.6)
    return lower[close[0]] if close else None


def _kernel(statements, source: str, filename: str, aliases: dict[str, str]) -> Kernel:
    equations, decl = [], {"input": None, "output": None, "memory": None}
    for kind, item in statements:
        if kind == "equation":
            equations.append(item)
        elif decl[kind] is not None:
            raise KernelError(f"{kind} declared twice (first at {decl[kind].pos})", pos=item.pos)
        else:
            decl[kind] = item
    return Kernel(tuple(equations), source, filename, aliases, decl["input"], decl["output"],
                  decl["memory"])


# --- error messages ----------------------------------------------------------------

def _check_brackets(source: str) -> None:
    """Report unbalanced brackets before lark does, with both ends in the message."""
    lines = source.split("\n")
    stack: list[tuple[str, int, int]] = []
    for i, raw in enumerate(lines):
        code = raw.split("#", 1)[0]
        _check_braces(code, i + 1)
        for j, ch in enumerate(code):
            if ch in _OPENERS:
                stack.append((ch, i + 1, j + 1))
            elif ch in _CLOSERS:
                if not stack:
                    raise KernelError(f"unmatched '{ch}'", pos=Pos(i + 1, j + 1))
                opener, line, col = stack.pop()
                if _OPENERS[opener] != ch:
                    raise KernelError(f"'{ch}' does not match '{opener}' opened at {line}:{col}",
                                      pos=Pos(i + 1, j + 1))
        if stack and not _continues(lines, i):
            opener, line, col = stack[-1]
            end = len(code.rstrip()) + 1
            raise KernelError(f"unclosed '{opener}' opened at {line}:{col}", pos=Pos(i + 1, end))


def _check_braces(code: str, line: int) -> None:
    """A subscript's braces open and close on one line: `W_{hf}`, `h_{t-1}`."""
    opened = None
    for j, ch in enumerate(code):
        if ch == "{" and opened is None:
            opened = j
        elif ch == "}" and opened is None:
            raise KernelError("unmatched '}'", pos=Pos(line, j + 1))
        elif ch == "}":
            opened = None
    if opened is not None:
        start = opened - 1 if opened and code[opened - 1] == "_" else opened
        name = re.search(r"[^\W\d_][\w′']*$", code[:start])
        base = name.group(0) if name else "h"
        raise KernelError(f"unclosed '{{' of a subscript; {time_index_hint(base)}",
                          pos=Pos(line, start + 1, opened + 2))


def _continues(lines: list[str], i: int) -> bool:
    """Whether the line after an open bracket reads as its continuation (not a new statement)."""
    for raw in lines[i + 1:]:
        code = raw.split("#", 1)[0].strip()
        if code:
            return "=" not in code and code.split()[0] not in ("where", "input", "output", "memory")
    return False


def _expected(names) -> str:
    names = set(names or ()) - {"FUNCNAME"}
    if "_NL" in names:
        names.discard("$END")   # the parser always sees a final newline
    words = [w for t, w in _WORDS.items() if t in names]
    words += sorted(n for n in names if n not in _WORDS)
    if {"PLUS", "MINUS", "MUL", "MATMUL"} <= names:
        for w in ("'+'", "'−'", "'⊙'", "'·'"):
            words.remove(w)
        words.insert(words.index("end of line") if "end of line" in words else len(words),
                     "an operator (+ − ⊙ ·)")
    return ", ".join(words)


# Characters that start no token, and what the writer probably meant by them.
_PRODUCTS = "a matrix product is written W·x, W@x or W x, an element-wise one a ⊙ b or a * b"
_MEANT = {"_": "a subscript is written W_f or W_{hf}, a time index hₜ₋₁ or h_{t-1}",
          "\\": "an equation continues on the next line inside brackets",
          **dict.fromkeys("×.∙•∗⋆⊗", _PRODUCTS),
          **dict.fromkeys(":←≔", "an equation or an alias is written with '='")}
_SUBSCRIPTS = "a time index is written hₜ₋₁ or h_{t-1}, xₜ or x_t"


def _unexpected_character(e: UnexpectedCharacters) -> KernelError:
    pos, message = Pos(e.line, e.column), f"unexpected character {describe_char(e.char)}"
    hint = _MEANT.get(e.char, _SUBSCRIPTS if "\u2080" <= e.char <= "\u209c" else None)
    if e.char in "–—‐":
        hint = f"U+{ord(e.char):04X}, a dash; a minus sign is - or −"
    if hint:
        return KernelError(f"{message} ({hint})", pos=pos)
    expected = _expected(e.allowed)
    return KernelError(f"{message}; expected one of: {expected}" if expected else message, pos=pos)


def _syntax_error(e: UnexpectedInput, source: str) -> KernelError:
    if isinstance(e, UnexpectedCharacters):
        return _unexpected_character(e)
    if isinstance(e, UnexpectedToken) and e.token.type != "$END":
        tok = e.token
        what = "end of line" if tok.type == "_NL" else f"'{tok}'"
        expected, pos = e.accepts or e.expected, Pos(tok.line, tok.column, _pos(tok).end_column)
        if tok.type == "_NL":
            pos = Pos(tok.line, tok.column)
            before = source.split("\n")[tok.line - 1][:tok.column - 1].rstrip()
            if before and before[-1] in "+-−⊙∘*·⋅@":
                what = (f"end of line after '{before[-1]}' (an equation continues on the "
                        "next line only inside brackets)")
    else:
        lines = source.rstrip("\n").split("\n")
        what, expected = "end of file", getattr(e, "expected", ())
        pos = Pos(len(lines), len(lines[-1]) + 1)
    message = f"unexpected {what}"
    if expected:
        message += f"; expected one of: {_expected(expected)}"
    return KernelError(message, pos=pos)


__all__ = ["parse", "grammar_path", "normalise_name", "split_time", "split_name"]

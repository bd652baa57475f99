"""Errors in a kernel that the user can fix: `KernelError` and its rendering.

    FILE:LINE:COL: message
        <the source line>
        <spaces>^^^

LINE and COL are 1-based; COL counts characters (code points), as `Pos` does. The
caret line is laid out in display columns: combining marks (the tilde of `c̃`) take
no room and wide characters take two, so the caret sits under what the eye sees.
Imports only the standard library and `nn2c.lang.ast`.
"""

from __future__ import annotations

import unicodedata

from nn2c.lang.ast import Pos


def display_width(text: str) -> int:
    """Columns `text` takes on a terminal: combining marks 0, wide characters 2."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


# Characters a terminal shows as nothing (or as a blank): named by code point in messages.
_INVISIBLE = ("Cf", "Cc", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Me")


def describe_char(ch: str) -> str:
    """`'$'` for a visible character; `U+200B (zero width space)` for one a terminal hides."""
    if ch != " " and unicodedata.category(ch) in _INVISIBLE:
        name = unicodedata.name(ch, "")
        return f"U+{ord(ch):04X}" + (f" ({name.lower()})" if name else "")
    return f"'{ch}'"


def time_index_hint(name: str) -> str:
    """How the two time indices are written, for the name `name`."""
    return (f"the previous step's value is {name}ₜ₋₁ or {name}_{{t-1}}, "
            f"this step's {name}ₜ or {name}_t")


class KernelError(Exception):
    """A mistake in a kernel, with where it is (pos may be None: e.g. a missing file)."""

    def __init__(self, message: str, filename: str = "<kernel>", pos: Pos | None = None,
                 source: str = ""):
        super().__init__(message)
        self.message = message
        self.filename = filename
        self.pos = pos
        self.source = source

    def __str__(self) -> str:
        if self.pos is None or self.pos.line < 1:
            return f"{self.filename}: {self.message}"
        head = f"{self.filename}:{self.pos.line}:{self.pos.column}: {self.message}"
        lines = self.source.splitlines()
        if self.pos.line > len(lines) + 1:
            return head
        text = lines[self.pos.line - 1] if self.pos.line <= len(lines) else ""
        return "\n".join([head, "    " + text.replace("\t", " "), "    " + self._caret(text)])

    def _caret(self, text: str) -> str:
        start = max(self.pos.column - 1, 0)
        end = self.pos.end_column - 1 if self.pos.end_column else start + 1
        pad = display_width(text[:start].replace("\t", " "))
        width = max(display_width(text[start:max(end, start + 1)]), 1)
        return " " * pad + "^" * width

    def with_source(self, filename: str, source: str) -> KernelError:
        """The same error, told which file it is in (for errors raised before that was known)."""
        return KernelError(self.message, filename, self.pos, source)

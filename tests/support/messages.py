"""Checks of kernel error messages: the position in the header and the caret under the source."""

from __future__ import annotations


def assert_points_at(rendered: str, line: int, col: int, under: str, width: int | None = None,
                     skip: int = 0):
    """A kernel error for k.eq: the header says LINE:COL, and the first caret sits `skip`
    characters into the first `under` of the quoted line ("" for its end); `width` carets."""
    from nn2c.lang.errors import display_width
    head, quoted, carets = rendered.split("\n")[:3]
    assert head.startswith(f"k.eq:{line}:{col}: "), head
    source_line = quoted[4:] + "\n"
    start = source_line.index(under) if under else len(source_line) - 1
    assert carets[4:].index("^") == display_width(source_line[:start + skip]), rendered
    if width is not None:
        assert carets.count("^") == width, rendered

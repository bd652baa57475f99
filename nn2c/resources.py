"""Where nn2c finds the product's top-level folders, `grammar/` and `samples/`: inside the
package in an installed wheel (pyproject.toml's force-include puts them there), at the
root of a checkout otherwise."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def resource(*parts: str) -> Path:
    """The path of grammar/… or samples/…, e.g. resource("grammar", "kernel.lark")."""
    installed = _HERE.joinpath(*parts)
    return installed if installed.exists() else _HERE.parent.joinpath(*parts)

"""Entry point of the `nn2c` console script.

`pip install nn2` installs the runtime only; the compiler's commands need the `train`
extra (lark to parse kernels, torch and rich to train). Before the command line is
imported, check that what the invoked command needs can be found, so a runtime-only
install answers `nn2c train …` with one line saying what to install, not a traceback.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec

INSTALL_HINT = 'pip install "nn2[train]"'

# What each command imports beyond the runtime's numpy and click.
NEEDS = {
    "check": ("lark",),
    "samples": ("lark",),
    "train": ("lark", "torch", "rich"),
}


def _installed(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):     # a broken or blocked package counts as absent
        return False


def missing_for(argv: list[str]) -> tuple[str | None, list[str]]:
    """The command named in `argv` (the first word that is not an option) and the
    packages it needs that cannot be found. `--help` needs nothing beyond click."""
    if "-h" in argv or "--help" in argv:
        return None, []
    command = next((a for a in argv if not a.startswith("-")), None)
    return command, [m for m in NEEDS.get(command, ()) if not _installed(m)]


def _names(modules: list[str]) -> str:
    return modules[0] if len(modules) == 1 else ", ".join(modules[:-1]) + " and " + modules[-1]


def main() -> None:
    command, missing = missing_for(sys.argv[1:])
    if missing:
        print(f"nn2c: `nn2c {command}` needs {_names(missing)}, not installed here; "
              f"install with: {INSTALL_HINT}", file=sys.stderr)
        sys.exit(1)
    try:
        from nn2c.cli import main as cli_main
    except KeyboardInterrupt:           # Ctrl-C while the command line is still being imported
        print("nn2c: interrupted", file=sys.stderr)
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()

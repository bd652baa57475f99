"""Entry point of the `nn2run` console script.

It imports the command line inside a handler, so a Ctrl-C while NumPy and click are
still being imported (the first ~0.2 s of every start) is `nn2run: interrupted` and
status 130, as it is later, and never a traceback. Imports the standard library only.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from nn2run.cli import main as cli_main
    except KeyboardInterrupt:
        print("nn2run: interrupted", file=sys.stderr)
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()

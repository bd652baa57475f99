"""nn2run: the nn2 runtime. Loads a .nnb file and runs its program with NumPy alone.

Imports NumPy and the standard library only (click for the command line), never
torch, lark, rich or nn2c: the compiler depends on the runtime, not the reverse.
"""

__version__ = "0.1.0"

from .format import NNBFormatError  # noqa: E402
from .model import Model, State, load  # noqa: E402

__all__ = ["load", "Model", "State", "NNBFormatError", "__version__"]

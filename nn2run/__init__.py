"""nn2run: the nn2 runtime. Loads a .nnb file and runs its program with NumPy alone.

Imports NumPy and the standard library only (click for the command line), never
torch, lark, rich or nn2c: the compiler depends on the runtime, not the reverse.
"""

__version__ = "0.1.0"

from . import generate, sample  # noqa: E402  (modules: nn2run.generate.generate, nn2run.sample.Sampler)
from .format import NNBFormatError  # noqa: E402
from .model import ClosedModelError, Model, State, load  # noqa: E402
from .seq2seq import Seq2SeqModel  # noqa: E402

__all__ = ["load", "Model", "Seq2SeqModel", "State", "NNBFormatError", "ClosedModelError", "generate", "sample",
           "__version__"]

"""nn2run: the nn2 runtime. Loads a .nnb file and runs its program with NumPy alone.

Imports NumPy and the standard library only (click for the command line), never
torch, lark, rich or nn2c: the compiler depends on the runtime, not the reverse.

The public names are imported when first used, so `import nn2run` is cheap and the console
script (`nn2run.launch`) can catch a Ctrl-C that comes while NumPy is still being imported.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it; nn2run.generate and nn2run.sample are modules
_FROM = {"load": "model", "Model": "model", "State": "model", "ClosedModelError": "model",
         "NNBFormatError": "format", "Seq2SeqModel": "seq2seq", "generate": None, "sample": None}

__all__ = ["load", "Model", "Seq2SeqModel", "State", "NNBFormatError", "ClosedModelError", "generate", "sample",
           "__version__"]


def __getattr__(name: str):
    if name not in _FROM:
        raise AttributeError(f"module 'nn2run' has no attribute {name!r}")
    module = importlib.import_module(f".{_FROM[name] or name}", __name__)
    value = module if _FROM[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_FROM))

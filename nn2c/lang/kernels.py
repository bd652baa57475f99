"""Finding kernels: a file path, or the name of a bundled sample (`lstm`, `gru`, …).

`load_kernel(spec)` reads and parses; `sample_names()` lists the bundled samples (and
`decoder_names()` the seq2seq decoders, `seq2seq/bahdanau`, in samples/kernels/seq2seq/) and
`description(source)` gives the one-sentence summary `nn2c samples` shows.
Samples live in samples/kernels/*.eq: inside the package when installed (the wheel
force-includes samples/ as nn2c/samples), else at the repository root.
"""

from __future__ import annotations

import re
from pathlib import Path

from nn2c.lang.ast import Kernel
from nn2c.lang.errors import KernelError
from nn2c.lang.parse import parse
from nn2run.format import MAGIC as MODEL_MAGIC


def samples_dir() -> Path:
    from nn2c.resources import resource
    return resource("samples", "kernels")


def sample_names() -> list[str]:
    """The bundled kernels by name, sorted: ['gru', 'lstm', …]."""
    folder = samples_dir()
    return sorted(p.stem for p in folder.glob("*.eq")) if folder.is_dir() else []


def decoder_names() -> list[str]:
    """The bundled seq2seq decoder kernels: ['seq2seq/bahdanau', …]."""
    folder = samples_dir() / "seq2seq"
    return sorted(f"seq2seq/{p.stem}" for p in folder.glob("*.eq")) if folder.is_dir() else []


def load_kernel(spec: str) -> Kernel:
    """Parse the kernel at path `spec`, or the bundled sample named `spec`."""
    path = Path(spec)
    if not (path.is_file() or spec.endswith(".eq")):
        if spec not in sample_names() + decoder_names():
            raise KernelError("no kernel file or sample by this name; samples: "
                              f"{', '.join(sample_names() + decoder_names())}", filename=spec)
        path = samples_dir() / f"{spec}.eq"
    if path.exists() and not path.is_file():     # a FIFO would block the read, a directory fail it
        raise KernelError("not a regular file; a kernel is a UTF-8 text file", filename=str(path))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KernelError("no such kernel file", filename=str(path)) from None
    except OSError as e:
        raise KernelError(f"cannot read it: {e.strerror}", filename=str(path)) from None
    if data.startswith(MODEL_MAGIC):
        raise KernelError(f"this is an nn2 model file (.nnb), not a kernel; `nn2run --info {path}` "
                          "shows the equations it was compiled from", filename=str(path))
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KernelError(f"not UTF-8 text (bad byte at offset {e.start}); a kernel is a UTF-8 text file",
                          filename=str(path)) from None
    return parse(source, str(path))


def description(source: str) -> str:
    """The first sentence of a kernel's leading comment block (joined across its lines), or
    the block's first line when no sentence ends in it; "" without a leading comment."""
    words = []
    for line in source.lstrip("\ufeff").splitlines():
        if not line.startswith("#"):
            break
        words.append(line.lstrip("#").strip())
    text = " ".join(w for w in words if w)
    end = re.search(r"[.!?](?=\s+[A-Z\"'(]|\s*$)", text)   # not "et al. 2014", not "gru.eq"
    return text[:end.end()] if end else (words[0] if words else "")

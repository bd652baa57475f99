"""Finding kernels: a file path, or the name of a bundled sample (`lstm`, `gru`, …).

`load_kernel(spec)` reads and parses; `sample_names()` lists the bundled samples.
Samples live in samples/kernels/*.eq: inside the package when installed (the wheel
force-includes samples/ as nn2c/samples), else at the repository root.
"""

from __future__ import annotations

from pathlib import Path

from nn2c.ast import Kernel
from nn2c.errors import KernelError
from nn2c.parse import parse


def samples_dir() -> Path:
    here = Path(__file__).resolve().parent
    installed = here / "samples" / "kernels"
    return installed if installed.is_dir() else here.parent / "samples" / "kernels"


def sample_names() -> list[str]:
    """The bundled kernels by name, sorted: ['gru', 'lstm', …]."""
    folder = samples_dir()
    return sorted(p.stem for p in folder.glob("*.eq")) if folder.is_dir() else []


def load_kernel(spec: str) -> Kernel:
    """Parse the kernel at path `spec`, or the bundled sample named `spec`."""
    path = Path(spec)
    if not (path.is_file() or spec.endswith(".eq")):
        if spec not in sample_names():
            raise KernelError(f"no kernel file or sample named '{spec}'; samples: "
                              f"{', '.join(sample_names())}", filename=spec)
        path = samples_dir() / f"{spec}.eq"
    try:
        source = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise KernelError(f"no such kernel file: {path}", filename=str(path)) from None
    except UnicodeDecodeError as e:
        raise KernelError(f"{path} is not UTF-8 text (byte {e.start})",
                          filename=str(path)) from None
    except OSError as e:
        raise KernelError(f"cannot read {path}: {e.strerror}", filename=str(path)) from None
    return parse(source, str(path))

"""The compiler pipeline, end to end: kernel -> check -> lower -> optimize -> emit -> .nnb.

    compiled = compile_kernel("lstm", hidden=128, layers=2, vocab=65)
    write_model("model.nnb", compiled, tensors, codec, provenance)
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np

import nn2run.format as fmt
from nn2c import __version__
from nn2c.compiler.emit import emit
from nn2c.compiler.ir import Network
from nn2c.compiler.lower import lower
from nn2c.compiler.optimize import PASSES, optimize
from nn2c.lang.ast import Kernel
from nn2c.lang.check import CheckedKernel, check, check_layers
from nn2c.lang.errors import KernelError
from nn2c.lang.kernels import load_kernel


@dataclass
class Compiled:
    kernel: Kernel
    checked: CheckedKernel
    network: Network          # optimized: what the trainer runs and the file holds
    program: dict             # the VM program of `network`
    params: dict              # parameter map: kernel parameter -> where it lives
    layers: int
    hidden: int
    vocab: int
    kernel_name: str


def compile_kernel(spec: str | Kernel, hidden: int, layers: int, vocab: int,
                   passes=tuple(PASSES)) -> Compiled:
    """Compile a kernel (a sample name, a path or a parsed Kernel) for the given sizes."""
    kernel = load_kernel(spec) if isinstance(spec, str) else spec
    checked = check(kernel)
    check_layers(checked, layers)
    try:
        lowered = lower(checked, hidden, vocab, layers)
    except KernelError as e:            # a constant divided by zero
        raise e.with_source(kernel.filename, kernel.source) from None
    network = optimize(lowered, passes)
    program, params = emit(network)
    name = spec if isinstance(spec, str) and "/" not in spec and not spec.endswith(".eq") else kernel.filename
    return Compiled(kernel, checked, network, program, params, layers, hidden, vocab, str(name))


def model_header(compiled: Compiled, codec, provenance: dict) -> dict:
    """The .nnb header for a compiled model (the container adds the tensor table)."""
    return {
        "nn2": {"kind": "model", "nn2c": __version__},
        "model": {"layers": compiled.layers, "hidden": compiled.hidden, "kernel": compiled.kernel_name},
        "program": compiled.program,
        "params": compiled.params,
        "codec": codec.to_header(),
        "sampling": {"temperature": 1.0},
        "source": {"name": compiled.kernel_name, "text": compiled.kernel.source},
        "provenance": {"nn2c": __version__,
                       "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       **provenance},
    }


def write_model(path, compiled: Compiled, tensors: dict[str, np.ndarray], codec,
                provenance: dict, extra_tensors=None, extra_header=None) -> None:
    """Write a runnable .nnb atomically. `extra_*` carry training state in checkpoints."""
    header = model_header(compiled, codec, provenance)
    header.update(extra_header or {})
    fmt.write(path, header, {**tensors, **(extra_tensors or {})})

"""`nn2c check`: what a kernel means, in the terms of its own equations, and what it compiles to."""

from __future__ import annotations

from nn2c.compiler.optimize import PASSES
from nn2c.compiler.pipeline import compile_kernel
from nn2c.lang.ast import show
from nn2c.lang.kernels import load_kernel
from nn2c.lang.shapes import shape_text
from nn2run.dis import disassemble

DEFAULT_HIDDEN, DEFAULT_VOCAB = 128, 65


def _shape(param, sizes) -> str:
    symbolic = shape_text(param.shape)
    concrete = "×".join(str(d.value(**sizes)) for d in param.shape)
    return f"{symbolic:<8} {concrete}"


def count(n: int, noun: str) -> str:
    """`1 equation`, `6 equations`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def describe_kernel(spec: str, hidden: int | None, vocab: int | None, layers: int = 1,
                    optimized: bool = True) -> str:
    hidden, vocab = hidden or DEFAULT_HIDDEN, vocab or DEFAULT_VOCAB
    kernel = load_kernel(spec)
    if kernel.memory is not None:
        from nn2c.compiler.report_seq2seq import describe_decoder
        return describe_decoder(spec, kernel, hidden, vocab, layers, optimized)
    full = compile_kernel(kernel, hidden, layers, vocab)
    c = full.checked
    sizes = {"H": hidden, "X": vocab, "V": vocab}
    out = [f"kernel {kernel.filename}: {count(len(c.order), 'equation')}, OK",
           f"  shapes for --hidden {hidden} --vocab {vocab} (layer 0: X = V; layers above: X = H)", "",
           f"input    {c.input}ₜ   X",
           f"output   {c.output}ₜ   H",
           "states   " + ", ".join([f"{s}ₜ₋₁ ({c.sizes[s]})" for s in c.states]
                                    + ["yₜ₋₁ (V, the previous readout; zero at first)"] * bool(c.feedback)), "",
           "parameters (each layer):"]
    out += [f"  {p.name:<8} {_shape(p, sizes)}" for p in c.params.values()]
    out += ["readout:", f"  yₜ = {show(c.readout.expr)}"]
    if full.network.readout.output.op == "logsoftmax" or any(
            cell.output.op == "logsoftmax" for cell in full.network.cells):
        out.append("  (a distribution: the logits are its log-probabilities, log_softmax of the pre-activation)")
    out += [f"  {p.name:<8} {_shape(p, sizes)}" for p in c.readout_params.values()]
    out += ["", "equations in evaluation order:"]
    out += [f"  {i + 1:2d}. {eq.target} = {show(eq.expr)}" for i, eq in enumerate(c.order)]
    plain = compile_kernel(kernel, hidden, layers, vocab, passes=())
    shown = full if optimized else plain
    label = "optimized" if optimized else "unoptimized"
    out += ["", f"program ({label}, {count(layers, 'layer')}): "
                f"{count(len(shown.program['code']), 'instruction')}; "
                f"{len(plain.program['code'])} before the passes ({', '.join(PASSES)})"]
    out.append(disassemble(shown.program))
    return "\n".join(out)

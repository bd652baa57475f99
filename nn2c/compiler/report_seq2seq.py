"""`nn2c check` of a seq2seq decoder kernel: its memory, positions, bridge and parameters,
the terms computed once per input, and the two parts of its program."""

from __future__ import annotations

from nn2c.compiler.report import _shape, count
from nn2c.compiler.seq2seq import compile_seq2seq
from nn2c.lang.ast import BinOp, Call, Concat, Expr, Kernel, Neg, Var, show
from nn2c.lang.decoder import CheckedDecoder


def once_per_input(c: CheckedDecoder) -> list[str]:
    """The largest terms of the step's equations built from the memory or hₙ and parameters
    alone (Bahdanau's U_a·hⱼ): the decoder's "prepare" computes them once per input."""
    found: list[str] = []

    def static(e: Expr) -> bool | None:
        """True: from memory/final/parameters (one of the first two at least); None: from
        parameters and numbers only; False: reads a step value."""
        if isinstance(e, Var):
            return True if e.name in (c.memory, c.final) else None if e.time is None else False
        kids = ([e.arg] if isinstance(e, Call) else [e.operand] if isinstance(e, Neg) else
                [e.left, e.right] if isinstance(e, BinOp) else list(e.parts) if isinstance(e, Concat) else [])
        flags = [static(k) for k in kids]
        if False in flags:
            for k, f in zip(kids, flags):
                if f and not isinstance(k, Var) and show(k) not in found:
                    found.append(show(k))
            return False
        return True if True in flags else None

    for eq in c.order:
        if eq.target.name in c.prepared:
            found.append(f"{eq.target} = {show(eq.expr)}")
        else:
            static(eq.expr)
    return found


def _listing(code, widths, positional) -> list[str]:
    out = []
    for ins in code:
        args = ", ".join(str(a) if not isinstance(a, list) else f"r{a[1]}" if a[0] == "r"
                         else f"[{a[1]}]" if a[0] == "t" else f"{a[1]:g}" for a in ins[2:])
        where = " per position" if ins[1] in positional else ""
        out.append(f"  {ins[0]:<9} r{ins[1]} ← {args}   ; width {widths[ins[1]]}{where}")
    return out


def describe_decoder(spec: str, kernel: Kernel, hidden: int, vocab: int, layers: int,
                     optimized: bool) -> str:
    passes = {} if optimized else {"passes": ()}
    full = compile_seq2seq("gru", kernel, hidden, layers, source_vocab=vocab, target_vocab=vocab, **passes)
    c, program = full.decoder_checked, full.programs["decoder"]
    sizes = {"H": hidden, "X": vocab, "V": vocab}
    mem = c.memory
    out = [f"decoder kernel {kernel.filename}: {count(len(c.order), 'equation')}"
           f"{', bridge for ' + ', '.join(c.bridge) if c.bridge else ''}, OK",
           f"  shapes for --hidden {hidden} --vocab {vocab} (the target vocabulary with begin and "
           "end; X = V: the previous token)", "",
           f"memory   {mem}   H at each position j (the encoder's top-layer output)",
           f"final    {c.final}   H (the encoder's output at each input's last position)",
           f"input    {c.input}ₜ   X",
           f"output   {c.output}ₜ   H",
           "states   " + ", ".join(f"{s}ₜ₋₁ ({c.sizes[s]}, " + (f"from {s}₀)" if s in c.bridge else "zero at first)")
                                   for s in c.states)]
    if c.positional:
        out.append("per position: " + ", ".join(f"{n}ₜⱼ ({c.sizes[n]})" for n in sorted(c.positional)))
    out += ["", f"parameters (layer {layers} with --layers {layers}: the encoder has layers 0..{layers - 1}):"]
    out += [f"  {p.name:<8} {_shape(p, sizes)}" for p in c.params.values()]
    out += ["readout (inside the decoder: its value is the logits):", f"  yₜ = {show(c.readout.expr)}"]
    if c.bridge:
        out.append("bridge (each state's value before the first step):")
        out += [f"  {eq.target} = {show(eq.expr)}" for eq in c.bridge.values()]
        out += [f"  {p.name:<8} {_shape(p, sizes)}" for p in c.bridge_params.values()]
    terms = once_per_input(c)
    out += ["", "computed once per input (from the memory, hₙ and parameters alone):"]
    out += [f"  {t}" for t in terms] or ["  (nothing)"]
    out += ["", "equations in evaluation order:"]
    out += [f"  {i + 1:2d}. {eq.target} = {show(eq.expr)}" for i, eq in enumerate(c.order)]
    label = "optimized" if optimized else "unoptimized"
    pos = set(program["positional"])
    out += ["", f"decoder program ({label}): memory r{program['memory']}, final r{program['final']}, "
                f"logits r{program['logits']} (width {program['registers'][program['logits']]})",
            f"prepare, once per input: {count(len(program['prepare']), 'instruction')}"]
    out += _listing(program["prepare"], program["registers"], pos)
    for s in program["states"]:
        init = f"r{s['init']}" if s["init"] is not None else "zeros"
        out.append(f"  ; state {s['name']}: prev r{s['prev']}, next r{s['next']}, init {init}")
    out.append(f"step: {count(len(program['code']), 'instruction')}")
    out += _listing(program["code"], program["registers"], pos)
    return "\n".join(out)

"""Human-readable views of a model: the disassembler (`nn2run --dis`) and `--info`."""

from __future__ import annotations

import json


def _operand(op) -> str:
    tag, val = op
    if tag == "r":
        return f"r{val}"
    if tag == "t":
        return f"[{val}]"
    return f"{val:g}"


def disassemble(program: dict, tensors: dict | None = None, bound: bool = False, result: str = "logits") -> str:
    """The program, one instruction a line: index, opcode, destination ← operands ; widths.

    bound: the program is the VM's (`Model.bound_program`), which the first line says."""
    widths = program["registers"]
    lines = [f"; {len(program['code'])} instructions, {len(widths)} registers"]
    if bound:
        lines[:0] = ["; as the VM runs it: the file's program after the load-time rewrites (nn2run/rewrite.py)",
                     "; matmul1: [x, 1] times a table whose last row is the bias; matmul2: [x, y, 1] likewise; "
                     "sigmoid½ v = ½·tanh(v) + ½"]
    for s in program["states"]:
        lines.append(f"; state {s['name']}@{s['layer']}: prev r{s['prev']}, next r{s['next']} "
                     f"(width {widths[s['prev']]})")
    lines.append(f"; input: token ids; {result}: r{program['logits']} (width {widths[program['logits']]})")
    lines.extend(_instruction(pc, ins, widths, tensors) for pc, ins in enumerate(program["code"]))
    return "\n".join(lines)


def _instruction(pc: int, ins: list, widths: list, tensors=None, positional=frozenset()) -> str:
    op, dst, args = ins[0], ins[1], ins[2:]
    if op == "slice":
        text = f"r{args[0][1]}[{args[1]}:{args[1] + widths[dst]}]"
    elif op == "gather":
        text = f"{_operand(args[0])}[ids]"
    elif op == "matmul1":
        text = f"[{_operand(args[0])}, 1], {_operand(args[1])}"
    elif op == "matmul2":
        text = f"[{_operand(args[0])}, {_operand(args[1])}, 1], {_operand(args[2])}"
    else:
        text = ", ".join(_operand(a) for a in args)
    note = ""
    if tensors is not None:
        shapes = [f"{a[1]} {tuple(tensors[a[1]].shape)}" for a in args if isinstance(a, list) and a[0] == "t"]
        note = ("  ; " + "; ".join(shapes)) if shapes else ""
    width = f"J×{widths[dst]}" if dst in positional else f"{widths[dst]}"
    return f"{pc:4d}  {op:<8} r{dst:<4} ← {text}   ({width}){note}"


def disassemble_seq2seq(model) -> str:
    """Every program of a seq2seq file: the encoder (as its VM runs it), then the decoder's
    prepare (once per input) and step code (as its machines run it, after the load-time
    rewrites); per-position registers are shown J×width."""
    dec, tensors = model.bound_decoder()
    widths, positional = dec["registers"], frozenset(dec["positional"])
    lines = ["; encoder", disassemble(*model.bound_encoder(), bound=True, result="output"),
             "; the output at every position is the memory", "",
             f"; decoder: {len(dec['prepare'])} prepare and {len(dec['code'])} step instructions, "
             f"{len(widths)} registers; J = the source length",
             f"; memory r{dec['memory']} (J×{widths[dec['memory']]}), final r{dec['final']} "
             f"(each source's last output, {widths[dec['final']]})"]
    for s in dec["states"]:
        init = "zeros" if s.get("init") is None else f"r{s['init']}"
        lines.append(f"; state {s['name']}@{s['layer']}: prev r{s['prev']}, next r{s['next']} "
                     f"(width {widths[s['prev']]}), starts at {init}")
    lines.append("; prepare")
    lines.extend(_instruction(pc, ins, widths, tensors, positional) for pc, ins in enumerate(dec["prepare"]))
    lines.append(f"; step (after the load-time rewrites: nn2run/rewrite.py): input the previous target "
                 f"token; logits r{dec['logits']} (width {widths[dec['logits']]})")
    lines.extend(_instruction(pc, ins, widths, tensors, positional) for pc, ins in enumerate(dec["code"]))
    return "\n".join(lines)


def describe_seq2seq(model) -> str:
    """`nn2run --info` of a seq2seq file."""
    h = model.header
    meta = h["model"]
    out = [f"nn2 seq2seq model: encoder {meta.get('encoder', '?')} ({model.layers} layer(s)) × {model.hidden} "
           f"hidden, decoder {meta.get('decoder', '?')}",
           f"source vocabulary {len(model.vocab)} ({model.codec.name} codec); target vocabulary "
           f"{len(model.target_codec.vocab)} + begin {model.begin} + end {model.end}",
           f"limits: sources up to {model.limits['source']} tokens, outputs up to {model.limits['target']}",
           f"file: {model.storage()}"]
    src = h.get("source") if isinstance(h.get("source"), dict) else {}
    for part in ("encoder", "decoder"):
        if isinstance(src.get(part), dict):
            out.append(f"\n{part} kernel {src[part].get('name', '?')}:")
            out.extend("    " + line for line in str(src[part].get("text", "")).rstrip().splitlines())
    out.append("\nparameters:")
    total = 0
    for slot in model.param_slots():
        arr = model.param(slot.name, slot.layer or 0)
        total += arr.size
        out.append(f"    {slot.key:<16} {'×'.join(map(str, arr.shape)):<12} in {slot.tensor}[{slot.start}:{slot.stop}]")
    out.append(f"    {total:,} weights")
    if isinstance(h.get("provenance"), dict):
        out.append("\nprovenance:")
        out.extend(f"    {k:<14} {v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}"
                   for k, v in h["provenance"].items())
    return "\n".join(out)


def describe(model) -> str:
    """`nn2run --info`: what the file holds and where it came from."""
    h = model.header
    out = [f"nn2 model: {model.layers} layer(s) × {model.hidden} hidden, "
           f"vocabulary {len(model.vocab)} ({model.codec.name} codec)",
           f"file: {model.storage()}"]
    src = h.get("source") if isinstance(h.get("source"), dict) else {}
    if src:
        out.append(f"\nkernel {src.get('name', '?')}:")
        out.extend("    " + line for line in str(src.get("text", "")).rstrip().splitlines())
    out.append("\nparameters:")
    total = 0
    for slot in model.param_slots():
        arr = model.param(slot.name, slot.layer or 0)
        total += arr.size
        out.append(f"    {slot.key:<16} {'×'.join(map(str, arr.shape)):<12} "
                   f"in {slot.tensor}[{slot.start}:{slot.stop}]")
    out.append(f"    {total:,} weights")
    if isinstance(h.get("sampling"), dict):
        out.append("\nsampling defaults: " + json.dumps(h["sampling"], ensure_ascii=False))
    if isinstance(h.get("provenance"), dict):
        out.append("\nprovenance:")
        for k, v in h["provenance"].items():
            shown = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
            out.append(f"    {k:<14} {shown}")
    return "\n".join(out)

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


def disassemble(program: dict, tensors: dict | None = None, bound: bool = False) -> str:
    """The program, one instruction a line: index, opcode, destination ← operands ; widths.

    bound: the program is the VM's (`Model.bound_program`), which the first line says."""
    widths = program["registers"]
    lines = [f"; {len(program['code'])} instructions, {len(widths)} registers"]
    if bound:
        lines[:0] = ["; as the VM runs it: the file's program after the load-time rewrites (nn2run/rewrite.py)",
                     "; matmul1: [x, 1] times a table whose last row is the bias; sigmoid½ v = ½·tanh(v) + ½"]
    for s in program["states"]:
        lines.append(f"; state {s['name']}@{s['layer']}: prev r{s['prev']}, next r{s['next']} "
                     f"(width {widths[s['prev']]})")
    lines.append(f"; input: token ids; logits: r{program['logits']} (width {widths[program['logits']]})")
    for pc, ins in enumerate(program["code"]):
        op, dst, args = ins[0], ins[1], ins[2:]
        if op == "slice":
            text = f"r{args[0][1]}[{args[1]}:{args[1] + widths[dst]}]"
        elif op == "gather":
            text = f"{_operand(args[0])}[ids]"
        elif op == "matmul1":
            text = f"[{_operand(args[0])}, 1], {_operand(args[1])}"
        else:
            text = ", ".join(_operand(a) for a in args)
        note = ""
        if tensors is not None:
            shapes = [f"{a[1]} {tuple(tensors[a[1]].shape)}" for a in args if isinstance(a, list) and a[0] == "t"]
            note = ("  ; " + "; ".join(shapes)) if shapes else ""
        lines.append(f"{pc:4d}  {op:<8} r{dst:<4} ← {text}   ({widths[dst]}){note}")
    return "\n".join(lines)


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

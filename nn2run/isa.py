"""The instruction set of the nn2 VM and the validator of programs read from a file.

A program is a register machine over float32 arrays of shape (batch, width). It is
stored in the .nnb header as JSON:

    "program": {
      "registers": [w0, w1, ...],              # width of each register
      "states": [{"name": "h", "layer": 0, "prev": r, "next": r, "width": w}, ...],
      "logits": r,                            # register holding the logits after a step
      "code": [[opcode, dst, operand, ...], ...]
    }

Operands are tagged: ["r", i] a register, ["t", name] a tensor of the file, ["k", x] a
float constant. Instructions (dst is always a register index):

    onehot  dst               dst = one-hot(ids)              width(dst) is the vocabulary size
    gather  dst  table        dst = table[ids]               table (V, width(dst)); ids is the step's input
    matmul  dst  src  weight  dst = src @ weight             src a register, weight (width(src), width(dst))
    add|sub|mul|div  dst  a  b    element-wise; a, b registers of width(dst), vectors (width(dst),)
                              or constants; a register of width 1 (a scalar) broadcasts
    neg|sigmoid|tanh|relu|exp|log|sqrt|softmax|logsoftmax|copy  dst  a    (a as above;
                              softmax and logsoftmax: a register of width(dst))
    mean|sum|max  dst  a      dst (width 1) = the mean, sum or maximum of each row of register a
    slice   dst  src  start   dst = src[:, start:start+width(dst)] — a view, costs nothing at run time
    concat  dst  a  b ...     dst = [a; b; ...] along the feature axis

Every register is written exactly once per step (state `prev` registers are written by
the VM between steps, never by code), and read only after it is written. The VM owns
these definitions; the compiler targets them. The opcodes, their operand counts and
their kinds come from the operator registry, `nn2run.ops`.

A seq2seq file's encoder is such a program with "output" (width H) in place of "logits".
Its decoder program (`validate_decoder`, run by `nn2run.decoder`) adds:

    "positional": [r, ...]   registers holding a width-wide value at each of the J source
                             positions of each row (J the source length)
    "memory": r, "final": r  filled by the runtime: the encoder's outputs (per-position) and
                             each row's last output (plain), both of width H
    "prepare": [...]         once per input: reads memory, final, tensors, constants and its
                             own registers only (no onehot/gather: no tokens yet)
    "states": [..., "init": r | null]   the state before the first step: a plain register
                             of its width written by prepare (or final), or zeros
    "code", "logits"         one step, as above; it may read what prepare wrote

    softmaxj dst a            softmax over the positions for each column, positions at or
                              beyond a row's length weigh exactly 0 (a, dst per-position)
    sumj     dst a            dst (plain) = the sum over the positions below each length

An instruction's result is per-position exactly when one of its register operands is
(except sumj); a plain register read with per-position ones broadcasts over the positions;
a reduction (sum, mean, max) of a per-position register reduces each position's row;
softmax and logsoftmax take plain registers only; concat does not mix the two.
"""

from __future__ import annotations

import math

import numpy as np

from .ops import OPS, VARIADIC

OPCODES = tuple(OPS)

MAX_REGISTERS = 4096
MAX_CODE = 65536
MAX_WIDTH = 1 << 20
MAX_STATES = 1024
MAX_TOTAL_WIDTH = 1 << 24      # bounds the VM's allocation: 64 MiB of registers per stream
FLOAT32_MAX = 3.4028234663852886e38   # a constant beyond it would be inf in the VM's float32


class ProgramError(ValueError):
    """A program that does not satisfy the rules above."""


def _int(value, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ProgramError(f"{what} must be an integer in [{lo}, {hi}], got {value!r:.40}")
    return value


def _operand(op, nregs: int, written: set, tensors: dict, what: str):
    """Check one tagged operand; return ("r", idx) / ("t", shape) / ("k", value)."""
    if not (isinstance(op, list) and len(op) == 2 and op[0] in ("r", "t", "k")):
        raise ProgramError(f"{what}: malformed operand {op!r:.60}")
    tag, val = op
    if tag == "r":
        _int(val, what + " register", 0, nregs - 1)
        if val not in written:
            raise ProgramError(f"{what}: reads register {val} before it is written")
        return tag, val
    if tag == "t":
        if not isinstance(val, str) or val not in tensors:
            raise ProgramError(f"{what}: unknown tensor {val!r:.60}")
        if tensors[val] is None:
            raise ProgramError(f"{what}: tensor {val!r:.60} holds integers; a program reads "
                               "float tensors (f32, f16 or i8)")
        return tag, tuple(tensors[val])
    if type(val) not in (int, float) or not math.isfinite(val) or abs(val) > FLOAT32_MAX:
        raise ProgramError(f"{what}: constant must be a finite float32 number (|x| ≤ 3.4e38)")
    return tag, float(val)


def program_shapes(tensors: dict) -> dict:
    """name -> shape of the tensors a program may read (their float32 values), None for the
    others (integer tensors: a checkpoint's counters and RNG states, never weights)."""
    return {name: tuple(t.shape) if t.dtype == np.float32 else None for name, t in tensors.items()}


def _check_elementwise(tag, val, width: int, regs: list, what: str) -> None:
    if tag == "r" and regs[val] != width and regs[val] != 1:
        raise ProgramError(f"{what}: register {val} has width {regs[val]}, expected {width}")
    if tag == "t" and val != (width,):
        raise ProgramError(f"{what}: tensor of shape {list(val)} is not a vector of {width}")


def _registers(program) -> list:
    if not isinstance(program, dict):
        raise ProgramError("program must be an object")
    regs = program.get("registers")
    if not isinstance(regs, list) or not 1 <= len(regs) <= MAX_REGISTERS:
        raise ProgramError(f"registers must be a list of 1..{MAX_REGISTERS} widths")
    for i, w in enumerate(regs):
        _int(w, f"width of register {i}", 1, MAX_WIDTH)
    return regs


def validate(program, tensors: dict, vocab_size: int, output: str = "logits", width: int | None = None) -> None:
    """Check a program read from a file. `tensors` maps tensor name -> shape tuple, or None
    for a tensor no program may read (`program_shapes`: an integer one).

    `output` names the key of the register the program's result is in ("logits", of width
    `vocab_size`; a seq2seq encoder's is "output", of width `width`). Raises ProgramError
    naming the first problem. Nothing is allocated here.
    """
    regs = _registers(program)
    if sum(regs) > MAX_TOTAL_WIDTH:
        raise ProgramError(f"registers total {sum(regs)} floats per stream, more than {MAX_TOTAL_WIDTH}")
    written = set()
    targets = _states(program.get("states"), regs, written)
    code = program.get("code")
    if not isinstance(code, list) or not 1 <= len(code) <= MAX_CODE:
        raise ProgramError(f"code must be a list of 1..{MAX_CODE} instructions")
    for pc, ins in enumerate(code):
        _validate_instruction(pc, ins, regs, written, tensors, vocab_size)
        if ins[0] == "slice" and ins[1] in targets:
            raise ProgramError(f"instruction {pc}: a state's next register cannot be a slice")
    missing = targets - written
    if missing:
        raise ProgramError(f"state registers {sorted(missing)} are never written")
    want = vocab_size if width is None else width
    result = _int(program.get(output), f"{output} register", 0, len(regs) - 1)
    if result not in written or regs[result] != want:
        raise ProgramError(f"{output} register must be written and have width {want}")


def _validate_instruction(pc, ins, regs, written, tensors, vocab_size, positional=frozenset(),
                          what: str = "instruction") -> None:
    what = f"{what} {pc}"
    if not isinstance(ins, list) or len(ins) < 2 or ins[0] not in OPCODES:
        raise ProgramError(f"{what}: unknown opcode or malformed instruction {ins!r:.60}")
    if OPS[ins[0]].kind == "positions" and not positional:
        raise ProgramError(f"{what}: {ins[0]} runs over a memory: only in a seq2seq decoder")
    op, dst = ins[0], _int(ins[1], what + " destination", 0, len(regs) - 1)
    if dst in written:
        raise ProgramError(f"{what}: register {dst} is written twice")
    width = regs[dst]
    args = ins[2:]
    arity = OPS[op].arity
    if arity == VARIADIC:
        arity = len(args)
        if arity < 1:
            raise ProgramError(f"{what}: {op} needs operands")
    if len(args) != arity:
        raise ProgramError(f"{what}: {op} takes {arity} operands, got {len(args)}")
    if op == "onehot":
        if width != vocab_size:
            raise ProgramError(f"{what}: onehot needs width {vocab_size}")
    elif op == "gather":
        tag, shape = _operand(args[0], len(regs), written, tensors, what)
        if tag != "t" or shape != (vocab_size, width):
            raise ProgramError(f"{what}: gather needs a ({vocab_size}, {width}) tensor")
    elif op == "matmul":
        tag, src = _operand(args[0], len(regs), written, tensors, what)
        wtag, shape = _operand(args[1], len(regs), written, tensors, what)
        if tag != "r" or wtag != "t" or shape != (regs[src], width):
            rows = "?" if tag != "r" else regs[src]
            raise ProgramError(f"{what}: matmul needs a register and a ({rows}, {width}) tensor")
    elif op == "slice":
        tag, src = _operand(args[0], len(regs), written, tensors, what)
        start = _int(args[1], what + " start", 0, MAX_WIDTH)
        if tag != "r" or start + width > regs[src]:
            raise ProgramError(f"{what}: slice [{start}, {start + width}) is outside its source")
    elif op == "concat":
        total = 0
        for a in args:
            tag, src = _operand(a, len(regs), written, tensors, what)
            if tag != "r":
                raise ProgramError(f"{what}: concat takes registers")
            total += regs[src]
        if total != width:
            raise ProgramError(f"{what}: concat of width {total} into a register of width {width}")
    elif OPS[op].kind == "reduction":
        tag, src = _operand(args[0], len(regs), written, tensors, what)
        if tag != "r" or width != 1:
            raise ProgramError(f"{what}: {op} reduces a register into a register of width 1")
    elif OPS[op].kind == "positions":
        tag, src = _operand(args[0], len(regs), written, tensors, what)
        if tag != "r" or regs[src] != width:
            raise ProgramError(f"{what}: {op} needs a register of width {width}")
    else:
        for a in args:
            tag, val = _operand(a, len(regs), written, tensors, what)
            _check_elementwise(tag, val, width, regs, what)
            if OPS[op].rowwise and (tag != "r" or regs[val] != width):
                raise ProgramError(f"{what}: {op} takes a register of width {width}")
    if positional:
        _check_positional(what, op, dst, args, positional)
    written.add(dst)


def _check_positional(what, op, dst, args, positional) -> None:
    """A per-position result exactly when a register operand is one, except
    sumj (per-position -> plain); softmaxj and sumj take a per-position operand."""
    reads = [a[1] for a in args if isinstance(a, list) and a[0] == "r"]
    per = [r in positional for r in reads]
    if op in ("softmaxj", "sumj"):
        if not per[0]:
            raise ProgramError(f"{what}: {op} needs a per-position register")
        expect = op == "softmaxj"
    elif op in ("onehot", "gather"):
        expect = False
    else:
        expect = any(per)
    if op == "concat" and any(per) and not all(per):
        raise ProgramError(f"{what}: concat of per-position and plain registers")
    if op in ("softmax", "logsoftmax") and expect:
        raise ProgramError(f"{what}: {op} of a per-position register (softmaxj is the softmax over positions)")
    if (dst in positional) != expect:
        kind = "per-position" if expect else "plain"
        raise ProgramError(f"{what}: register {dst} must be {kind} (its operands make it so)")


def validate_decoder(decoder, tensors: dict, vocab_size: int, hidden: int, source: int) -> None:
    """Check a seq2seq decoder program (see `nn2run.seq2seq`): registers, which of them are
    per-position, memory and final, prepare, states with their initial registers, one step's
    code and its logits. `source` is the longest source (limits.source): with it, the floats a
    stream needs (a per-position register holds `source` rows) are bounded before anything
    is allocated. Raises ProgramError naming the first problem."""
    regs = _registers(decoder)
    n = len(regs)
    pos = decoder.get("positional")
    if not isinstance(pos, list) or len(pos) > n or len(set(map(repr, pos))) != len(pos):
        raise ProgramError("positional must be a list of distinct register indices")
    positional = frozenset(_int(r, "positional register", 0, n - 1) for r in pos)
    # per-position registers take `source` rows each, twice over (softmaxj and sumj keep a scratch copy)
    floats = sum(w for i, w in enumerate(regs) if i not in positional) \
        + 2 * source * sum(regs[i] for i in positional)
    if floats > MAX_TOTAL_WIDTH:
        raise ProgramError(f"decoder registers total {floats} floats per stream with sources of "
                           f"{source}, more than {MAX_TOTAL_WIDTH}")
    memory = _int(decoder.get("memory"), "memory register", 0, n - 1)
    final = _int(decoder.get("final"), "final register", 0, n - 1)
    if memory not in positional or regs[memory] != hidden:
        raise ProgramError(f"memory register must be per-position and have width {hidden}")
    if final in positional or final == memory or regs[final] != hidden:
        raise ProgramError(f"final register must be plain, not the memory, and have width {hidden}")
    written = {memory, final}
    prepare = decoder.get("prepare")
    if not isinstance(prepare, list) or len(prepare) > MAX_CODE:
        raise ProgramError(f"prepare must be a list of 0..{MAX_CODE} instructions")
    for pc, ins in enumerate(prepare):
        if isinstance(ins, list) and ins and ins[0] in ("onehot", "gather"):
            raise ProgramError(f"prepare {pc}: {ins[0]} reads a step's tokens: only in code")
        _validate_instruction(pc, ins, regs, written, tensors, vocab_size, positional | {-1}, "prepare")
    prepared = set(written)
    targets = _states(decoder.get("states"), regs, written, positional, prepared)
    code = decoder.get("code")
    if not isinstance(code, list) or not 1 <= len(code) <= MAX_CODE:
        raise ProgramError(f"code must be a list of 1..{MAX_CODE} instructions")
    for pc, ins in enumerate(code):
        _validate_instruction(pc, ins, regs, written, tensors, vocab_size, positional | {-1})
        if ins[0] == "slice" and ins[1] in targets:
            raise ProgramError(f"instruction {pc}: a state's next register cannot be a slice")
    missing = targets - written
    if missing:
        raise ProgramError(f"state registers {sorted(missing)} are never written")
    logits = _int(decoder.get("logits"), "logits register", 0, n - 1)
    if logits not in written or logits in prepared or logits in positional or regs[logits] != vocab_size:
        raise ProgramError(f"logits register must be plain, written by code and have width {vocab_size}")


def _states(states, regs, written, positional=frozenset(), prepared=None) -> set:
    """Check a program's states; marks each prev register written; returns the next registers.
    A decoder's (`prepared`: the registers its prepare writes) are plain and may have an init."""
    if not isinstance(states, list) or len(states) > MAX_STATES:
        raise ProgramError("states must be a list")
    targets = set()
    for s in states:
        if not isinstance(s, dict) or not isinstance(s.get("name"), str):
            raise ProgramError("each state needs a name")
        prev = _int(s.get("prev"), "state prev", 0, len(regs) - 1)
        nxt = _int(s.get("next"), "state next", 0, len(regs) - 1)
        _int(s.get("layer"), "state layer", 0, MAX_STATES)
        if (prev in written or prev in targets or nxt in targets or nxt in written or prev == nxt
                or regs[prev] != regs[nxt] or prev in positional or nxt in positional):
            raise ProgramError(f"state {s['name']!r}: bad prev/next registers")
        init = s.get("init") if prepared is not None else None
        if init is not None:
            _int(init, f"state {s['name']!r} init", 0, len(regs) - 1)
            if init not in prepared or init in positional or regs[init] != regs[prev]:
                raise ProgramError(f"state {s['name']!r}: init register {init} must be a plain register "
                                   f"of width {regs[prev]} written by prepare")
        written.add(prev)
        targets.add(nxt)
    return targets

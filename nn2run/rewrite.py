"""Load-time rewrites: the file's program as the VM runs it.

Done once per model (not per batch size), on the validated program; the file, its
tensors and `Model.param` are untouched (a rewritten tensor is a new array with a new
name). Each rewrite removes element-wise passes over the batch:

- `fold_bias_into_gathers`: `gather d T; add e d b` is `gather e (T + b)`.
- `fold_bias_into_products`: `matmul d x W; add e d b` is `matmul1 e x [W; b]`, where
  `matmul1` multiplies `[x, 1]` (the VM keeps a column of ones after x) by W with b as
  one more row: the bias add happens inside the product.
- `fold_bias_into_sliced_producers`: `add e s b`, s a slice of what a gather or a product
  wrote (columns read by nothing else), adds b to those columns of the table (a `matmul`
  becomes a `matmul1` with a bias row of zeros elsewhere) and e becomes s.
- `halve_sigmoid_inputs`: σ(v) = ½·tanh(½v) + ½. When v is a linear function of stored
  weights (products, gathers, bias adds, slices of them, each read by nothing else),
  the ½ is folded into those weights' columns, and `sigmoid` becomes `sigmoid½`: one
  tanh and the affine step (two passes, NumPy has no fused multiply-add) instead of
  four passes.
- `concat_of_slices`: a concat of adjacent slices of one register, in order, is one
  slice of it: a view instead of a copy per part (the layer-normalized LSTM's means).
- `fuse_interpolations`: a gate's interpolation `(1 − z) ⊙ p + z ⊙ q` (a GRU's new
  state) is `p + z ⊙ (q − p)`: three passes instead of four.
- `fuse_summed_products`: `matmul p x A; matmul q y B; add e p q` (a stacked layer's
  U·hₜ₋₁ + W·xₜ, either product a `matmul1`) is `matmul2 e x y [A; B; b]`: one product of
  the register pair [x, y, 1], which the VM lays side by side in one array, instead of two
  products and the add (at batch 64, 2×256: ~10% of those products' time).
- `lay_out_tables`: last, every product's table is copied to where BLAS reads it fastest
  (`nn2run.tables.laid_out`: rows on cache lines, 4 KB strides broken), unless a rewrite
  above made it so already (`nn2run.tables.stacked`): same values, same names, 1.0-1.9×
  faster products at batch 1-16 and ~1.05-1.1× at 32-64 (2×256 and 2×512 cells, one
  thread).

`LOADTIME` holds the opcodes these rewrites add, in the registry's form (`nn2run.ops`).

Imports NumPy and the standard library only.
"""

from __future__ import annotations

import numpy as np

from .ops import Op
from .tables import laid_out, stacked

FOLD_LIMIT = 1 << 22      # bytes: bias-folded gather tables larger than this are not made
PRODUCTS = ("matmul", "matmul1", "matmul2")
HALF = "·½"               # suffix of a tensor whose columns a sigmoid's ½ was folded into


def _half_sigmoid(a, out):
    np.tanh(a, out)
    np.multiply(out, 0.5, out)
    np.add(out, 0.5, out)


LOADTIME = {
    # operands: the source register (the VM passes it with its column of ones), the (K+1, N) table
    "matmul1": Op("matmul1", 2, "product", lambda out, x1, t: [(np.matmul, (x1, t, out))]),
    "sigmoid½": Op("sigmoid½", 1, "activation", lambda out, a: [(_half_sigmoid, (a, out))]),
    # operands: the two source registers (the VM passes the array holding [x, y, 1]), the table
    "matmul2": Op("matmul2", 3, "product", lambda out, xy1, t: [(np.matmul, (xy1, t, out))]),
}


def bind(program: dict, tensors: dict, pairs: bool = True) -> tuple[dict, dict]:
    """Every rewrite, in order: returns the program and the tensors the VM binds (without
    `fuse_summed_products` when not `pairs`: a machine that lays out no register pairs)."""
    program, tensors = concat_of_slices(program, tensors)
    program, tensors = fold_bias_into_gathers(program, tensors)
    program, tensors = fold_bias_into_products(program, tensors)
    program, tensors = fold_bias_into_sliced_producers(program, tensors)
    program, tensors = halve_sigmoid_inputs(program, tensors)
    program, tensors = fuse_interpolations(program, tensors)
    if pairs:
        program, tensors = fuse_summed_products(program, tensors)
    return lay_out_tables(program, tensors)


def bind_decoder(decoder: dict, tensors: dict) -> tuple[dict, dict]:
    """A seq2seq decoder's step code after the same rewrites, applied to its plain registers
    only: each per-position register is given to them as a state (a register that must keep
    its value and its place), so no rewrite folds, halves or pads one. `prepare` is kept as
    it is (it runs once per input); a tensor it shares with the step is copied, not changed,
    when a rewrite changes the step's (every rewritten tensor has a new name)."""
    guard = [{"prev": r, "next": r} for r in decoder["positional"]]
    program, tensors = bind({**decoder, "states": decoder["states"] + guard}, tensors, pairs=False)
    return {**program, "states": decoder["states"]}, tensors


def partners(program: dict) -> dict[int, int]:
    """A state's prev register -> its next and back: the two buffers trade places each step."""
    out = {}
    for s in program["states"]:
        out[s["prev"]], out[s["next"]] = s["next"], s["prev"]
    return out


def padded_registers(program: dict) -> set:
    """Registers read by `matmul1`: the VM allocates each with a column of ones after it
    (for a state, both of its buffers, which trade places every step)."""
    padded = {ins[2][1] for ins in program["code"] if ins[0] == "matmul1"}
    other = partners(program)
    return padded | {other[r] for r in padded if r in other}


def register_pairs(program: dict) -> list[tuple[int, int]]:
    """The (x, y) register pairs a `matmul2` reads, as the VM must lay them out: x, then y,
    then a column of ones, in one array; for state registers also their partners' pair."""
    other = partners(program)
    pairs = []
    for ins in program["code"]:
        if ins[0] == "matmul2":
            x, y = ins[2][1], ins[3][1]
            pairs.append((x, y))
            if x in other:
                pairs.append((other[x], other[y]))
    return pairs


def _reads(program: dict) -> dict:
    """register -> number of reads (state next and logits registers count as read)."""
    reads: dict[int, int] = {}
    for ins in program["code"]:
        for a in ins[2:]:
            if isinstance(a, list) and a[0] == "r":
                reads[a[1]] = reads.get(a[1], 0) + 1
    for r in [s["next"] for s in program["states"]] + [program["logits"]]:
        reads[r] = reads.get(r, 0) + 1
    return reads


def _fold_adds(program, tensors, producer: str, fold):
    """`PRODUCER d …; add e d b` (d read once, b a vector) -> fold(ins, b) writing e."""
    code, reads = program["code"], _reads(program)
    made = {ins[1]: ins for ins in code if ins[0] == producer}
    out, extra, dropped = [], dict(tensors), set()
    for ins in code:
        if ins[0] == "add":
            regs = [a for a in ins[2:] if a[0] == "r" and a[1] in made and reads[a[1]] == 1]
            bias = [a for a in ins[2:] if a[0] == "t"]
            new = fold(made[regs[0][1]], bias[0][1], ins[1], extra) if regs and bias else None
            if new is not None:
                out.append(new)
                dropped.add(regs[0][1])
                continue
        out.append(ins)
    code = [ins for ins in out if not (ins[0] == producer and ins[1] in dropped)]
    return {**program, "code": code}, extra


def fold_bias_into_gathers(program: dict, tensors: dict) -> tuple[dict, dict]:
    """`gather d T; add e d b` -> `gather e (T + b)` (tables up to FOLD_LIMIT bytes)."""
    def fold(gather, bias, dst, extra):
        table = gather[2][1]
        if extra[table].nbytes > FOLD_LIMIT:
            return None
        name = f"{table}+{bias}"
        extra[name] = extra[table] + extra[bias]
        return ["gather", dst, ["t", name]]
    return _fold_adds(program, tensors, "gather", fold)


def fold_bias_into_products(program: dict, tensors: dict) -> tuple[dict, dict]:
    """`matmul d x W; add e d b` -> `matmul1 e x [W; b]` when x is a whole register
    (not a slice: the VM must be able to give it a column of ones)."""
    slices = {ins[1] for ins in program["code"] if ins[0] == "slice"}

    def fold(matmul, bias, dst, extra):
        src, weight = matmul[2], matmul[3][1]
        if src[1] in slices:
            return None
        name = f"{weight}+{bias}"
        extra[name] = stacked([extra[weight], extra[bias][None, :]])
        return ["matmul1", dst, src, ["t", name]]
    return _fold_adds(program, tensors, "matmul", fold)


def fold_bias_into_sliced_producers(program: dict, tensors: dict) -> tuple[dict, dict]:
    """`P p …; slice s p[a]; add e s b` -> P with b added to columns [a, a+width) of its
    table, and every read of e reading s (see the module's docstring)."""
    code, tensors = [list(ins) for ins in program["code"]], dict(tensors)
    pc = 0
    while pc < len(code):
        folded = _fold_one(code, pc, program, tensors)
        if folded is None:
            pc += 1
            continue
        e, s = folded         # the add is gone: its readers read the slice
        code = [[i[0], i[1]] + [["r", s] if isinstance(a, list) and a == ["r", e] else a for a in i[2:]]
                for i in code[:pc] + code[pc + 1:]]
    return {**program, "code": code}, tensors


def _fold_one(code, pc, program, tensors):
    """Fold the bias of the add at `pc` into its producer's table; (e, s) when done."""
    ins = code[pc]
    if ins[0] != "add":
        return None
    regs = [a for a in ins[2:] if a[0] == "r"]
    bias = [a for a in ins[2:] if a[0] == "t"]
    if len(regs) != 1 or len(bias) != 1:
        return None
    plan = _ScalePlan(code, program)
    if regs[0][1] not in plan.slices or ins[1] in plan.outside \
            or any(code[r][0] in ("matmul", "matmul1") for r in plan.readers.get(ins[1], [])):
        return None       # e must stay a register of its own: a state, the logits, a product's source
    found = plan.producer(regs[0][1], 0, program["registers"][ins[1]], pc)
    if found is None or not plan.closed():
        return None
    ppc, lo, hi = found
    code[ppc] = _add_to_columns(code[ppc], tensors, bias[0][1], lo, hi)
    return ins[1], regs[0][1]


def _add_to_columns(ins, tensors, bias: str, lo: int, hi: int) -> list:
    op = ins[0]
    table = ins[3][1] if op in ("matmul", "matmul1") else ins[2][1]
    if op == "gather":                  # a gather's table stays whole: take() copies a strided one
        t = np.array(tensors[table], dtype=np.float32, copy=True)
    else:                               # a product's is laid out; a matmul's gets its bias row
        bias_row = [np.zeros((1, tensors[table].shape[1]), np.float32)] if op == "matmul" else []
        t = stacked([tensors[table], *bias_row])
    t[-1 if op != "gather" else slice(None), lo:hi] += tensors[bias]
    name = f"{table}+{bias}"
    tensors[name] = t
    if op == "gather":
        return ["gather", ins[1], ["t", name]]
    return ["matmul1", ins[1], ins[2], ["t", name]]


def halve_sigmoid_inputs(program: dict, tensors: dict) -> tuple[dict, dict]:
    """`sigmoid d v` -> `sigmoid½ d v` with ½ folded into the weights v is made of."""
    code = [list(ins) for ins in program["code"]]
    tensors = dict(tensors)
    for pc, ins in enumerate(code):
        if ins[0] != "sigmoid" or ins[2][0] != "r":     # σ of a constant or a vector: as it is
            continue
        plan = _ScalePlan(code, program)
        if plan.trace(ins[2][1], 0, program["registers"][ins[2][1]], pc) and plan.closed():
            plan.apply(code, tensors)
            code[pc] = ["sigmoid½", *ins[1:]]
    return {**program, "code": code}, tensors


class _ScalePlan:
    """Which tensor columns to halve so that columns [lo, hi) of a register come out halved."""

    LINEAR = ("add", "sub", "neg")

    def __init__(self, code, program):
        self.code = code
        self.writer = {ins[1]: pc for pc, ins in enumerate(code)}
        self.readers: dict[int, list] = {}
        for pc, ins in enumerate(code):
            for a in ins[2:]:
                if isinstance(a, list) and a[0] == "r":
                    self.readers.setdefault(a[1], []).append(pc)
        self.outside = {s["next"] for s in program["states"]} | {program["logits"]}
        self.widths = program["registers"]
        self.slices = {ins[1] for ins in code if ins[0] == "slice"}
        self.cols: dict[str, tuple] = {}      # tensor -> (lo, hi) to halve
        self.visited: set[int] = set()        # instructions whose values change

    def trace(self, reg: int, lo: int, hi: int, via: int) -> bool:
        if reg in self.outside or reg not in self.writer:
            return False                      # a state or the logits must keep its value
        for pc in self.readers.get(reg, []):
            if pc != via and not self._disjoint(self.code[pc], lo, hi):
                return False
        pc = self.writer[reg]
        ins = self.code[pc]
        self.visited.add(pc)
        op, args = ins[0], ins[2:]
        if op == "slice":
            return self.trace(args[0][1], lo + args[1], hi + args[1], pc)
        if op in ("matmul", "matmul1"):
            return self._halve(args[1][1], lo, hi)
        if op == "gather":
            return self._halve(args[0][1], lo, hi)
        if op in self.LINEAR:
            ok = True
            for a in args:
                if a[0] == "r":
                    ok = ok and self.trace(a[1], lo, hi, pc)
                elif a[0] == "t":
                    ok = ok and self._halve(a[1], lo, hi)
                else:
                    return False              # a constant: ½ of it would be another constant
            return ok
        return False

    def producer(self, reg: int, lo: int, hi: int, via: int):
        """(pc, lo, hi) of the gather or product whose columns [lo, hi) a chain of slices
        ending at `reg` reads, when nothing else reads those columns; else None."""
        if reg in self.outside or reg not in self.writer:
            return None
        if any(pc != via and not self._disjoint(self.code[pc], lo, hi) for pc in self.readers.get(reg, [])):
            return None
        pc = self.writer[reg]
        ins = self.code[pc]
        self.visited.add(pc)
        if ins[0] == "slice":
            return self.producer(ins[2][1], lo + ins[3], hi + ins[3], pc)
        if ins[0] == "gather" or ins[0] == "matmul1" or ins[0] == "matmul" and ins[2][1] not in self.slices:
            self._halve(ins[3][1] if ins[0] != "gather" else ins[2][1], lo, hi)    # marks the table as changed
            return pc, lo, hi
        return None

    def _disjoint(self, ins, lo: int, hi: int) -> bool:
        """A reader of the register that sees none of the halved columns (a slice outside them)."""
        return ins[0] == "slice" and (ins[3] + self.widths[ins[1]] <= lo or ins[3] >= hi)

    def _halve(self, name: str, lo: int, hi: int) -> bool:
        if self.cols.get(name, (lo, hi)) != (lo, hi):
            return False
        self.cols[name] = (lo, hi)
        return True

    def closed(self) -> bool:
        """Every instruction reading a halved tensor is one whose value is meant to change."""
        for pc, ins in enumerate(self.code):
            if pc not in self.visited and any(a[0] == "t" and a[1] in self.cols for a in ins[2:]
                                              if isinstance(a, list)):
                return False
        return True

    def apply(self, code, tensors) -> None:
        renamed = {}
        for name, (lo, hi) in self.cols.items():
            new = name if name.endswith(HALF) else name + HALF     # else a copy made by an earlier sigmoid
            if new != name:         # a product's table is copied laid out (`laid_out`), a gather's whole
                multiplied = any(self.code[pc][0] in PRODUCTS and self.code[pc][-1] == ["t", name]
                                 for pc in self.visited)
                source = tensors[name]
                tensors[new] = stacked([source]) if multiplied else np.array(source, np.float32, copy=True)
            tensors[new][..., lo:hi] *= np.float32(0.5)
            renamed[name] = new
        for pc in self.visited:
            code[pc] = [code[pc][0], code[pc][1]] + [["t", renamed[a[1]]] if isinstance(a, list) and a[0] == "t"
                                                      and a[1] in renamed else a for a in code[pc][2:]]


def fuse_interpolations(program: dict, tensors: dict) -> tuple[dict, dict]:
    """`sub a 1 z; mul b a p; mul c z q; add e b c` (operands of mul and add in either
    order; a, b, c read once; z, p, q registers of e's width) -> `sub a q p; mul b z a;
    add e p b`, placed where the add was (every operand is written by then)."""
    code = [list(ins) for ins in program["code"]]
    reads, widths = _reads(program), program["registers"]
    writer = {ins[1]: pc for pc, ins in enumerate(code)}
    gone: set[int] = set()
    for pc, ins in enumerate(code):
        if ins[0] != "add" or not all(a[0] == "r" for a in ins[2:]):
            continue
        for b, c in ((ins[2][1], ins[3][1]), (ins[3][1], ins[2][1])):
            found = _interpolation(code, writer, reads, widths, ins[1], b, c)
            if found is not None and not {writer[r] for r in found[:3]} & gone:
                a, b, c, z, p, q = found
                gone |= {writer[a], writer[b], writer[c]}
                code[pc] = [["sub", a, ["r", q], ["r", p]], ["mul", b, ["r", z], ["r", a]],
                            ["add", ins[1], ["r", p], ["r", b]]]
                break
    out = []
    for pc, ins in enumerate(code):
        if pc not in gone:
            out.extend(ins if isinstance(ins[0], list) else [ins])
    return {**program, "code": out}, tensors


def _interpolation(code, writer, reads, widths, e, b, c):
    """(a, b, c, z, p, q) when b = (1 − z) ⊙ p and c = z ⊙ q as in `fuse_interpolations`."""
    def mul_of(r):
        ins = code[writer[r]] if r in writer and reads.get(r) == 1 else None
        if ins is None or not isinstance(ins[0], str) or ins[0] != "mul":
            return None
        if not all(x[0] == "r" and widths[x[1]] == widths[e] for x in ins[2:]):
            return None
        return ins[2][1], ins[3][1]
    mb, mc = mul_of(b), mul_of(c)
    if mb is None or mc is None or widths[b] != widths[e] or widths[c] != widths[e]:
        return None
    for a, p in (mb, mb[::-1]):
        sub = code[writer[a]] if a in writer and reads.get(a) == 1 else None
        if sub is None or not isinstance(sub[0], str) or sub[0] != "sub" or sub[2] != ["k", 1.0] \
                or sub[3][0] != "r" or widths[a] != widths[e]:
            continue
        z = sub[3][1]
        if z in mc:
            q = mc[1] if mc[0] == z else mc[0]
            return a, b, c, z, p, q
    return None


def concat_of_slices(program: dict, tensors: dict) -> tuple[dict, dict]:
    """`slice a s i; slice b s i+width(a); …; concat d a b …` -> `slice d s i` (d neither a
    state's next register nor the logits, which must be registers of their own)."""
    widths = program["registers"]
    outside = {st["next"] for st in program["states"]} | {program["logits"]}
    sliced = {ins[1]: (ins[2][1], ins[3]) for ins in program["code"] if ins[0] == "slice"}
    code = []
    for ins in program["code"]:
        parts = [a[1] for a in ins[2:]] if ins[0] == "concat" and len(ins) > 3 else []
        if parts and ins[1] not in outside and all(p in sliced for p in parts):
            src, start = sliced[parts[0]]
            at = start
            for p in parts:
                if sliced[p] != (src, at):
                    break
                at += widths[p]
            else:
                code.append(["slice", ins[1], ["r", src], start])
                continue
        code.append(ins)
    return {**program, "code": code}, tensors


def fuse_summed_products(program: dict, tensors: dict) -> tuple[dict, dict]:
    """`matmul p x A; matmul q y B; add e p q` (p, q read once; either or both a `matmul1`)
    -> `matmul2 e x y [A; B; b]`, b their bias rows summed (zeros if neither had one).
    The VM places x, y and a column of ones side by side in one array in both of a step's
    bindings (`register_pairs`), so: x and y are whole registers, both states or neither,
    in no other pair, and no other `matmul1` reads x (y's column of ones is the pair's)."""
    code, reads, widths = [list(ins) for ins in program["code"]], _reads(program), program["registers"]
    writer = {ins[1]: pc for pc, ins in enumerate(code)}
    other, tensors = partners(program), dict(tensors)
    slices = {ins[1] for ins in code if ins[0] == "slice"}
    taken: set[int] = set()
    gone: set[int] = set()
    for pc, ins in enumerate(code):
        for (x, xt, xb), (y, yt, yb) in _summed_products(code, writer, reads, ins):
            pair = {x, y} | {other[r] for r in (x, y) if r in other}
            if len(pair) != (4 if x in other else 2) or {x, y} & slices \
                    or (x in other) != (y in other) or pair & taken \
                    or _rewritten_between(code, {x, y}, min(writer[ins[2][1]], writer[ins[3][1]]), pc) \
                    or any(c[0] == "matmul1" and c[2][1] in (x, other.get(x)) for i, c in enumerate(code)
                           if i not in gone and i not in (writer[ins[2][1]], writer[ins[3][1]])):
                continue
            name = f"[{xt}; {yt}]"
            bias = sum((tensors[t][-1] for t, has in ((xt, xb), (yt, yb)) if has), np.zeros(widths[ins[1]]))
            tensors[name] = stacked([tensors[xt][:widths[x]], tensors[yt][:widths[y]],
                                    np.asarray(bias, np.float32)[None, :]])
            gone |= {writer[ins[2][1]], writer[ins[3][1]]}
            code[pc] = ["matmul2", ins[1], ["r", x], ["r", y], ["t", name]]
            taken |= pair
            break
    return {**program, "code": [c for i, c in enumerate(code) if i not in gone]}, tensors


def _summed_products(code, writer, reads, ins) -> list:
    """The two orders (x first, then y) in which `add e p q` of two products could be one
    product: [((x, table, whether it has a bias row), (y, …)), …]."""
    if ins[0] != "add" or not all(a[0] == "r" for a in ins[2:]):
        return []
    sides = []
    for r in (ins[2][1], ins[3][1]):
        made = code[writer[r]] if r in writer and reads.get(r) == 1 else None
        if made is None or made[0] not in ("matmul", "matmul1"):
            return []
        sides.append((made[2][1], made[3][1], made[0] == "matmul1"))
    if sides[0][0] == sides[1][0]:
        return []
    return [sides, sides[::-1]]


def _rewritten_between(code, regs: set, lo: int, hi: int) -> bool:
    """Whether an instruction in (lo, hi) writes one of regs (the pair must hold at hi what
    the products read at lo)."""
    return any(code[pc][1] in regs for pc in range(lo + 1, hi))


def lay_out_tables(program: dict, tensors: dict) -> tuple[dict, dict]:
    """Every table a product reads, `laid_out` (same name, same values)."""
    names = {ins[-1][1] for ins in program["code"] if ins[0] in PRODUCTS and ins[-1][0] == "t"}
    return program, {**tensors, **{name: laid_out(tensors[name]) for name in names}}

"""The operators: one registry that the whole project is built from.

Each operator has a name (its opcode in a program and its op in the compiler's IR), an
arity, a kind, its NumPy implementation and what its derivative reads:

    kind          elementwise   add sub mul div neg: one value per column; a scalar (a constant,
                                or a register of width 1 such as a reduction's) broadcasts
                  activation    a function of the kernel language, applied to one vector
                  reduction     mean sum max: a function of the kernel language, one vector's
                                elements -> a scalar (a register of width 1)
                  product       matmul: a vector times a stored matrix
                  structural    onehot gather slice concat copy: moves values, computes none
                  positions     softmaxj sumj: over the positions j of a per-position value
                                (a seq2seq decoder's memory), shape (J, batch, width)
    needs         "input"       the derivative reads the operator's operand(s) (log, mul, div, matmul)
                  "output"      it reads the operator's result (sigmoid, tanh, relu, exp, sqrt,
                                softmax, logsoftmax)
                  "both"        it reads both (max: the gradient goes to the maximal elements)
                  "nothing"     it reads neither (add, sub, neg, sum, mean, the structural operators)
    rowwise       the result at one column depends on the whole row (softmax, logsoftmax, the
                  reductions)

The positions operators read one more operand than the program writes: the length mask,
an array of shape (J, batch, 1) holding 1.0 at the positions below each row's length and
0.0 beyond it. The VM binds it as the last operand (`numpy(out, a, mask)`); the program's
instruction is `softmaxj dst a` or `sumj dst a`.

The NumPy implementation is a *binder*: `numpy(out, *operands)` returns the calls — (function,
arguments) pairs — that compute the operator into `out` in place, so the VM binds each
instruction once per batch size and a step allocates nothing. `onehot` and `gather` read
the step's token ids, which the VM passes as their first operand; `slice` has no
implementation (the VM makes it a view).

The parser's function table, the compiler's IR, the program validator (`nn2run.isa`), the VM
and the trainer's renderers are built from this table or checked against it when they are
imported (`check_table`), so a backend that lacks an operator says so here, in one place.
Adding an element-wise operator is one entry below plus one line in each renderer's table.

Imports NumPy and the standard library only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

VARIADIC = -1


@dataclass(frozen=True)
class Op:
    name: str
    arity: int                  # operands in a program (VARIADIC: one or more)
    kind: str                   # "elementwise" | "activation" | "reduction" | "positions" | "product" | "structural"
    numpy: Callable | None      # binder: numpy(out, *operands) -> [(function, arguments), ...]
    needs: str = "nothing"      # what the derivative reads: "input" | "output" | "both" | "nothing"
    rowwise: bool = False
    spellings: tuple = ()       # other names the kernel language accepts for an activation


def _call(fn):
    """The binder of a NumPy ufunc-like `fn(*operands, out)`."""
    return lambda out, *args: [(fn, (*args, out))]


def _sigmoid(a, out):
    # σ(x) = ½·tanh(½x) + ½ : no overflow warnings, four in-place ufunc calls
    np.multiply(a, 0.5, out)
    np.tanh(out, out)
    np.multiply(out, 0.5, out)
    np.add(out, 0.5, out)


# A register of width 1 (a scalar per row) read by a wider operation is first copied across
# the row with np.copyto: a ufunc broadcasting it would allocate an iteration buffer per call.

def _binary(fn):
    """The binder of an element-wise ufunc `fn(a, b, out)`; a scalar column is spread into
    `out` first, and `fn` then reads `out` in its place (the same column, so in place is safe)."""
    def bind(out, a, b):
        if out.ndim >= 2 and out.shape[-1] > 1:    # (batch, n) or groups (nn2run.groups)
            if _column(a):
                return [(np.copyto, (out, a)), (fn, (out, b, out))]
            if _column(b):
                return [(np.copyto, (out, b)), (fn, (a, out, out))]
        return [(fn, (a, b, out))]
    return bind


def _column(x) -> bool:
    return isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[1] == 1


def _softmax(a, out, tmp, row):
    np.maximum.reduce(a, 1, None, row, True)
    np.copyto(out, row)
    np.subtract(a, out, out)
    np.exp(out, out)
    np.add.reduce(out, 1, None, row, True)
    np.copyto(tmp, row)
    np.divide(out, tmp, out)


def _log_softmax(a, out, tmp, row):
    np.maximum.reduce(a, 1, None, row, True)
    np.copyto(out, row)
    np.subtract(a, out, out)
    np.exp(out, tmp)
    np.add.reduce(tmp, 1, None, row, True)
    np.log(row, row)
    np.copyto(tmp, row)
    np.subtract(out, tmp, out)


def _rowwise(fn):
    """The binder of softmax or log_softmax: a (batch, width) and a (batch, 1) scratch array."""
    return lambda out, a: [(fn, (a, out, np.zeros_like(out), np.zeros((out.shape[0], 1), np.float32)))]


def _reduce(ufunc):
    """The binder of a reduction of each row into a (batch, 1) register, by `ufunc.reduce`."""
    return lambda out, a: [(ufunc.reduce, (a, 1, None, out, True))]


def _bind_mean(out, a):
    return [(np.add.reduce, (a, 1, None, out, True)), (np.multiply, (out, np.float32(1.0 / a.shape[1]), out))]


def _bind_onehot(out, ids):
    rows = np.arange(out.shape[0])
    return [(out.fill, (0.0,)), (out.__setitem__, ((rows, ids), 1.0))]


def _bind_gather(out, ids, table):
    # ids are validated by every public entry point before they reach the VM; the table's
    # own method: np.take's Python wrapper costs ~1 µs a call, a batch-1 step is ~100 µs
    return [(table.take, (ids, 0, out, "clip"))]


# Added to a masked position's score before the softmax over positions: exp of it is 0.
_MASKED = np.float32(-1e30)


def _softmaxj(a, mask, out, bias, col):
    np.subtract(mask, 1.0, bias)
    np.multiply(bias, -_MASKED, bias)
    np.add(a, bias, out)
    np.maximum.reduce(out, 0, None, col, True)
    np.subtract(out, col, out)
    np.exp(out, out)
    np.multiply(out, mask, out)             # exactly 0 beyond the length
    np.add.reduce(out, 0, None, col, True)
    np.maximum(col, np.finfo(out.dtype).tiny, out=col)   # a row of length 0: zeros, not nan
    np.divide(out, col, out)


def _bind_softmaxj(out, a, mask):
    """softmax over the positions (axis 0) for each column; masked positions weigh 0."""
    bias = np.zeros(mask.shape, out.dtype)
    col = np.zeros((1, *out.shape[1:]), out.dtype)
    return [(_softmaxj, (a, mask, out, bias, col))]


def _bind_sumj(out, a, mask):
    """out (batch, width) = the sum over the positions below each row's length of a."""
    tmp = np.zeros(a.shape, out.dtype)
    return [(np.multiply, (a, mask, tmp)), (np.add.reduce, (tmp, 0, None, out, False))]


def _bind_concat(out, *parts):
    calls, at = [], 0
    for p in parts:
        calls.append((np.copyto, (out[:, at:at + p.shape[1]], p)))
        at += p.shape[1]
    return calls


_OPS = (
    Op("add", 2, "elementwise", _binary(np.add)),
    Op("sub", 2, "elementwise", _binary(np.subtract)),
    Op("mul", 2, "elementwise", _binary(np.multiply), needs="input"),
    Op("div", 2, "elementwise", _binary(np.divide), needs="input"),
    Op("neg", 1, "elementwise", _call(np.negative)),
    Op("sigmoid", 1, "activation", _call(_sigmoid), needs="output", spellings=("σ",)),
    Op("tanh", 1, "activation", _call(np.tanh), needs="output"),
    Op("relu", 1, "activation", lambda out, a: [(partial(np.maximum, out=out), (a, 0.0))], needs="output"),
    Op("softmax", 1, "activation", _rowwise(_softmax), needs="output", rowwise=True),
    Op("exp", 1, "activation", _call(np.exp), needs="output"),
    Op("log", 1, "activation", _call(np.log), needs="input", spellings=("ln",)),
    Op("sqrt", 1, "activation", _call(np.sqrt), needs="output"),
    Op("logsoftmax", 1, "activation", _rowwise(_log_softmax), needs="output", rowwise=True,
       spellings=("log_softmax",)),
    Op("mean", 1, "reduction", _bind_mean, rowwise=True),
    Op("sum", 1, "reduction", _reduce(np.add), rowwise=True),
    Op("max", 1, "reduction", _reduce(np.maximum), needs="both", rowwise=True),
    Op("softmaxj", 1, "positions", _bind_softmaxj, needs="output", rowwise=True,
       spellings=("softmaxⱼ", "softmax_j")),
    Op("sumj", 1, "positions", _bind_sumj, spellings=("Σⱼ", "sum_j", "sumⱼ")),
    Op("matmul", 2, "product", _call(np.matmul), needs="input"),
    Op("onehot", 0, "structural", _bind_onehot),
    Op("gather", 1, "structural", _bind_gather),
    Op("slice", 2, "structural", None),             # operands: the source register, the start column
    Op("concat", VARIADIC, "structural", _bind_concat),
    Op("copy", 1, "structural", lambda out, a: [(np.copyto, (out, a))]),
)
OPS: dict[str, Op] = {op.name: op for op in _OPS}


def named(*kinds: str) -> tuple[str, ...]:
    """The names of the operators of these kinds, in registry order."""
    return tuple(op.name for op in _OPS if op.kind in kinds)


# The operators computed one column at a time from columns of their operands: what an
# element-wise renderer (the trainer's C loop) writes, less the row-wise ones.
POINTWISE = tuple(op.name for op in _OPS if op.kind in ("elementwise", "activation") and not op.rowwise)
REDUCTIONS = named("reduction")
ROWWISE = tuple(op.name for op in _OPS if op.kind == "activation" and op.rowwise)     # softmax, logsoftmax


def check_table(owner: str, table, needed, unsupported=()) -> None:
    """At import time: `table` (a renderer's operator table) must cover each of `needed`
    that is not declared in `unsupported`, and name only operators of the registry."""
    unknown = sorted(set(table) - set(OPS))
    missing = [name for name in needed if name not in table and name not in unsupported]
    if unknown or missing:
        raise ImportError(f"{owner}: operator table out of step with nn2run.ops"
                          + (f"; missing {', '.join(missing)}" if missing else "")
                          + (f"; unknown {', '.join(unknown)}" if unknown else ""))

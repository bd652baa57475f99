"""Grouped registers: a register read in groups of columns, stored one group after another.

A cell's gate register (an LSTM's 4H pre-activations, a GRU's 3H) is read in slices of H
columns, one per gate. Stored as a (batch, 4H) array, every slice is a strided view, and
NumPy runs an element-wise pass over a strided view one row at a time: at batch 64, H = 256
a multiply of two gate slices takes ~8 µs against ~3 µs on contiguous arrays, and the
sigmoid of three gates ~65 µs against ~27 µs. Stored as a (4, batch, H) array, each gate is
a contiguous (batch, H) array and a slice of several gates a contiguous (k, batch, H) one;
the product that writes the register is one stacked matmul over views of its table's
column groups (NumPy calls BLAS once a group, from C).

`grouped_registers` chooses the registers and their group width from the program alone;
the VM (`nn2run.vm`) allocates them as (groups, batch, width) arrays, makes a slice of one
a group (or a run of groups) of it, binds a product into one as a stacked matmul, and hands
an element-wise instruction that reads or writes one every operand as a (groups, batch,
width) view (`grouped_view`: a (batch, n) register by strides, a row of weights by reshape).

A register stays a (batch, width) array when something other than an element-wise pass or
a slice on group boundaries reads it (a product's input, a row-wise function, a state, the
logits), when something other than a product, an element-wise pass or a slice writes it, or
when its group would be narrower than MIN_GROUP columns or off a 16-column (cache line)
boundary.

Imports NumPy and the standard library only.
"""

from __future__ import annotations

from math import gcd

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .ops import POINTWISE
from .rewrite import LOADTIME, PRODUCTS, padded_registers, register_pairs

MIN_GROUP = 64          # columns: narrower groups make a product many small BLAS calls
ALIGN = 16              # columns: a group starts on a cache line of a laid-out table
ELEMENTWISE = frozenset(POINTWISE) | {name for name, op in LOADTIME.items() if op.kind == "activation"}


def grouped_registers(program: dict, flat=()) -> dict[int, int]:
    """register -> its group width, for the registers the VM stores grouped; those in
    `flat` (and what they force) stay (batch, width) arrays."""
    code, widths = program["code"], program["registers"]
    root = list(range(len(widths)))

    def find(r: int) -> int:
        while root[r] != r:
            root[r] = root[root[r]]
            r = root[r]
        return r

    flat = {program["logits"], *padded_registers(program), *flat}
    flat |= {r for s in program["states"] for r in (s["prev"], s["next"])}
    flat |= {r for pair in register_pairs(program) for r in pair}
    slices = []
    for ins in code:
        op, dst, args = ins[0], ins[1], ins[2:]
        regs = [a[1] for a in args if isinstance(a, list) and a[0] == "r"]
        if op == "slice":
            slices.append((regs[0], dst, args[1]))
            root[find(dst)] = find(regs[0])
        elif op in ELEMENTWISE:
            for r in regs:
                if widths[r] == widths[dst]:        # not a scalar column, which broadcasts
                    root[find(r)] = find(dst)
        elif op in PRODUCTS:
            flat.update(regs)
        else:
            flat.update(regs + [dst])

    group: dict[int, int] = {}                      # component -> gcd of its widths and slice starts
    for r, w in enumerate(widths):
        group[find(r)] = gcd(group.get(find(r), 0), w)
    for src, _, start in slices:
        group[find(src)] = gcd(group[find(src)], start)

    changed = True                      # a slice of several groups is a view of its source's
    while changed:                      # storage: both are grouped or neither is
        changed = False
        for src, dst, _ in slices:
            if widths[dst] > group[find(src)] and (src in flat) != (dst in flat):
                flat |= {src, dst}
                changed = True
    return {r: group[find(r)] for r, w in enumerate(widths)
            if r not in flat and w > group[find(r)] >= MIN_GROUP and group[find(r)] % ALIGN == 0}


def grouped_view(a, width: int):
    """An operand of an element-wise pass over (groups, batch, width) arrays: a grouped
    register or a scalar as it is, a (batch, n) array as a (n // width, batch, width) view
    by strides, a row of weights (n,) or (1, n) as (n // width, 1, width); a (batch, 1)
    column as it is (it broadcasts)."""
    if not isinstance(a, np.ndarray) or a.ndim == 3 or a.shape[-1] == 1:
        return a
    rows = a if a.ndim == 2 else a[None]
    (b, n), (row, col) = rows.shape, rows.strides
    return as_strided(rows, (n // width, b, width), (width * col, row, col))

"""Weight tables laid out for BLAS: rows on cache lines, 4 KB strides broken.

A product's table (K, N) float32 is held as a view of a buffer that starts on a 64-byte
cache line, with a row stride of N + 16 floats when N is a multiple of 16 (one line of
padding, never read) and N otherwise. Rows 4 or 8 KB apart (1024 or 2048 columns) fall in
the same few cache sets, so a column block of hundreds of rows evicts itself as it is read
(`nn2run.vm`'s column blocks, and the gemv at batch 1); a table off a cache line slows
OpenBLAS's small-matrix kernel. `laid_out` copies a table so; `stacked` makes a new one
from row blocks directly, so that a load-time rewrite that builds a product's table
(`nn2run.rewrite`) copies it once.

Imports NumPy only.
"""

from __future__ import annotations

import numpy as np

LINE = 64                 # bytes: a cache line


def laid_out(table: np.ndarray) -> np.ndarray:
    """`table` (K, N) float32 laid out (see above); a table laid out so already is
    returned as is."""
    k, n = table.shape
    if table.dtype == np.float32 and table.ctypes.data % LINE == 0 and table.strides == (4 * _stride(n), 4):
        return table
    return stacked([table])


def _stride(n: int) -> int:
    return n + 16 if n % 16 == 0 else n


def stacked(parts: list) -> np.ndarray:
    """A new laid-out float32 table whose rows are the rows of `parts` (2-D arrays of one
    width) in order."""
    k, n = sum(p.shape[0] for p in parts), parts[0].shape[1]
    buf = np.empty(k * _stride(n) + LINE // 4, dtype=np.float32)
    start = (-buf.ctypes.data % LINE) // 4
    out = buf[start:start + k * _stride(n)].reshape(k, _stride(n))
    out[:, n:] = 0.0                       # the padding line, never read
    out, row = out[:, :n], 0
    for p in parts:
        out[row:row + p.shape[0]] = p
        row += p.shape[0]
    return out

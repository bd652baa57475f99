"""The native loop: a cell's time step with its element-wise work as generated C.

The fused loop (`nn2c.backend.fused`) runs one torch op per IR node per step; at training sizes
(batch 32, hidden 256) the products are fast and the dozen small element-wise ops around
them, each a pass over memory plus dispatch, cost as much again. Here the step is cut
into the products, which stay torch calls, and the runs of element-wise nodes between
them, each one C function over the batch's rows; the backward (`nn2c.compiler.backward`) is
rendered the same way, group by group in reverse, and every weight gradient is one
product over all steps after the loop.

    plan.py      the Backward -> a Plan (frozen dataclasses: schedule, buffers, gradient
                 slots, which writes assign and which add, what must be zeroed)
    render.py    the Plan -> C (an operator -> C expression table, one loop per group)
    prelude.c    the fixed part of the C: branch-free exp, sigmoid and tanh
    build.py     compiling (`$CC`, default `cc`) and caching (`$NN2_CACHE`) the C
    driver.py    the Plan -> the Python that allocates the buffers and calls the C and the products
    low.py       with bf16 products: the bf16 copies of the products' operands and results,
                 rounded and widened by the C inside the loop (no torch cast per step)

Float32 tensors on the CPU only (with precision bf16 the products take bf16 operands, see
`nn2c.backend.precision`; every value the element-wise work reads or writes stays float32);
`NN2_NATIVE=0` turns it off. What the plan does not support
(a product of a product, a root that is a product or a slice) or the absence of a
compiler leaves the fused loop in charge.
"""

from __future__ import annotations

import os

import torch

from nn2c.backend.native.build import cache_dir
from nn2c.backend.native.driver import NativeLoop
from nn2c.backend.native.plan import NativeUnavailable, unsupported
from nn2c.compiler.backward import derive
from nn2c.compiler.ir import Cell

__all__ = ["NativeLoop", "NativeUnavailable", "cache_dir", "enabled", "supported", "unavailable", "usable"]


def enabled() -> bool:
    return os.environ.get("NN2_NATIVE", "1").strip().lower() not in ("0", "no", "off", "false")


def supported(cell: Cell) -> str | None:
    """None when the native loop can run this cell, else why not."""
    return unsupported(derive(cell))


def unavailable(cell: Cell) -> str | None:
    """None when the native loop may run this cell here, else why not."""
    return "turned off by NN2_NATIVE" if not enabled() else supported(cell)


def usable(tensors, low: bool = False) -> bool:
    """The native loop runs on CPU float32 tensors only (with bf16 products, `low`, an
    external sequence may be bf16 too)."""
    dtypes = (torch.float32, torch.bfloat16) if low else (torch.float32,)
    return all(t.device.type == "cpu" and t.dtype in dtypes for t in tensors)

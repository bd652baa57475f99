"""What the products compute in: `fp32`, or `bf16` — the products' operands rounded to
bfloat16 (8 bits of mantissa), each product accumulated in float32 by the library's
kernel (oneDNN on the CPU, cuBLAS on a GPU) and its result brought back to float32. The
weights (Adam's master copy), every element-wise operation and every state stay float32.
"""

from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16")
LOW = torch.bfloat16


def check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be {' or '.join(PRECISIONS)}, got {precision!r}")
    return precision


def low(t: torch.Tensor) -> torch.Tensor:
    """An operand of a bf16 product (a no-op for one already rounded)."""
    return t.to(LOW)


def mm_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as mm computes it but left in bf16, for a caller that adds it straight into
    float32 (`c + mm_sum(a, b)`, `out.add_(…)`, `out.copy_(…)`): the widening is part of that
    one pass instead of a pass of its own."""
    return torch.matmul(a.to(LOW), b.to(LOW))


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with bf16 operands and float32 accumulation; the result in float32. (torch on
    the CPU has no bf16 × bf16 -> float32 product: the float32 sums are rounded to bf16 once,
    at the output, then widened.)"""
    return torch.matmul(a.to(LOW), b.to(LOW)).float()


def mm_bias_low(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x @ w + bias over (…, n) rows, left in bf16, for a consumer that widens it as it reads
    it (the native loop's C; the fused loop widens it once): the bias, rounded to bf16 like
    the product's operands, joins the float32 sums inside the product and the result is
    rounded once (as mm rounds x @ w). Its gradient comes back in bf16, the operand of the
    gradient products, with no cast; the bias's gradient is their bf16 sum, widened."""
    y = torch.addmm(bias.to(LOW), x.flatten(0, -2).to(LOW), w.to(LOW))
    return y.unflatten(0, x.shape[:-1])

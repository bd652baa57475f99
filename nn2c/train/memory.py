"""What training may allocate: the memory a device has free, and an amount in words.

Both trainers refuse, before anything is allocated, a model whose training cannot fit;
they count what they need in their own terms and ask here what there is.
"""

from __future__ import annotations

import os

BYTES_PER_PARAMETER = 32    # float32 weights, gradients, Adam's two moments and checkpoint copies


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can have without swapping (Linux's
    MemAvailable; elsewhere the physical memory); None when it cannot be told."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_memory(device) -> tuple[str, int | None]:
    """(where, bytes): what a new allocation can have on `device` (a torch.device)."""
    if device.type == "cuda":
        import torch
        return "free on the GPU", torch.cuda.mem_get_info(device)[0]
    return "available", available_memory()


def fmt_bytes(n: float) -> str:
    return f"{n / 2 ** 30:,.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:,.1f} MiB"

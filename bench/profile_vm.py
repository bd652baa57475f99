"""Where a VM step's time goes: the time of each bound instruction, summed over many steps.

    .venv/bin/python bench/profile_vm.py --hidden 256 --batch 1
    .venv/bin/python bench/profile_vm.py --model some.nnb --batch 64

Reads the VM's bound code (`VM._bindings`, a private detail: if the VM changes shape this
falls back to cProfile of `advance`). Not part of `make bench`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import build_lstm  # noqa: E402


def _describe(args) -> str:
    return ", ".join(str(a.shape) if hasattr(a, "shape") else repr(a) for a in args[:3])


def per_instruction(vm, ids, steps: int) -> None:
    bound = [code for code, _ in vm._bindings]
    acc = np.zeros(len(bound[0]))
    for _ in range(50):
        vm.advance(ids)
    vm.reset()
    wall = time.perf_counter()
    for _ in range(steps):
        vm.ids[:] = ids
        for i, (fn, args) in enumerate(bound[vm.parity]):
            t0 = time.perf_counter()
            fn(*args)
            acc[i] += time.perf_counter() - t0
        vm.parity ^= 1
    wall = time.perf_counter() - wall
    plain = time.perf_counter()
    for _ in range(steps):
        vm.advance(ids)
    plain = time.perf_counter() - plain
    print(f"advance: {plain / steps * 1e6:.1f} µs/step; sum of instructions "
          f"{acc.sum() / steps * 1e6:.1f} µs/step (timing adds {(wall - acc.sum()) / steps * 1e6:.1f})")
    print(f"{'#':>3}  {'µs/step':>8}  {'share':>6}  instruction")
    for i, (fn, args) in enumerate(bound[0]):
        name = getattr(fn, "__name__", str(fn))
        print(f"{i:3}  {acc[i] / steps * 1e6:8.2f}  {acc[i] / acc.sum():6.1%}  {name}({_describe(args)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a .nnb file (default: a random 2-layer LSTM)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    from nn2run import load
    with tempfile.TemporaryDirectory() as d:
        path = args.model or build_lstm(Path(d) / "m.nnb", args.hidden)[0]
        model = load(path)
        vm = model.vm(args.batch)
        ids = np.ones(args.batch, np.intp)
        if hasattr(vm, "_bindings"):
            per_instruction(vm, ids, args.steps)
        else:
            import cProfile
            import pstats
            cProfile.runctx("for _ in range(n): vm.advance(ids)", globals(), {"vm": vm, "ids": ids, "n": args.steps},
                            sort=pstats.SortKey.TIME)
        model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start-up: the wall time of the real console script, and the time to open a model.

Cold start runs `.venv/bin/nn2run model.nnb -n 1` as a user would and compares it with
`python -c "import numpy"` (the floor any NumPy runtime pays), interleaved, median of
many runs. Opening times `nn2run.load(path)` (memory map + full validation) on a 5 MB
and a 50 MB model: it should not depend on the size, since nothing is read eagerly.
"""

from __future__ import annotations

import os
import subprocess
import time

from .common import BIN, Table, build_lstm, fmt_list, hidden_for_bytes, interleaved, median, verdict


def _wall(cmd, env) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
    return time.perf_counter() - t0


def bench_cold(tmp, quick: bool):
    path = tmp / "cold-2x256.nnb"
    if not path.exists():
        build_lstm(path, 256)
    py, tool = str(BIN / "python"), str(BIN / "nn2run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    cmds = {"nn2run": [tool, str(path), "-n", "1"],
            "numpy": [py, "-c", "import numpy"],
            # not compared, shown to tell where the time goes
            "python": [py, "-c", "pass"],
            "import nn2run.cli": [py, "-c", "import nn2run.cli"],
            "import click": [py, "-c", "import click"]}
    runs = 5 if quick else 15
    for cmd in cmds.values():          # warm the page cache and .pyc files
        _wall(cmd, env)
    times = interleaved({k: (lambda c=c: _wall(c, env)) for k, c in cmds.items()}, runs)
    nn2, peer = median(times["nn2run"]), median(times["numpy"])
    t = Table("cold start: `nn2run model.nnb -n 1` vs `python -c \"import numpy\"` (wall time)")
    t.add("2×256 model, -n 1 (ms, median)", f"{nn2 * 1e3:.1f}", f"{peer * 1e3:.1f}",
          verdict(nn2 / peer, at_most=1.5), "≤ 1.5×")
    t.notes.append(f"median of {runs} interleaved runs each, subprocess wall time, warm page cache")
    for k, v in times.items():
        t.raw.append(f"{k}: median {median(v) * 1e3:.1f} ms, runs {fmt_list(sorted(v), 1e3, ' ms')}")
    return [t]


def bench_open(tmp, quick: bool):
    from nn2run import load
    t = Table("open a model: `nn2run.load(path)` (mmap + validation)")
    reps = 20 if quick else 100
    for mb in (5, 50):
        hidden = hidden_for_bytes(mb * 1_000_000)
        path = tmp / f"open-{mb}MB.nnb"
        if not path.exists():
            build_lstm(path, hidden)
        size = path.stat().st_size

        def once(path=path):
            t0 = time.perf_counter()
            m = load(path)
            dt = time.perf_counter() - t0
            m.close()
            return dt

        def with_vm(path=path):
            t0 = time.perf_counter()
            m = load(path)
            m.vm(1)
            dt = time.perf_counter() - t0
            m.close()
            return dt
        first = once()
        times = interleaved({"load": once, "load + vm(1)": with_vm}, reps)
        ms = median(times["load"]) * 1e3
        ok = "✓" if ms <= 10 else "✗"
        t.add(f"{size / 1e6:.1f} MB (2×{hidden}), load (ms, median)", f"{ms:.2f}", "—", f"— {ok}", "≤ 10 ms")
        t.raw.append(f"{size / 1e6:.1f} MB: first load {first * 1e3:.2f} ms; load median {ms:.2f} ms, "
                     f"best {min(times['load']) * 1e3:.2f} ms; load + vm(1) median "
                     f"{median(times['load + vm(1)']) * 1e3:.2f} ms ({reps} reps)")
    t.notes.append("no peer: an absolute bound; the two sizes show whether it grows with the file")
    return [t]

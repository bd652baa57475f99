"""nn2 benchmarks: each measure against a peer in the same run, printed as markdown tables.

    .venv/bin/python bench/run.py                 # everything (a few minutes)
    .venv/bin/python bench/run.py --quick         # a smoke run (~30 s)
    .venv/bin/python bench/run.py --only gen      # one measure (see --list)
    .venv/bin/python bench/run.py --only seq2seq  # not in the default run (~3 min)

Speed is a ratio to a peer measured on the same machine in the same run; the raw
figures are printed under each table. These are benchmarks, not tests: nothing fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name -> (what it measures, module, function); modules are imported after --threads is applied
MEASURES = {
    "gen": ("generation at batch 1 vs fused NumPy and torch eager", "generation", "bench_batch1"),
    "streams": ("generation, 64 streams vs batch 1", "generation", "bench_streams"),
    "onnx": ("generation at batch 1, 8, 64 vs ONNX Runtime (nn.LSTM/nn.GRU via torch.onnx; nn2c export)",
             "onnx_peer", "bench_onnx"),
    "cold": ("cold start of the console script vs python -c 'import numpy'", "startup", "bench_cold"),
    "open": ("nn2run.load of a 5 MB and a 50 MB model", "startup", "bench_open"),
    "train": ("training on CPU vs torch.nn.LSTM", "training", "bench_train"),
    "train-sizes": ("training at 2×32 and 2×256: native loop vs fused loop vs torch.nn.LSTM", "training",
                    "bench_train_sizes"),
    "train-bf16": ("training with bf16 products vs torch.nn.LSTM under autocast, and both in float32",
                   "training", "bench_train_bf16"),
    "gpu": ("training on CUDA vs cuDNN nn.LSTM (skipped without a GPU)", "training", "bench_train_gpu"),
    "serve": ("nn2run serve: 1-128 streaming clients vs offline batches, batch 1, overload", "serve", "bench_serve"),
    "quant": ("f16 / int8 files vs float32: size, held-out loss, speed, open", "quantize", "bench_quantize"),
    "seq2seq": ("seq2seq on dates: exact match and translate speed vs a torch GRU + attention (~3 min)",
                "seq2seq", "bench_seq2seq"),
}
OPTIONAL = {"seq2seq"}      # long (a minute of training per arm): run with --only
SIZED = {"gen", "streams", "onnx"}
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and repetitions (~30 s)")
    ap.add_argument("--only", metavar="NAME", action="append", choices=sorted(MEASURES),
                    help="run only this measure (repeatable): " + ", ".join(MEASURES))
    ap.add_argument("--list", action="store_true", help="list the measures and exit")
    ap.add_argument("--threads", type=int, metavar="N", default=1,
                    help="BLAS, OpenMP and torch threads for every side (default 1: steady on a shared "
                         "machine; 0 leaves the libraries' own choice)")
    args = ap.parse_args(argv)
    if args.list:
        for name, (what, _, _) in MEASURES.items():
            print(f"{name:8} {what}")
        return 0
    if args.threads:
        for var in THREAD_VARS:     # before NumPy is imported; subprocesses inherit them
            os.environ[var] = str(args.threads)
    import importlib

    import torch

    from bench.common import machine_line
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only or [name for name in MEASURES if name not in OPTIONAL]
    sizes = (256,) if args.quick else (256, 512)
    print(f"# nn2 benchmarks{' (quick)' if args.quick else ''}\n")
    print(f"{machine_line()}; torch {torch.__version__} with {torch.get_num_threads()} threads; "
          + ", ".join(f"{v}={os.environ.get(v, 'unset')}" for v in THREAD_VARS) + "\n")
    print("Ratios compare nn2 with a peer timed in the same run; ✓/✗ marks the target. "
          "The machine may be shared: other processes add noise (see the raw figures).\n")
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nn2-bench-") as d:
        tmp = Path(d)
        for name in names:
            _, module, func = MEASURES[name]
            fn = getattr(importlib.import_module(f"bench.{module}"), func)
            t0 = time.perf_counter()
            tables = fn(tmp, sizes, args.quick) if name in SIZED else fn(tmp, args.quick)
            for table in tables:
                print(table.render())
            print(f"({name}: {time.perf_counter() - t0:.1f} s)\n", flush=True)
    print(f"total {time.perf_counter() - t_all:.1f} s; {machine_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

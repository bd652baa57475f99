"""Shared pieces of the benchmarks: models from known weights, timing, and the tables.

Every measure compares nn2 with a peer *in the same run on the same machine* and
reports the ratio; absolute figures are printed too, but only the ratio means much.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# tinyshakespeare's 65 characters: the vocabulary every generation model here uses
VOCAB = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def build_lstm(path, hidden: int, layers: int = 2, vocab: int = len(VOCAB), seed: int = 0):
    """Write a .nnb LSTM with random weights of a trained-like scale (uniform ±1/√hidden,
    as torch initializes nn.LSTM); returns (path, logical weights by key, e.g. "W_f@0")."""
    from nn2c.compiler.emit import init_logical, pack
    from nn2c.compiler.pipeline import compile_kernel, write_model
    from nn2run.codec import CharCodec
    compiled = compile_kernel("lstm", hidden, layers, vocab)
    specs = compiled.network.tensors()
    logical = init_logical(specs, hidden, seed)
    # a readout of a larger scale, so that sampling sees peaked distributions as in a trained model
    logical["W_y"] *= 8.0
    chars = VOCAB if vocab == len(VOCAB) else [chr(0x100 + i) for i in range(vocab)]
    write_model(str(path), compiled, pack(specs, logical), CharCodec(list(chars)), {"bench": True})
    return path, logical


def lstm_file_bytes(hidden: int, layers: int = 2, vocab: int = len(VOCAB)) -> int:
    """Approximate tensor bytes of a stacked LSTM with a readout (float32)."""
    h4 = 4 * hidden
    cells = (vocab * h4 + hidden * h4 + h4) + (layers - 1) * (2 * hidden * h4 + h4)
    return 4 * (cells + hidden * vocab + vocab)


def hidden_for_bytes(target: int, layers: int = 2) -> int:
    """The hidden size (a multiple of 8) whose model is nearest `target` bytes."""
    return min(range(8, 1 << 14, 8), key=lambda h: abs(lstm_file_bytes(h, layers) - target))


@dataclass
class Row:
    measure: str
    nn2: str
    peer: str
    ratio: str
    target: str


@dataclass
class Table:
    title: str
    rows: list = field(default_factory=list)
    raw: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def add(self, measure, nn2, peer, ratio, target) -> None:
        self.rows.append(Row(measure, nn2, peer, ratio, target))

    def render(self) -> str:
        head = ["measure", "nn2", "peer", "ratio", "target"]
        cells = [head] + [[r.measure, r.nn2, r.peer, r.ratio, r.target] for r in self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(5)]
        line = lambda c: "| " + " | ".join(s.ljust(w) for s, w in zip(c, widths)) + " |"   # noqa: E731
        out = [f"### {self.title}", "", line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(c) for c in cells[1:]]
        if self.notes:
            out += [""] + [f"note: {n}" for n in self.notes]
        if self.raw:
            out += ["", "raw:"] + [f"    {r}" for r in self.raw]
        return "\n".join(out) + "\n"


def verdict(ratio: float, at_least: float | None = None, at_most: float | None = None) -> str:
    ok = (at_least is None or ratio >= at_least) and (at_most is None or ratio <= at_most)
    return f"{ratio:.2f}× {'✓' if ok else '✗'}"


def interleaved(fns: dict, reps: int, pause: float = 0.0) -> dict:
    """Run each fn once per round, rounds interleaved (drift hits all alike); returns
    name -> list of the values each call returned (usually seconds). `pause` seconds of
    sleep before each call let the threads of the one before stop spinning (ONNX Runtime's
    and OpenBLAS's pools busy-wait for a while after their work, on the other cores)."""
    out = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            time.sleep(pause)
            out[name].append(fn())
    return out


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def best(xs):
    return min(xs)


def median(xs):
    return statistics.median(xs)


def fmt_list(xs, scale=1.0, unit="", digits=3) -> str:
    return "[" + ", ".join(f"{x * scale:.{digits}g}" for x in xs) + "]" + unit


def machine_line() -> str:
    import platform
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
            f"{platform.machine()}, load average {', '.join(f'{x:.2f}' for x in load)}")

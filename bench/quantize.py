"""Quantized files: size, held-out loss and speed of f16 and int8 against float32.

A 2×256 LSTM is trained briefly on tinyshakespeare (`nn2c train`, the last 5% held
out), then `nn2c quantize` writes its f16 and int8 copies. For each file: its size, the
validation loss on the held-out tail computed with the runtime (16 contiguous streams,
float64 log-softmax), the time to open it (load + binding a VM), the memory a process
holds after opening it and generating (RssAnon / RssFile, in a fresh process), and the
VM's step speed at batch 1. Skipped without ../shared/data/tinyshakespeare.txt.
"""

from __future__ import annotations

import json
import subprocess
import sys
from time import perf_counter

import numpy as np

from nn2run.score import stream_loss

from .common import BIN, ROOT, SHAKESPEARE, Table, interleaved, median, verdict

TARGETS = {"f16": 0.002, "int8": 0.02}      # nats/char of validation-loss cost
_RSS = """
import sys, nn2run, numpy as np
m = nn2run.load(sys.argv[1]); vm = m.vm(1); vm.reset()
for t in range(200):
    vm.advance(np.array([t % len(m.vocab)]))
rss = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(rss["RssAnon"].split()[0]), int(rss["RssFile"].split()[0]))
"""


def validation_loss(model, ids) -> float:
    return stream_loss(model, ids, streams=16)


def _train(tmp, quick: bool):
    path = tmp / f"shakespeare-{'quick' if quick else 'full'}.nnb"
    if not path.exists():
        steps = 60 if quick else 1000
        subprocess.run([str(BIN / "nn2c"), "train", str(SHAKESPEARE), "-o", str(path), "--hidden", "256",
                        "--layers", "2", "--seq-len", "100", "--batch", "32", "--steps", str(steps),
                        "--eval-every", str(steps)], check=True, capture_output=True)
    return path


def _rss(path) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _RSS, str(path)], check=True, capture_output=True,
                         text=True, cwd=ROOT).stdout.split()
    return int(out[0]), int(out[1])


def bench_quantize(tmp, quick: bool):
    from nn2c.compiler.quantize import quantize_file
    from nn2run import load
    t = Table("quantized files (2×256 LSTM, tinyshakespeare): f16 / int8 vs float32")
    if not SHAKESPEARE.exists():
        t.add("all", "skipped", "skipped", "—", "—")
        t.notes.append(f"skipped: {SHAKESPEARE} is not here")
        return [t]
    paths = {"f32": _train(tmp, quick)}
    for dtype in TARGETS:
        paths[dtype] = tmp / f"shakespeare.{dtype}.nnb"
        quantize_file(str(paths["f32"]), str(paths[dtype]), dtype)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    held_out = text[int(len(text) * 0.95):][:4000 if quick else None]
    models = {k: load(p) for k, p in paths.items()}
    ids = models["f32"].codec.encode(held_out)
    loss = {k: validation_loss(m, ids) for k, m in models.items()}
    speed = _speed(models, 300 if quick else 2000, 3 if quick else 7)
    opening = _open_times(paths, 5 if quick else 30)
    size = {k: p.stat().st_size for k, p in paths.items()}
    for dtype, target in TARGETS.items():
        t.add(f"{dtype}: file size (bytes)", f"{size[dtype]:,}", f"{size['f32']:,}",
              f"{size[dtype] / size['f32']:.2f}×", "smaller")
        cost = loss[dtype] - loss["f32"]
        t.add(f"{dtype}: validation loss (nats/char)", f"{loss[dtype]:.4f}", f"{loss['f32']:.4f}",
              f"{cost:+.4f} {'✓' if cost <= target else '✗'}", f"≤ +{target}")
        t.add(f"{dtype}: steps/s at batch 1", f"{speed[dtype]:,.0f}", f"{speed['f32']:,.0f}",
              verdict(speed[dtype] / speed["f32"], at_least=0.95), "≥ 0.95× (no slower)")
        t.add(f"{dtype}: open, load + vm(1) (ms, median)", f"{opening[dtype] * 1e3:.2f}",
              f"{opening['f32'] * 1e3:.2f}", f"{opening[dtype] / opening['f32']:.1f}×", "— (reported)")
    rss = {k: _rss(p) for k, p in paths.items()}
    provenance = models["f32"].header.get("provenance", {})
    t.notes.append(f"peer: the float32 file; trained {provenance.get('steps', '?')} steps "
                   f"(best val loss {provenance.get('best_val_loss', '?')}); held-out {len(ids):,} chars")
    t.notes.append("quantized files are converted to float32 at load: the VM runs the same code, "
                   "the weights then live in anonymous memory instead of the file's page cache")
    for k, (anon, file) in rss.items():
        t.raw.append(f"{k}: after load + 200 steps, RssAnon {anon:,} kB, RssFile {file:,} kB")
    t.raw.append("validation loss: " + json.dumps({k: round(v, 6) for k, v in loss.items()}))
    for m in models.values():
        m.close()
    return [t]


def _speed(models, n: int, reps: int) -> dict:
    ids = np.arange(n).reshape(n, 1) % len(models["f32"].vocab)

    def loop(m):
        def run():
            vm = m.vm(1)
            vm.reset()
            t0 = perf_counter()
            for row in ids:
                vm.advance(row)
            return perf_counter() - t0
        return run
    times = interleaved({k: loop(m) for k, m in models.items()}, reps)
    return {k: n / min(v) for k, v in times.items()}


def _open_times(paths, reps: int) -> dict:
    from nn2run import load

    def once(path):
        def run():
            t0 = perf_counter()
            m = load(path)
            m.vm(1)
            dt = perf_counter() - t0
            m.close()
            return dt
        return run
    times = interleaved({k: once(p) for k, p in paths.items()}, reps)
    return {k: median(v) for k, v in times.items()}


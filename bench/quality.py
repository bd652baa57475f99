"""Quality side by side: nn2's held-out loss on tinyshakespeare against a plain torch.nn.LSTM
character model, each trained for the same wall-clock time with the same recipe.

    .venv/bin/python bench/quality.py                    # 10 minutes per arm (about 21 in all)
    .venv/bin/python bench/quality.py --minutes 2        # a shorter, noisier run
    .venv/bin/python bench/quality.py --bf16             # also nn2 --precision bf16 and torch autocast bf16

Arms, one after another in fresh processes (never side by side), each on one thread:
  nn2         `nn2c.train.trainer.Trainer` (the loop `nn2c train --max-minutes M` runs, checkpoints
              and all), the best validation weights written to a .nnb;
  torch       torch.nn.LSTM + Linear written here: one-hot input, cross-entropy, Adam, clip, the
              state carried (detached) between windows and reset at each epoch, as nn2 trains;
  nn2-bf16    nn2 with TrainConfig(precision="bf16") (`nn2c train --precision bf16`);
  torch-bf16  the peer with its forward under torch.autocast("cpu", dtype=torch.bfloat16).

Both sides train on the very same windows (nn2's `split`: the corpus's last --val-frac held out,
the rest cut into --batch contiguous rows) and validate every --eval-every steps on the same
held-out windows, keeping the best weights; a digest of the training and validation data is
compared across arms. The figure that counts is the held-out loss of those best weights in
nats/char, computed the same way for both: the held-out tail cut into --streams contiguous
streams stepped from the zero state, log-softmax in float64 (`nn2run.score.stream_loss` on nn2's
file, the same arithmetic on the peer's model). Target: nn2 ≤ the peer. A wall-clock race on a
shared machine is noisy: the load average before and after each arm is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
# bench.common imports NumPy: it is imported only after the thread variables are set

ARMS = {"nn2": ("nn2", False), "torch": ("torch", False), "nn2-bf16": ("nn2", True), "torch-bf16": ("torch", True)}
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
ENDLESS = 10 ** 9           # steps: the time limit ends every arm
RECIPE = ("minutes", "corpus", "hidden", "layers", "seq_len", "batch", "lr", "clip", "eval_every", "val_frac",
          "streams", "seed", "threads")     # the options an arm's process is given


# --- what both arms share ------------------------------------------------------------------

def train_config(args, bf16: bool):
    from nn2c.train.trainer import TrainConfig
    return TrainConfig(kernel="lstm", hidden=args.hidden, layers=args.layers, seq_len=args.seq_len,
                       batch=args.batch, steps=ENDLESS, lr=args.lr, clip=args.clip, eval_every=args.eval_every,
                       val_frac=args.val_frac, seed=args.seed, device="cpu", max_minutes=args.minutes,
                       precision="bf16" if bf16 else "fp32")


def held_out_ids(corpus, cfg):
    """The held-out tail `split` validates on (the formula checked against it in `digest`)."""
    n = len(corpus.ids)
    return corpus.ids[n - int(n * cfg.val_frac):][:cfg.max_eval_tokens]


def digest(train, val, held) -> str:
    """A hash of the training windows, the validation windows and the held-out stream: two
    arms with the same digest saw the same characters laid out the same way."""
    import hashlib

    import numpy as np
    flat = val.data.numpy().reshape(-1)
    if not np.array_equal(flat, held[:len(flat)]):
        raise SystemExit("quality: the held-out tail here is not the one nn2's split validates on")
    h = hashlib.sha256()
    for part in (train.data.numpy(), val.data.numpy(), np.asarray(held)):
        h.update(repr(part.shape).encode())
        h.update(np.ascontiguousarray(part).tobytes())
    h.update(f"{len(train)} windows of {train.seq_len}; val {len(val)} of {val.seq_len}".encode())
    return h.hexdigest()[:16]


def stream_windows(ids, streams: int):
    """(inputs, targets), each (n, streams): the cut `nn2run.score.stream_loss` makes."""
    import numpy as np
    ids = np.asarray(ids, dtype=np.int64)
    n = (len(ids) - 1) // streams
    inputs = np.stack([ids[i * n:(i + 1) * n] for i in range(streams)], axis=1)
    targets = np.stack([ids[i * n + 1:(i + 1) * n + 1] for i in range(streams)], axis=1)
    return inputs, targets


# --- the peer: torch.nn.LSTM + Linear --------------------------------------------------------

class Peer:
    """A character LSTM in plain torch, trained as nn2 trains (see the module docstring)."""

    def __init__(self, vocab: int, hidden: int, layers: int, lr: float, clip: float, seed: int, bf16: bool):
        import torch
        torch.manual_seed(seed)
        self.lstm = torch.nn.LSTM(vocab, hidden, layers)
        self.lin = torch.nn.Linear(hidden, vocab)
        self.params = list(self.lstm.parameters()) + list(self.lin.parameters())
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.vocab, self.hidden, self.layers, self.clip, self.bf16 = vocab, hidden, layers, clip, bf16

    def zero_state(self, rows: int):
        import torch
        return tuple(torch.zeros(self.layers, rows, self.hidden) for _ in range(2))

    def logits(self, x, state):
        """Float32 logits (T, B, V) and the next state; the products in bf16 under autocast."""
        import torch
        import torch.nn.functional as F
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out, state = self.lstm(F.one_hot(x, self.vocab).float(), state)
            z = self.lin(out)
        return z.float(), tuple(s.float() for s in state)

    def step(self, x, y, state):
        import torch
        import torch.nn.functional as F
        z, state = self.logits(x, state)
        loss = F.cross_entropy(z.reshape(-1, self.vocab), y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        return loss.item(), tuple(s.detach() for s in state)

    def evaluate(self, val) -> float:
        """Mean cross-entropy over the validation windows, the state carried, as nn2's trainer does."""
        import torch
        import torch.nn.functional as F
        state, total, count = self.zero_state(val.rows), 0.0, 0
        with torch.no_grad():
            for k in range(len(val)):
                x, y = val[k]
                z, state = self.logits(x, state)
                total += F.cross_entropy(z.reshape(-1, self.vocab), y.reshape(-1), reduction="sum").double().item()
                count += y.numel()
        return total / count

    def stream_loss(self, ids, streams: int, chunk: int = 1000) -> float:
        """Mean -ln p(next char) over `ids` cut into `streams` streams from the zero state, in
        float32 products and a float64 log-softmax: stream_loss's arithmetic on this model."""
        import torch
        inputs, targets = stream_windows(ids, streams)
        x, y = torch.from_numpy(inputs), torch.from_numpy(targets)
        state, total = self.zero_state(streams), 0.0
        with torch.no_grad():
            for a in range(0, len(x), chunk):       # in pieces, the state carried: bounded memory
                out, state = self.lstm(torch.nn.functional.one_hot(x[a:a + chunk], self.vocab).float(), state)
                logp = torch.log_softmax(self.lin(out).double(), dim=-1)
                total -= float(logp.gather(-1, y[a:a + chunk, :, None]).sum())
        return total / y.numel()

    def weights(self) -> dict:
        return {k: v.detach().clone() for k, v in {**self.lstm.state_dict(prefix="lstm."),
                                                    **self.lin.state_dict(prefix="lin.")}.items()}

    def load(self, weights: dict) -> None:
        self.lstm.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("lstm.")})
        self.lin.load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("lin.")})


def train_peer(args, corpus, bf16: bool) -> dict:
    """The peer's loop: the schedule of nn2's (evaluate every --eval-every steps and at the
    last, the last step the first one to end past the time limit)."""
    import torch

    from nn2c.train.trainer import split
    cfg = train_config(args, False)
    train, val = split(corpus, cfg, torch.device("cpu"))
    held = held_out_ids(corpus, cfg)
    peer = Peer(len(corpus.codec.vocab), args.hidden, args.layers, args.lr, args.clip, args.seed, bf16)
    best = best_step = best_weights = None
    history = []                    # (step, validation loss) of every evaluation
    state, step, t0, c0 = None, 0, time.monotonic(), time.process_time()
    deadline = t0 + 60 * args.minutes
    while True:
        k = step % len(train)
        if k == 0 or state is None:
            state = peer.zero_state(train.rows)
        x, y = train[k]
        loss, state = peer.step(x, y, state)
        step += 1
        if not math.isfinite(loss):
            raise SystemExit(f"quality: the peer's loss became {loss} at step {step}")
        last = time.monotonic() > deadline
        if step % args.eval_every == 0 or last:
            v = peer.evaluate(val)
            history.append((step, v))
            if best is None or v < best:
                best, best_step, best_weights = v, step, peer.weights()
        if last:
            break
    seconds, cpu = time.monotonic() - t0, time.process_time() - c0
    peer.load(best_weights)
    return {"steps": step, "seconds": seconds, "best_val": best, "best_step": best_step,
            "held_out": peer.stream_loss(held, args.streams), "digest": digest(train, val, held),
            "loop": "nn.LSTM" + (", autocast bf16" if bf16 else ""), "cpu_share": cpu / seconds,
            "history": history}


# --- nn2 -----------------------------------------------------------------------------------

def train_nn2(args, corpus, bf16: bool, tmp: Path) -> dict:
    """nn2c's trainer as `nn2c train --max-minutes` runs it; its progress goes to stderr."""
    import nn2run
    from nn2c.train.progress import read_log
    from nn2c.train.trainer import Trainer
    from nn2run.score import stream_loss
    cfg = train_config(args, bf16)
    out = tmp / "nn2.nnb"
    log = tmp / "nn2.jsonl"           # --log: one record per evaluation
    trainer = Trainer(cfg, corpus, str(out), str(tmp / "nn2.ckpt"), stream=sys.stderr, log_path=str(log))
    t0, c0 = time.monotonic(), time.process_time()
    summary = trainer.run()
    seconds, cpu = time.monotonic() - t0, time.process_time() - c0
    held = held_out_ids(corpus, cfg)
    return {"steps": summary["steps_run"], "seconds": seconds, "best_val": summary["best_val_loss"],
            "best_step": summary["best_step"], "held_out": stream_loss(nn2run.load(str(out)), held, args.streams),
            "digest": digest(trainer.train, trainer.val, held), "loop": f"{summary['loop']} loop",
            "cpu_share": cpu / seconds, "history": [(r["step"], r["val_loss"]) for r in read_log(str(log))]}


def run_arm(args) -> dict:
    """One arm, in this process (the parent starts one process per arm)."""
    import torch

    from nn2c.train.corpus import read_corpus
    if args.threads:
        torch.set_num_threads(args.threads)
    side, bf16 = ARMS[args.arm]
    corpus = read_corpus(str(args.corpus))
    with tempfile.TemporaryDirectory(prefix="nn2-quality-") as d:
        result = train_peer(args, corpus, bf16) if side == "torch" else train_nn2(args, corpus, bf16, Path(d))
    if "steps" in result:
        chars = result["steps"] * args.batch * args.seq_len
        result["chars_per_s"] = chars / result["seconds"]
        result["chars_per_cpu_s"] = chars / (result["cpu_share"] * result["seconds"])   # what a whole core gives
    result["threads"] = torch.get_num_threads()
    return result


# --- the parent: arms one after another, then the tables ------------------------------------

def load_avg() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def spawn(arm: str, args, tmp: Path) -> dict:
    """Run one arm in a fresh process; its result, or {"failed": its last stderr line}."""
    out, log = tmp / f"{arm}.json", tmp / f"{arm}.log"
    recipe = [x for name in RECIPE for x in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, __file__, *recipe, "--arm", arm, "--result", str(out)],
                              stdout=err, stderr=None if args.verbose else err)
    if proc.returncode != 0 or not out.exists():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        return {"failed": (lines[-1] if lines else f"exit status {proc.returncode}")}
    return json.loads(out.read_text())


def fmt_loss(x) -> str:
    return "—" if x is None else f"{x:.4f}"


def arms_table(args, results: dict) -> str:
    head = ["arm", "steps", "chars/s", "best val (trainer's windows)", "at step",
            f"held-out, {args.streams} streams (nats/char)", "CPU s / wall s", "chars per CPU s",
            "load avg before → after"]
    rows, notes = [], []
    for arm, r in results.items():
        load = f"{r['load_before']} → {r['load_after']}"
        if "steps" not in r:
            rows.append([arm, "failed", "", "", "", "", "", "", load])
            notes.append(f"note: {arm} failed: {r.get('failed')}")
            continue
        rows.append([f"{arm} ({r['loop']})", f"{r['steps']:,}", f"{r['chars_per_s']:,.0f}", fmt_loss(r["best_val"]),
                     f"{r['best_step']:,}", fmt_loss(r["held_out"]), f"{r['cpu_share']:.2f}",
                     f"{r['chars_per_cpu_s']:,.0f}", load])
    cells = [head] + rows
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    line = lambda c: "| " + " | ".join(s.ljust(w) for s, w in zip(c, widths)) + " |"   # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(c) for c in rows]
    return "\n".join(out + ([""] + notes if notes else [])) + "\n"


def verdict_table(args, results: dict):
    from bench.common import Table
    t = Table(f"held-out loss after {args.minutes:g} min of training each: nn2 against torch.nn.LSTM")
    ok = {arm: r for arm, r in results.items() if "held_out" in r}

    def pair(label, a, b, target):
        if a in ok and b in ok:
            x, y = ok[a]["held_out"], ok[b]["held_out"]
            t.add(label, f"{x:.4f}", f"{y:.4f}", f"{x / y:.3f}× {'✓' if x <= y else '✗'}", target)
            t.notes.append(f"{label}: {a} − {b} = {x - y:+.4f} nats/char")
    pair("held-out nats/char, float32", "nn2", "torch", "≤ 1.00× (nn2 ≤ peer)")
    pair("held-out nats/char, bf16", "nn2-bf16", "torch-bf16", "≤ 1.00× (nn2 ≤ peer)")
    pair("held-out nats/char, nn2 bf16 vs nn2 float32", "nn2-bf16", "nn2", "≤ 1.00×")
    for a, b in (("nn2", "torch"), ("nn2-bf16", "torch-bf16")):
        if a in ok and b in ok:
            same_step(t, a, ok[a]["history"], b, ok[b]["history"])
            x, y = ok[a]["chars_per_s"], ok[b]["chars_per_s"]
            t.add(f"chars/s, {a} vs {b} (whole run, validation included)", f"{x:,.0f}", f"{y:,.0f}",
                  f"{x / y:.2f}×", "—")
    t.notes.append("one wall-clock race on a shared machine: the figures move from run to run (see the "
                   "load averages, and CPU s / wall s: the share of a core each arm had while training); "
                   "ratios of losses below 1.00× mean nn2 is ahead")
    return t


def same_step(t, a: str, ha, b: str, hb) -> None:
    """A row for the last step both arms validated at: how much of a lead is per step, not speed."""
    va, vb = dict(map(tuple, ha)), dict(map(tuple, hb))
    common = sorted(set(va) & set(vb))
    if common:
        s = common[-1]
        t.add(f"val loss at step {s:,} (trainer's windows), {a} vs {b}", f"{va[s]:.4f}", f"{vb[s]:.4f}",
              f"{va[s] / vb[s]:.3f}×", "—")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="training time per arm (default 10)")
    ap.add_argument("--corpus", type=Path, default=SHAKESPEARE, help="the text (default tinyshakespeare)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--clip", type=float, default=5.0)
    ap.add_argument("--eval-every", type=int, default=200, help="validation period in steps (default 200)")
    ap.add_argument("--val-frac", type=float, default=0.05, help="the held-out tail (default 0.05)")
    ap.add_argument("--streams", type=int, default=8, help="streams of the held-out loss (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="threads of each arm (default 1; 0: torch's own)")
    ap.add_argument("--bf16", action="store_true", help="add the bf16 arms")
    ap.add_argument("--only", action="append", choices=sorted(ARMS), help="run only this arm (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the arms' training progress")
    ap.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)       # a child: one arm
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not (args.minutes > 0 and math.isfinite(args.minutes)):
        ap.error(f"--minutes must be a finite number > 0, got {args.minutes}")
    if not args.corpus.is_file():
        print(f"quality: {args.corpus}: no such file (tinyshakespeare goes in ../shared/data/)", file=sys.stderr)
        return 2
    if args.threads:
        for var in THREAD_VARS:     # before NumPy is imported; the arms' processes inherit them
            os.environ[var] = str(args.threads)
    if args.arm:
        args.result.write_text(json.dumps(run_arm(args)))
        return 0
    return race(args)


def race(args) -> int:
    import torch

    from bench.common import machine_line
    arms = args.only or (list(ARMS) if args.bf16 else ["nn2", "torch"])
    print(f"# nn2 quality: {args.layers}×{args.hidden} LSTM on {args.corpus.name}, {args.minutes:g} min per arm\n")
    print(f"{machine_line()}; torch {torch.__version__}; {args.threads or 'default'} thread(s) per arm, "
          "arms one after another\n")
    print(f"recipe (both sides): seq {args.seq_len}, batch {args.batch}, Adam lr {args.lr:g}, clip {args.clip:g}, "
          f"no dropout, validation every {args.eval_every} steps on the last {args.val_frac:g} of the corpus, "
          f"seed {args.seed}\n", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="nn2-quality-") as d:
        for arm in arms:
            before = load_avg()
            r = spawn(arm, args, Path(d))
            r.update(load_before=before, load_after=load_avg())
            results[arm] = r
            print(f"{arm}: done, load average {before} → {r['load_after']}", flush=True)
    digests = {r["digest"] for r in results.values() if "digest" in r}
    print()
    print(arms_table(args, results))
    print(verdict_table(args, results).render())
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "arms": results},
                                        indent=1))
    if len(digests) > 1:
        print(f"quality: the arms did not train on the same data (digests {sorted(digests)})", file=sys.stderr)
        return 1
    print(f"data digest {digests.pop() if digests else '—'} (training windows, validation windows, held-out "
          f"stream: the same for every arm); {machine_line()}")
    return 1 if any("failed" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

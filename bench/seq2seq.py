"""Seq2seq: nn2 against a plain torch GRU + additive-attention model on the dates task.

    .venv/bin/python bench/seq2seq.py --minutes 1 --hidden 64
    .venv/bin/python bench/run.py --only seq2seq

Both arms train on the same generated pairs (`nn2c tasks dates`, 12,000 by default), the
same training split and batches (nn2's `Buckets`), the same hidden size, batch, Adam lr
and clip, for the same wall time, each in its own subprocess with one thread, one after
the other: (a) `nn2c train --task seq2seq --max-minutes M`; (b) the peer below, trained
by this script. Both keep the weights with the best greedy exact match on the
validation split. Then, in a third subprocess, both decode greedily the same held-out
sources (dates of another seed, none in the training file): exact match, and
sentences/s at batch 1 and 64 (nn2 through `nn2run.load(...).translate`, the peer under
`torch.no_grad()`), the repetitions interleaved.

The peer is what one would write in torch for the same model: an `nn.GRU` encoder over
one-hot source characters, Bahdanau attention (vᵀ tanh(W s + U h), the U h terms once
per batch), an `nn.GRUCell` decoder whose input is [one-hot previous token; context],
the bridge tanh(W₀ h_last + b₀) and a linear readout: the parameters of nn2's
`seq2seq/bahdanau` decoder with a `gru` encoder, shape for shape.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
if __name__ == "__main__":          # before NumPy and torch are imported
    for _var in THREAD_VARS:
        os.environ.setdefault(_var, "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCRIPT = Path(__file__).resolve()
BATCH, LR, CLIP, EVAL_EVERY, VAL_FRAC, SEED = 64, 2e-3, 5.0, 200, 0.05, 0
SPEED_BATCHES = (1, 64)
PASSES = {1: 1, 64: 10}     # passes over the sources per timing: batch 64 takes ~50 ms a pass


class BenchError(Exception):
    """A bad argument or a failed arm; the message is one line."""


# --- the torch peer -----------------------------------------------------------------------

def peer_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Peer(nn.Module):
        def __init__(self, source_vocab: int, target_vocab: int, hidden: int):
            super().__init__()
            self.vs, self.vt = source_vocab, target_vocab
            self.encoder = nn.GRU(source_vocab, hidden)
            self.bridge = nn.Linear(hidden, hidden)
            self.W_a = nn.Linear(hidden, hidden, bias=False)
            self.U_a = nn.Linear(hidden, hidden, bias=False)
            self.v_a = nn.Linear(hidden, 1, bias=False)
            self.cell = nn.GRUCell(target_vocab + hidden, hidden)
            self.readout = nn.Linear(hidden, target_vocab)

        def start(self, src, src_len):
            """src (T, B) -> memory (B, T, H), its U_a terms, mask (B, T), s₀ (B, H)."""
            out, _ = self.encoder(F.one_hot(src, self.vs).float())
            memory = out.transpose(0, 1)
            final = memory[torch.arange(src.shape[1]), src_len - 1]
            mask = torch.arange(src.shape[0])[None, :] < src_len[:, None]
            return memory, self.U_a(memory), mask, torch.tanh(self.bridge(final))

        def step(self, token, s, memory, keys, mask):
            e = self.v_a(torch.tanh(self.W_a(s)[:, None, :] + keys)).squeeze(-1)
            alpha = torch.softmax(e.masked_fill(~mask, float("-inf")), dim=1)
            context = torch.bmm(alpha[:, None, :], memory).squeeze(1)
            s = self.cell(torch.cat([F.one_hot(token, self.vt).float(), context], 1), s)
            return self.readout(s), s

        def forward(self, src, src_len, tgt_in):
            memory, keys, mask, s = self.start(src, src_len)
            out = []
            for t in range(tgt_in.shape[0]):
                logits, s = self.step(tgt_in[t], s, memory, keys, mask)
                out.append(logits)
            return torch.stack(out)

        @torch.no_grad()
        def greedy(self, src, src_len, begin: int, end: int, max_len: int) -> list[list[int]]:
            """nn2run's greedy rule: argmax with BEGIN excluded, up to END or max_len tokens."""
            memory, keys, mask, s = self.start(src, src_len)
            token = torch.full((src.shape[1],), begin, dtype=torch.int64)
            done = torch.zeros(src.shape[1], dtype=torch.bool)
            picked = []
            for _ in range(max_len):
                logits, s = self.step(token, s, memory, keys, mask)
                logits[:, begin] = float("-inf")
                token = logits.argmax(1)
                picked.append(torch.where(done, end, token))
                done |= token == end
                if bool(done.all()):
                    break
            rows = torch.stack(picked, 1).tolist()
            return [r[:r.index(end)] if end in r else r for r in rows]

    return Peer


def peer_batch(codec, texts: list[str]):
    """Texts -> (src (T, B) padded with 0, lengths (B,)), as nn2's batches are laid out."""
    import torch
    ids = [codec.encode(t) for t in texts]
    src = torch.zeros(max(map(len, ids)), len(ids), dtype=torch.int64)
    for b, row in enumerate(ids):
        src[:len(row), b] = torch.tensor(row)
    return src, torch.tensor([len(r) for r in ids])


def train_peer(pairs_path: str, hidden: int, seconds: float, out: str) -> dict:
    import torch

    from nn2c.train.seq2seq.model import masked_loss
    from nn2c.train.seq2seq.pairs import Buckets, encode, eval_batches, read_pairs, split
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    pairs = read_pairs(pairs_path)
    train_idx, val_idx = split(pairs, VAL_FRAC)
    cpu = torch.device("cpu")
    train = Buckets(encode(pairs, train_idx), BATCH, SEED, pairs.begin, cpu)
    val = eval_batches(encode(pairs, val_idx), BATCH, pairs.begin, cpu)
    net = peer_class()(len(pairs.source_codec.vocab), pairs.target_vocab, hidden)
    params = list(net.parameters())
    opt = torch.optim.Adam(params, lr=LR, fused=True)

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        """(validation loss per token, greedy exact match), as nn2's trainer computes them."""
        total = tokens = right = count = 0
        for b in val:
            total += masked_loss(net(b.src, b.src_len, b.tgt_in), b.tgt_out, b.tgt_mask).item() * b.tokens
            tokens += b.tokens
            want = [row[:n - 1] for row, n in zip(b.tgt_out.t().tolist(), b.tgt_mask.sum(0).tolist())]
            got = net.greedy(b.src, b.src_len, pairs.begin, pairs.end, b.tgt_out.shape[0])
            right += sum(g == w for g, w in zip(got, want))
            count += len(want)
        return total / tokens, right / count

    best, best_loss, best_step, step = -1.0, float("inf"), 0, 0
    t0 = time.monotonic()
    deadline = t0 + seconds
    while True:
        b = train.at_step(step)
        loss = masked_loss(net(b.src, b.src_len, b.tgt_in), b.tgt_out, b.tgt_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        step += 1
        last = time.monotonic() > deadline
        if step % EVAL_EVERY == 0 or last:
            val_loss, score = evaluate()
            if score > best or (score == best and val_loss < best_loss):     # nn2's rule for the weights kept
                best, best_loss, best_step = score, val_loss, step
                torch.save({"state": net.state_dict(), "hidden": hidden, "source": pairs.source_codec.vocab,
                            "target": pairs.target_codec.vocab}, out)
        if last:
            break
    return {"steps": step, "seconds": time.monotonic() - t0, "val_exact": best, "best_step": best_step}


# --- measuring both -------------------------------------------------------------------------

def read_tsv(path: str) -> list[tuple[str, str]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [tuple(line.split("\t")) for line in lines if line]


def measure(nnb: str, peer_pt: str, test_tsv: str, reps: int) -> dict:
    import torch

    import nn2run
    from nn2run.codec import CharCodec
    torch.set_num_threads(1)
    model = nn2run.load(nnb)
    saved = torch.load(peer_pt, weights_only=True)
    src_codec, tgt_vocab = CharCodec(saved["source"]), saved["target"]
    begin, end = len(tgt_vocab), len(tgt_vocab) + 1
    peer = peer_class()(len(saved["source"]), len(tgt_vocab) + 2, saved["hidden"])
    peer.load_state_dict(saved["state"])
    peer.eval()
    limit = model.limits["target"]
    pairs = sorted(read_tsv(test_tsv), key=lambda p: len(p[0]))      # batches of similar length, both sides
    sources = [s for s, _ in pairs]

    def run_nn2(batch):
        return [t for a in range(0, len(sources), batch) for t in model.translate(sources[a:a + batch])]

    def run_peer(batch):
        out = []
        for a in range(0, len(sources), batch):
            src, lens = peer_batch(src_codec, sources[a:a + batch])
            out += ["".join(tgt_vocab[i] for i in row) for row in peer.greedy(src, lens, begin, end, limit)]
        return out

    result = {"sentences": len(sources), "threads": torch.get_num_threads()}
    for batch in SPEED_BATCHES:
        times = {"nn2": [], "peer": []}
        outs = {}
        for _ in range(reps):
            for name, fn in (("nn2", run_nn2), ("peer", run_peer)):
                t0 = time.perf_counter()
                for _ in range(PASSES[batch]):
                    outs[name] = fn(batch)
                times[name].append((time.perf_counter() - t0) / PASSES[batch])
        for name in times:
            result[f"{name}_s_b{batch}"] = times[name]
            result[f"{name}_exact_b{batch}"] = sum(o == t for o, (_, t) in zip(outs[name], pairs)) / len(pairs)
    return result


# --- the driver -----------------------------------------------------------------------------

def child_env() -> dict:
    env = dict(os.environ)
    env.update({v: "1" for v in THREAD_VARS})
    root = str(SCRIPT.parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def call(argv: list[str], what: str, timeout: float) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} ran past {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise BenchError(f"{what} failed (exit {done.returncode}): {tail}")
    return done.stdout


def held_out(train_sources: set, n: int) -> list[tuple[str, str]]:
    """n dates pairs of another seed whose sources are not in the training file."""
    from nn2c.train.tasks import generate
    out, seen = [], set(train_sources)
    for s, t in generate("dates", 20 * n, seed=1):
        if s not in seen:
            seen.add(s)
            out.append((s, t))
            if len(out) == n:
                return out
    raise BenchError(f"could not draw {n} held-out pairs")


def cli_seconds(nnb: Path, test_path: Path, batch: int) -> float:
    """Wall time of `nn2run translate --batch N` over the held-out sources, start-up included."""
    lines = "".join(s + "\n" for s, _ in read_tsv(str(test_path)))
    cmd = [str(Path(sys.executable).parent / "nn2run"), "translate", str(nnb), "--batch", str(batch)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, input=lines, capture_output=True, text=True, env=child_env(), timeout=600)
    if done.returncode != 0:
        raise BenchError(f"nn2run translate failed (exit {done.returncode}): {done.stderr.strip()[-200:]}")
    return time.perf_counter() - t0


def run_both(tmp: Path, minutes: float, hidden: int, n_pairs: int, n_test: int, reps: int) -> dict:
    from nn2c.train.tasks import generate, tsv
    py = sys.executable
    pairs_path, test_path = tmp / "dates.tsv", tmp / "test.tsv"
    pairs = generate("dates", n_pairs, seed=0)
    pairs_path.write_text(tsv(pairs), encoding="utf-8")
    chars = set("".join(s for s, _ in pairs))
    test = [p for p in held_out({s for s, _ in pairs}, n_test) if set(p[0]) <= chars]
    test_path.write_text(tsv(test), encoding="utf-8")
    nnb, peer_pt = tmp / "dates.nnb", tmp / "peer.pt"
    budget = 60 * minutes
    load_before = os.getloadavg()
    t0 = time.monotonic()
    call([str(Path(py).parent / "nn2c"), "train", "--task", "seq2seq", str(pairs_path), "-o", str(nnb),
          "--hidden", str(hidden), "--batch", str(BATCH), "--lr", str(LR), "--clip", str(CLIP),
          "--eval-every", str(EVAL_EVERY), "--val-frac", str(VAL_FRAC), "--seed", str(SEED),
          "--steps", "10000000", "--max-minutes", str(minutes)], "nn2c train", budget + 300)
    nn2_wall = time.monotonic() - t0
    t0 = time.monotonic()
    peer = json.loads(call([py, str(SCRIPT), "train-peer", str(pairs_path), str(peer_pt), "--hidden", str(hidden),
                            "--seconds", str(budget)], "the torch peer's training", budget + 300))
    peer["wall"] = time.monotonic() - t0
    speed = json.loads(call([py, str(SCRIPT), "measure", str(nnb), str(peer_pt), str(test_path),
                             "--reps", str(reps)], "measuring", 1200))
    speed["cli"] = {batch: cli_seconds(nnb, test_path, batch) for batch in SPEED_BATCHES}
    import nn2run
    with nn2run.load(str(nnb)) as m:
        prov = m.header["provenance"]
    return {"minutes": minutes, "hidden": hidden, "pairs": n_pairs, "test": len(test), "load_before": load_before,
            "load_after": os.getloadavg(), "nn2": {"steps": prov["steps"], "val_exact": prov["best_exact_match"],
                                                   "best_step": prov["best_step"], "wall": nn2_wall,
                                                   "pairs_per_s": prov["pairs_per_s"]},
            "peer": peer, "speed": speed}


def table(r: dict):
    from bench.common import Table, verdict
    sp, n = r["speed"], r["speed"]["sentences"]
    t = Table(f"seq2seq: dates → ISO, 1×{r['hidden']} GRU encoder + Bahdanau GRU decoder, "
              f"{r['minutes']:g} min of training each, one thread")
    a, b = sp["nn2_exact_b64"], sp["peer_exact_b64"]
    t.add(f"greedy exact match, {r['test']} held-out pairs", f"{a:.1%}", f"{b:.1%}",
          f"{a - b:+.1%}", "≥ peer's " + ("✓" if a >= b else "✗"))
    for batch in SPEED_BATCHES:
        x, y = n / min(sp[f"nn2_s_b{batch}"]), n / min(sp[f"peer_s_b{batch}"])
        t.add(f"greedy decoding, batch {batch}, sentences/s", f"{x:,.0f}", f"{y:,.0f}", verdict(x / y, 1.0),
              "≥ 1.0×")
    nn2, peer = r["nn2"], r["peer"]
    x, y = nn2["pairs_per_s"], peer["steps"] * BATCH / peer["seconds"]
    t.add("training, pairs/s (validation included)", f"{x:,.0f}", f"{y:,.0f}", f"{x / y:.2f}×", "—")
    t.notes += [f"training: nn2 {nn2['steps']:,} steps (best validation exact match {nn2['val_exact']:.1%} at step "
                f"{nn2['best_step']}), process wall {nn2['wall']:.0f} s; the peer {peer['steps']:,} steps "
                f"(best {peer['val_exact']:.1%} at step {peer['best_step']}), loop {peer['seconds']:.0f} s, "
                f"process wall {peer['wall']:.0f} s",
                f"{r['pairs']:,} pairs, validation {VAL_FRAC:.0%} (nn2's split), batch {BATCH}, Adam {LR:g}, "
                f"clip {CLIP:g}; peer = torch nn.GRU + additive attention + nn.GRUCell, one-hot inputs",
                "exact match at batch 1: nn2 {:.1%}, peer {:.1%} (same sources, batched alike)".format(
                    sp["nn2_exact_b1"], sp["peer_exact_b1"]),
                "load average before {} / after {} (a shared machine: other work adds noise)".format(
                    ", ".join(f"{x:.2f}" for x in r["load_before"]), ", ".join(f"{x:.2f}" for x in r["load_after"]))]
    t.notes.append("the command line, `nn2run translate --batch N` with the sources on stdin, start-up included: "
                   + ", ".join(f"batch {b}: {n / sp['cli'][b]:,.0f} sentences/s"
                               for b in SPEED_BATCHES))
    for batch in SPEED_BATCHES:
        t.raw.append(f"batch {batch}, s per pass over {n} sentences (each the mean of {PASSES[batch]} passes): nn2 "
                     + ", ".join(f"{s:.3f}" for s in sp[f"nn2_s_b{batch}"])
                     + "; peer " + ", ".join(f"{s:.3f}" for s in sp[f"peer_s_b{batch}"]))
    return t


def bench_seq2seq(tmp: Path, quick: bool):
    """bench/run.py's entry: 1 minute of training per arm (15 s with --quick)."""
    return [table(run_both(tmp, 0.25 if quick else 1.0, 64, 12000, 512, 2 if quick else 3))]


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BenchError(message)


def parse(argv):
    ap = Parser(prog="bench/seq2seq.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage")
    p = sub.add_parser("train-peer", help="train the torch peer (a subprocess of the bench)")
    p.add_argument("pairs")
    p.add_argument("out")
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    m = sub.add_parser("measure", help="exact match and speed of both (a subprocess of the bench)")
    m.add_argument("nnb")
    m.add_argument("peer")
    m.add_argument("test")
    m.add_argument("--reps", type=int, default=3)
    ap.add_argument("--minutes", type=float, default=1.0, help="training wall time per arm (default 1)")
    ap.add_argument("--hidden", type=int, default=64, choices=(64, 128))
    ap.add_argument("--pairs", type=int, default=12000, help="generated pairs (default 12000)")
    ap.add_argument("--test", type=int, default=512, help="held-out sources decoded (default 512)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each timing (default 3)")
    for sp in (p, m):
        sp.error = ap.error
    args = ap.parse_args(argv)
    if args.stage is None and not (args.minutes > 0 and args.pairs >= 1000 and args.test >= 1 and args.reps >= 1):
        raise BenchError("--minutes must be > 0, --pairs ≥ 1000, --test and --reps ≥ 1")
    return args


def main(argv=None) -> int:
    try:
        args = parse(argv)
        if args.stage == "train-peer":
            print(json.dumps(train_peer(args.pairs, args.hidden, args.seconds, args.out)))
        elif args.stage == "measure":
            print(json.dumps(measure(args.nnb, args.peer, args.test, args.reps)))
        else:
            import tempfile

            from bench.common import machine_line
            print(machine_line() + "\n")
            with tempfile.TemporaryDirectory(prefix="nn2-s2s-") as d:
                print(table(run_both(Path(d), args.minutes, args.hidden, args.pairs, args.test, args.reps)).render())
    except BenchError as e:
        print(f"bench/seq2seq.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

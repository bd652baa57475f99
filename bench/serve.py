"""`nn2run serve` under load, on loopback: concurrent streaming clients against the same
model's offline batched generation, against the server with --max-batch 1, and past
--max-queue; with the grpc extra, gRPC streams beside HTTP streams on one server.
Bounded: one round of requests per level, every client with a timeout.

    .venv/bin/python bench/serve.py [--quick] [--grpc-only]    # or: bench/run.py --only serve

Clients are threads in this process, the server another process (its own interpreter),
so the clients' parsing does not hold the server's GIL; on a two-core machine they still
share the CPUs, which the figures include.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")       # as bench/run.py: before NumPy loads; the server inherits it

from bench.common import Table, build_lstm, verdict  # noqa: E402

LEVELS = (1, 8, 32, 128)
GRPC_LEVELS = (1, 32)
PROMPT = "ROMEO:\nWhat "


@dataclass
class Result:
    started: float
    status: int = 0
    reads: list = field(default_factory=list)      # (time, chars completed in this read)
    ended: float = 0.0


class Server:
    def __init__(self, model: Path, tmp: Path, *args):
        self.log = tmp / f"serve-{time.monotonic_ns()}.log"
        self._err = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "nn2run.serve", str(model), "--port", "0", "--quiet",
                                      "--max-tokens-limit", "100000", *map(str, args)],
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        end = time.monotonic() + 60
        while time.monotonic() < end and self.proc.poll() is None:
            text = self.log.read_text()
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", text)
            g = re.search(r"over gRPC on 127\.0\.0\.1:(\d+)", text)
            if m and (g or "--grpc-port" not in args):
                self.port = int(m.group(1))
                self.grpc_port = int(g.group(1)) if g else None
                return
            time.sleep(0.05)
        raise RuntimeError("the server did not start: " + self.log.read_text())

    def metrics(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self._err.close()


def _chars(events: str) -> int:
    n = 0
    for ev in events.split("\n\n"):
        if ev.startswith("data: {"):
            n += sum(len(c["text"]) for c in json.loads(ev[6:]).get("choices", []))
    return n


def _client(port: int, body: dict, barrier, out: list, i: int, timeout: float) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    payload = json.dumps(body)
    barrier.wait()
    res = Result(time.perf_counter())
    try:
        conn.request("POST", "/v1/completions", payload, {"Content-Type": "application/json"})
        r = conn.getresponse()
        res.status = r.status
        buf = ""
        while True:
            data = r.read1(65536)
            if not data:
                break
            now = time.perf_counter()
            buf += data.decode()
            cut = buf.rfind("\n\n") + 2
            if cut >= 2:
                res.reads.append((now, buf[:cut]))
                buf = buf[cut:]
        res.ended = time.perf_counter()
    except OSError:
        res.status = -1
    finally:
        conn.close()
    res.reads = [(t, _chars(text)) for t, text in res.reads]       # parsed after the clock stopped
    out[i] = res


def _grpc_client(port: int, body: dict, barrier, out: list, i: int, timeout: float) -> None:
    """As _client, over gRPC: a channel of its own (one connection, as each HTTP client has),
    connected before the clock starts (gRPC clients keep their channels; the HTTP/2 set-up
    costs about 10 ms once)."""
    import grpc

    from nn2run.proto import nn2_pb2, nn2_pb2_grpc
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = nn2_pb2_grpc.GeneratorStub(channel)
    request = nn2_pb2.GenerateRequest(prompt=body["prompt"], max_tokens=body["max_tokens"],
                                      temperature=body["temperature"], seed=body["seed"])
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        pass
    barrier.wait()
    res = Result(time.perf_counter())
    try:
        for reply in stub.Generate(request, timeout=timeout):
            res.reads.append((time.perf_counter(), len(reply.text)))
        res.status = 200
    except grpc.RpcError:
        res.status = -1
    res.ended = time.perf_counter()
    channel.close()
    out[i] = res


def load_round(server: Server, clients: int, max_tokens: int, stream: bool = True, timeout: float = 120.0,
               grpc: bool = False):
    """One round: `clients` requests at once (over gRPC when asked); (results, rows per step in the round)."""
    before = server.metrics()
    barrier = threading.Barrier(clients)
    out = [None] * clients
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "stream": stream, "temperature": 1.0}
    client, port = (_grpc_client, server.grpc_port) if grpc else (_client, server.port)
    threads = [threading.Thread(target=client, args=(port, {**body, "seed": i}, barrier, out, i, timeout))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    after = server.metrics()
    steps = after["nn2_rows_per_step_count"] - before["nn2_rows_per_step_count"]
    rows = (after["nn2_rows_per_step_sum"] - before["nn2_rows_per_step_sum"]) / max(steps, 1)
    return [r for r in out if r is not None], rows


def _pct(xs, q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summarize(results) -> dict:
    ok = [r for r in results if r.status == 200]
    chars = sum(c for r in ok for _, c in r.reads)
    span = max(r.ended for r in ok) - min(r.started for r in ok)
    ttft = [next(t for t, c in r.reads if c) - r.started for r in ok if any(c for _, c in r.reads)]
    gaps = []
    for r in ok:
        times = [t for t, c in r.reads if c]
        gaps += [b - a for a, b in zip(times, times[1:])]
    return {"cps": chars / span, "ttft50": _pct(ttft, 0.5), "ttft99": _pct(ttft, 0.99), "gap99": _pct(gaps, 0.99),
            "ok": len(ok), "chars": chars}


def offline_cps(model_path: Path, batch: int, max_tokens: int) -> float:
    """The same model, prompt and length through nn2run.generate at `batch` streams."""
    from nn2run import load
    from nn2run.generate import generate
    from nn2run.sample import Sampler, SamplerConfig
    model = load(model_path)
    prime = model.codec.encode(PROMPT)
    sampler = Sampler(SamplerConfig(temperature=1.0), seed=0)
    t0 = time.perf_counter()
    for _ in generate(model, [prime] * batch, max_tokens, sampler):
        pass
    seconds = time.perf_counter() - t0
    model.close()
    return batch * max_tokens / seconds


class Latency:
    """Per level: the figures a client sees (rendered like the other tables)."""

    def __init__(self, title):
        self.title, self.rows = title, []

    def render(self) -> str:
        head = "| clients | chars/s | TTFT p50 | TTFT p99 | gap p99 | rows/step |"
        out = [f"### {self.title}", "", head, "|---|---|---|---|---|---|"]
        out += [f"| {n} | {s['cps']:,.0f} | {s['ttft50'] * 1e3:.1f} ms | {s['ttft99'] * 1e3:.1f} ms | "
                f"{s['gap99'] * 1e3:.1f} ms | {rows:.1f} |" for n, s, rows in self.rows]
        return "\n".join(out) + "\n"


def bench_serve(tmp: Path, quick: bool):
    hidden, max_tokens, reps = 256, (64 if quick else 256), (1 if quick else 3)
    path = tmp / f"serve-2x{hidden}.nnb"
    if not path.exists():
        build_lstm(path, hidden)
    lat = Latency(f"nn2run serve, 2×{hidden} LSTM, {max_tokens} tokens per streaming request (loopback)")
    eff = Table("server vs offline batched generation at the same batch (chars/s)")
    gain = Table("continuous batching: --max-batch 128 vs --max-batch 1 (chars/s, 32 clients)")
    over = Table("overload: 64 requests at once, --max-batch 8 --max-queue 8 (not streamed)")
    server = Server(path, tmp, "--max-batch", 128, "--max-queue", 1024)
    try:
        load_round(server, 8, 8)                        # warm: VMs built, code paths hot
        at32 = None
        for n in LEVELS:
            # rounds alternate with the offline runs (drift hits both); the best of each is kept
            rounds, offs = [], []
            for _ in range(reps):
                results, rows = load_round(server, n, max_tokens)
                rounds.append((summarize(results), rows))
                offs.append(offline_cps(path, n, max_tokens))
            s, rows = max(rounds, key=lambda r: r[0]["cps"])
            off = max(offs)
            at32 = s if n == 32 else at32
            lat.rows.append((n, s, rows))
            eff.add(f"{n} clients", f"{s['cps']:,.0f}", f"{off:,.0f} offline", verdict(s["cps"] / off, at_least=0.7),
                    "≥ 0.7×")
            eff.raw.append(f"{n} clients: {s['ok']}/{n} answered 200, {s['chars']} chars; server chars/s "
                           f"{[round(r[0]['cps']) for r in rounds]}, offline {[round(o) for o in offs]}")
    finally:
        server.close()
    single = Server(path, tmp, "--max-batch", 1, "--max-queue", 1024)
    try:
        load_round(single, 2, 8)
        s1 = summarize(load_round(single, 32, max_tokens, timeout=600)[0])
    finally:
        single.close()
    gain.add("32 clients", f"{at32['cps']:,.0f}", f"{s1['cps']:,.0f} at batch 1", verdict(at32["cps"] / s1["cps"],
             at_least=5.0), "≥ 5×")
    gain.raw.append(f"batch 1: TTFT p50 {s1['ttft50'] * 1e3:.0f} ms, p99 {s1['ttft99'] * 1e3:.0f} ms")
    small = Server(path, tmp, "--max-batch", 8, "--max-queue", 8)
    try:
        results, _ = load_round(small, 64, max_tokens, stream=False)
    finally:
        small.close()
    refused = sum(r.status == 429 for r in results)
    accepted = [r.ended - r.started for r in results if r.status == 200]
    over.add("share answered 429", f"{refused}/{len(results)}", "", "", "> 0 (the queue bounds it)")
    over.add("p99 latency of the accepted", f"{_pct(accepted, 0.99) * 1e3:.0f} ms", f"{len(accepted)} accepted", "",
             "")
    over.notes.append("8 run, 8 wait, the rest are refused at once with Retry-After")
    return [lat, eff, gain, over] + bench_grpc(tmp, quick)


def bench_grpc(tmp: Path, quick: bool):
    """gRPC streams beside HTTP streams, one server (`--grpc-port`), rounds alternating."""
    hidden, max_tokens, reps = 256, (64 if quick else 256), (1 if quick else 3)
    title = f"gRPC beside HTTP, one server, 2×{hidden} LSTM, {max_tokens} tokens per streaming request (loopback)"
    table = Table(title)
    try:
        import grpc  # noqa: F401
    except ImportError:
        table.notes.append('not run: needs the grpc extra (pip install "nn2[grpc]")')
        return [table]
    path = tmp / f"serve-2x{hidden}.nnb"
    if not path.exists():
        build_lstm(path, hidden)
    server = Server(path, tmp, "--max-batch", 128, "--max-queue", 1024, "--grpc-port", 0)
    try:
        load_round(server, 8, 8)
        load_round(server, 8, 8, grpc=True)
        for n in GRPC_LEVELS:
            best = {}
            for _ in range(reps):
                for over_grpc in (False, True):
                    s = summarize(load_round(server, n, max_tokens, grpc=over_grpc)[0])
                    if s["cps"] > best.get(over_grpc, {"cps": 0})["cps"]:
                        best[over_grpc] = s
            h, g = best[False], best[True]
            table.add(f"{n} client{'s' if n > 1 else ''}: chars/s", f"{g['cps']:,.0f} gRPC", f"{h['cps']:,.0f} HTTP",
                      verdict(g["cps"] / h["cps"], at_least=0.8), "≥ 0.8×")
            table.add(f"{n} client{'s' if n > 1 else ''}: TTFT p50 / p99",
                      f"{g['ttft50'] * 1e3:.1f} / {g['ttft99'] * 1e3:.1f} ms",
                      f"{h['ttft50'] * 1e3:.1f} / {h['ttft99'] * 1e3:.1f} ms", "", "")
            table.raw.append(f"{n} clients: gRPC {g['ok']}/{n} ok, {g['chars']} chars; HTTP {h['ok']}/{n}, "
                             f"{h['chars']} chars")
    finally:
        server.close()
    table.notes.append("a gRPC client's channel is connected before the clock starts; an HTTP client connects after")
    return [table]


def main() -> int:
    import argparse
    import tempfile
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter requests (~1 minute)")
    ap.add_argument("--grpc-only", action="store_true", help="only gRPC beside HTTP")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nn2-bench-serve-") as d:
        t0 = time.perf_counter()
        for table in (bench_grpc if args.grpc_only else bench_serve)(Path(d), args.quick):
            print(table.render(), flush=True)
        print(f"(serve: {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

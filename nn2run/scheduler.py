"""Continuous batching: one scheduler thread owns a model's VMs and steps every live row.

A request is one row per choice. At each step boundary rows that finished, whose client
went away or that ran past their deadline leave; waiting rows join with a zero state;
then every row is fed its next prompt token or its last sample and the VM steps once.
Each row samples with its own random generator, so what it draws does not depend on
which other requests share the step.

Live rows are packed at the front of the batch (a leaving row's place is taken by the
last row, whose state is copied into it). The VM runs at the smallest power-of-two batch
that holds the live rows (capped at max_batch), so a lone request steps a batch of one;
when that size changes the live states are copied into the other VM.

Imports NumPy and the standard library only.
"""

from __future__ import annotations

import abc
import collections
import itertools
import queue
import sys
import threading
import time
import traceback

import numpy as np

from .codec import CodecError
from .sample import Sampler, SamplerConfig, stream

MAX_SAMPLERS = 64      # sampler settings kept between steps (each a config and a generator)


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller answers 429."""


class Histogram:
    """Cumulative buckets, a sum and a count (Prometheus' histogram)."""

    def __init__(self, bounds):
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = 0
        while i < len(self.bounds) and value > self.bounds[i]:
            i += 1
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def cumulative(self):
        """[(upper bound or '+Inf', observations ≤ it)]."""
        total, out = 0, []
        for bound, c in zip(self.bounds + ["+Inf"], self.counts):
            total += c
            out.append((bound, total))
        return out


class Request:
    """What the scheduler runs for one HTTP request: one row per (prompt, choice).

    The scheduler puts events on `events`: (index, text, finish) with finish None while
    the choice goes on, "stop" or "length" when it ends; ("timeout",) when the deadline
    passed, ("failed",) when the step raised (a bug: logged, the request ends),
    ("shutdown",) when the server stopped before the request finished. Setting `cancelled`
    makes its rows leave at the next step.
    """

    def __init__(self, primes, max_tokens: int, temperature: float, top_k, top_p, seed, stops,
                 deadline: float, decoders):
        self.primes, self.max_tokens = primes, max_tokens
        self.seed = seed
        # the rows' sampler settings (the transports checked the values): rows that share
        # them sample in one call (`sample_rows`)
        self.config = SamplerConfig(temperature=temperature or 1.0, top_k=top_k, top_p=top_p,
                                    greedy=temperature == 0)
        self.setting = (self.config.temperature, top_k, top_p, self.config.greedy)   # a fast key
        self.stops = [s for s in stops if s]
        self.deadline = deadline
        self.decoders = decoders
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.arrival = time.monotonic()
        self.first_token_at = None
        self.open_rows = len(primes)
        self.generated = 0          # tokens sampled, over all rows
        self.stream = True          # False: each choice's text comes in one event, when it ends
        # called (on the scheduler thread) when its transport should send now rather than at
        # its next tick: the first token is out, or a choice ended
        self.wake = None

    def rng(self, index: int):
        # choice 0 draws like `nn2run --seed S`; the others from streams derived from the seed
        return stream(self.seed, index)


class Row:
    """One choice being generated: the prompt still to feed, the text held back for stops."""

    __slots__ = ("request", "index", "prime", "pos", "last", "generated", "held", "out", "rng", "decode", "key")
    _keys = itertools.count()

    def __init__(self, request: Request, index: int):
        self.request, self.index = request, index
        self.prime = request.primes[index]
        self.pos = 0
        self.last = 0
        self.generated = 0
        self.held = ""
        self.out = []           # released text kept for a request that is not streamed
        self.rng = request.rng(index)
        self.decode = request.decoders[index]
        self.key = next(Row._keys)     # the row's stream for a codec that decodes a whole step at once

    def next_input(self) -> int:
        if self.pos < len(self.prime):
            self.pos += 1
            return self.prime[self.pos - 1]
        return self.last

    def sampling(self) -> bool:
        """Whether this step's logits are for a new token (the prompt has been fed)."""
        return self.pos >= len(self.prime)

    def take(self, token: int, text: str | None = None) -> str | None:
        """Accept a sampled token (and its text, when the step was decoded at once); returns
        the finish reason once the choice is done."""
        self.last = token
        self.generated += 1
        self.held += self.decode(token) if text is None else text
        # the earliest stop string in the text, whichever of them it is (a token of several
        # characters can hold more than one)
        ends = [at for at in (self.held.find(s) for s in self.request.stops) if at >= 0]
        if ends:
            self.held = self.held[:min(ends)]
            return "stop"
        if self.generated >= self.request.max_tokens:
            return "length"
        return None

    def releasable(self) -> str:
        """The held text that can no longer turn into a stop string: sent now."""
        keep = 0
        for s in self.request.stops:
            for k in range(min(len(s) - 1, len(self.held)), keep, -1):
                if self.held.endswith(s[:k]):
                    keep = k
                    break
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out


class Samplers:
    """A sampler per setting, kept from step to step; all share one set of scratch arrays
    (they draw one after the other). Past MAX_SAMPLERS settings, those a step did not use
    are dropped (each is a config and a generator)."""

    def __init__(self):
        self._by_setting: dict = {}
        self._scratch: dict = {}

    def __len__(self) -> int:
        return len(self._by_setting)

    def get(self, setting: tuple, config: SamplerConfig) -> Sampler:
        if setting not in self._by_setting:
            self._by_setting[setting] = Sampler(config, scratch=self._scratch)
        return self._by_setting[setting]

    def trim(self, used) -> None:
        if len(self._by_setting) > MAX_SAMPLERS:
            for setting in [k for k in self._by_setting if k not in used]:
                del self._by_setting[setting]


def sample_rows(logits: np.ndarray, rows: list[Row], samplers: Samplers | None = None) -> np.ndarray:
    """One token per row, each with its request's temperature, top-k and top-p and its own
    generator: the rows of each setting in one `nn2run.sample.Sampler.draw`, so a row
    draws what `nn2run --seed` draws from the same logits; temperature 0 takes the most
    likely token."""
    samplers = Samplers() if samplers is None else samplers
    groups: dict = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.request.setting, []).append(i)
    out = np.empty(len(rows), np.intp)
    for setting, idx in groups.items():
        part = logits if len(idx) == len(rows) else logits[idx]
        sampler = samplers.get(setting, rows[idx[0]].request.config)
        out[idx] = sampler.draw(part, [rows[i].rng.random for i in idx])
    samplers.trim(groups)
    return out


class Worker(abc.ABC):
    """One thread that owns a model: `start` it once; `stop` ends its loop (`_run`, which
    returns when it sees `_stopping` under `_cond`)."""

    thread_name = "nn2-worker"

    def __init__(self, model, max_batch: int, max_queue: int):
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self._cond = threading.Condition()
        self._stopping = self._aborting = False
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    @abc.abstractmethod
    def _run(self) -> None:
        """The worker's loop."""

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=5)


YIELD_EVERY = 0.002     # seconds of steps between two hand-overs of the interpreter


def _yield_now_and_then(last: float) -> float:
    """Let the HTTP and gRPC threads run every YIELD_EVERY seconds of steps.

    A small model's steps are NumPy calls too short to release the interpreter lock, and a
    thread waiting for it lost out to the step loop so often that a /health or /metrics
    request waited for a whole stream to end (0.5-1 s behind one 20,000-token stream of a
    16-unit model, ~1 ms when idle). sleep(0) releases the lock so a waiting thread takes it
    at once; once every 2 ms it costs nothing measurable."""
    now = time.perf_counter()
    if now - last < YIELD_EVERY:
        return last
    time.sleep(0)
    return now


class Scheduler(Worker):
    """Owns the model's VMs; call `submit` from any thread, `start` once."""

    thread_name = "nn2-scheduler"

    def __init__(self, model, max_batch: int = 64, max_queue: int = 256):
        super().__init__(model, max_batch, max_queue)
        self._waiting: collections.deque = collections.deque()    # requests not yet given rows
        self._pending: collections.deque = collections.deque()    # rows of admitted requests
        self._rows: list[Row] = []
        self._vm = None
        self._samplers = Samplers()
        # a codec served elsewhere decodes every row of a step in one call (nn2run.grpc.codec)
        self._decoder = model.codec.step_decoder() if hasattr(model.codec, "step_decoder") else None
        # figures for /metrics (written by the scheduler thread, read without a lock: ints)
        self.steps = 0
        self.tokens = 0
        self.rows_per_step = Histogram([1, 2, 4, 8, 16, 32, 64, 128, 256])
        self.ttft = Histogram([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10])

    # --- any thread ----------------------------------------------------------------
    def abort(self) -> None:
        """End every request now, queued or running, with a ("shutdown",) event."""
        with self._cond:
            self._aborting = True
            self._cond.notify()

    def submit(self, request: Request) -> None:
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                # requests whose client left while they waited give their places up
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
            if len(self._waiting) >= self.max_queue and not self._room():
                raise QueueFull()
            self._waiting.append(request)
            self._cond.notify()

    def _room(self) -> bool:
        """Whether a request submitted now gets a row at the next step (so does not wait:
        with --max-queue 0 it is the only kind taken). Under the lock."""
        rows = len(self._rows) + len(self._pending) + sum(len(r.primes) for r in self._waiting if not r.cancelled)
        return rows < self.max_batch

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def queued(self) -> int:
        """Rows waiting for a place in the batch (of requests admitted or not)."""
        return len(self._pending) + sum(len(r.primes) for r in list(self._waiting) if not r.cancelled)

    def idle(self) -> bool:
        return not self._rows and not self._waiting and not self._pending

    # --- the scheduler thread -----------------------------------------------------
    def _run(self) -> None:
        pending = self._pending
        last = time.perf_counter()
        while True:
            with self._cond:
                while not self._rows and not self._waiting and not pending and not self._stopping \
                        and not self._aborting:
                    self._cond.wait()
                if self._stopping:
                    return
                abort, self._aborting = self._aborting, False
                waiting = list(self._waiting) if abort else []
                if abort:
                    self._waiting.clear()
                # a request leaves the queue only when the batch has room for its first row
                while self._waiting and len(self._rows) + len(pending) < self.max_batch:
                    req = self._waiting.popleft()
                    pending.extend(Row(req, i) for i in range(len(req.primes)))
            if abort:
                self._fail_all(pending, ("shutdown",), waiting)
                continue
            try:
                self._leave_expired()
                self._join(pending)
                if self._rows:
                    with np.errstate(all="ignore"):
                        self._step()
                last = _yield_now_and_then(last)
            except CodecError as e:     # the codec service failed or went away: one line, not a bug
                print(f"nn2run: {e}", file=sys.stderr)
                self._fail_all(pending, ("failed",))
            except Exception:       # noqa: BLE001 — a bug must end its requests, not the server
                traceback.print_exc(file=sys.stderr)
                self._fail_all(pending, ("failed",))

    def _fail_all(self, pending, event: tuple, waiting=()) -> None:
        rows = list(self._rows) + list(pending)
        for req in {id(r): r for r in [row.request for row in rows] + list(waiting)}.values():
            req.cancelled = True
            req.events.put(event)
        if self._decoder is not None:
            for row in self._rows:
                self._decoder.end(row.key)
        self._rows.clear()
        pending.clear()
        self._vm = None

    def _leave_expired(self) -> None:
        now = time.monotonic()
        for i in reversed(range(len(self._rows))):
            req = self._rows[i].request
            if req.cancelled or now > req.deadline:
                self._timeout(req, now)
                self._remove(i)

    @staticmethod
    def _timeout(req: Request, now: float) -> None:
        if not req.cancelled and now > req.deadline:
            req.cancelled = True
            req.events.put(("timeout",))

    def _join(self, pending) -> None:
        now = time.monotonic()
        while pending and len(self._rows) < self.max_batch:
            row = pending.popleft()
            if row.request.cancelled or now > row.request.deadline:
                self._timeout(row.request, now)
                continue
            self._resize(len(self._rows) + 1)
            i = len(self._rows)
            for a in self._vm.state_arrays():
                a[i] = 0.0
            self._rows.append(row)

    def _resize(self, n: int) -> None:
        """Step at the smallest power-of-two batch ≥ n (≤ max_batch), moving the live states."""
        batch = min(1 << max(n - 1, 0).bit_length(), self.max_batch)
        if self._vm is not None and self._vm.batch == batch:
            return
        vm = self.model.vm(batch)
        vm.reset()
        if self._vm is not None:
            live = len(self._rows)
            for old, new in zip(self._vm.state_arrays(), vm.state_arrays()):
                new[:live] = old[:live]
        self._vm = vm

    def _remove(self, i: int) -> None:
        if self._decoder is not None:
            self._decoder.end(self._rows[i].key)
        last = len(self._rows) - 1
        if i != last:
            for a in self._vm.state_arrays():
                a[i] = a[last]
            self._rows[i] = self._rows[last]
        self._rows.pop()

    def _step(self) -> None:
        rows, vm = self._rows, self._vm
        ids = np.zeros(vm.batch, np.intp)
        for i, r in enumerate(rows):
            ids[i] = r.next_input()
        logits = vm.advance(ids)
        self.steps += 1
        self.rows_per_step.observe(len(rows))
        sampling = [i for i, r in enumerate(rows) if r.sampling()]
        if not sampling:
            return
        tokens = sample_rows(logits[:len(rows)] if len(sampling) == len(rows) else logits[sampling],
                             [rows[i] for i in sampling], self._samplers)
        texts = self._decode(rows, sampling, tokens.tolist())
        now = time.monotonic()
        self.tokens += len(sampling)
        done, woken = [], {}
        for i, tok, text in zip(sampling, tokens.tolist(), texts):
            r = rows[i]
            req = r.request
            if req.first_token_at is None:
                req.first_token_at = now
                self.ttft.observe(now - req.arrival)
                woken[id(req)] = req
            req.generated += 1
            finish = r.take(tok, text)
            if finish:
                r.out.append(r.held)
                req.events.put((r.index, "".join(r.out), finish))
                done.append(i)
                woken[id(req)] = req
            else:
                text = r.releasable()
                if text and req.stream:
                    req.events.put((r.index, text, None))
                elif text:
                    r.out.append(text)
        for req in woken.values():
            if req.wake is not None:
                try:
                    req.wake()
                except Exception:   # noqa: BLE001 — its transport is gone (a closed event loop):
                    pass            # the events are on the queue; the other rows go on
        for i in reversed(done):
            self._remove(i)
        if len(rows) < (self._vm.batch >> 1):
            self._resize(len(rows))

    def _decode(self, rows: list[Row], sampling: list[int], tokens: list[int]) -> list:
        """Each sampled token's text in one call of a step decoder; None for each (the rows
        decode their own) otherwise."""
        if self._decoder is None:
            return [None] * len(tokens)
        for i in sampling:
            if rows[i].generated == 0:
                self._decoder.start(rows[i].key, rows[i].prime)
        return self._decoder([(rows[i].key, t) for i, t in zip(sampling, tokens)])

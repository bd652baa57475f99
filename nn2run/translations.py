"""`nn2run serve` for a seq2seq model: POST /v1/translations and the worker that batches it.

A request is a `Job`: its texts encoded and checked on the thread that received it, then
queued. One worker thread owns the model: it takes every job waiting (up to --max-batch
rows, a row being one text's beam), groups their texts by search options (beam, length
penalty, max_len), sorts each group by length into batches as `nn2run translate` does,
searches, and hands each job its hypotheses. A job whose client went away or whose
deadline passed is skipped where it stands; the worker never touches a connection.

The HTTP route and gRPC's Translate (`nn2run.grpc.server`) read requests by the same rules
(`parse_translation`), so both refuse the same things with the same words.

Imports NumPy (through the model) and the standard library only.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from .completions import ApiError, parse_json
from .scheduler import Histogram, QueueFull, Worker
from .seq2seq import MAX_PENALTY

MAX_TEXTS = 64
MAX_BEAM = 64
MAX_LEN = (1 << 31) - 1
WAIT_TICK = 0.05      # seconds between checks that the client is still there
KNOWN = ("model", "texts", "beam", "n_best", "length_penalty", "max_len")


@dataclass(frozen=True)
class Options:
    beam: int = 1
    n_best: int | None = None
    length_penalty: float = 1.0
    max_len: int | None = None

    def search_key(self) -> tuple:
        """Texts with the same key can be searched in one batch."""
        return self.beam, self.length_penalty, self.max_len


def _integer(obj: dict, key: str, low: int, high: int, what: str):
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{key}' must be an integer", param=key, code="invalid_type")
    if not low <= v <= high:
        raise ApiError(400, f"'{key}' must be {what}, got {v}", param=key, code="out_of_range")
    return v


def parse_translation(body: bytes, model, model_name: str) -> tuple[list[str], list[list[int]], Options]:
    """(texts, their token ids, options) of a /v1/translations body; an ApiError names the
    parameter, or the text and its problem."""
    obj = parse_json(body)
    for key in obj:
        if key not in KNOWN:
            raise ApiError(400, f"unrecognized request argument supplied: {key}", param=key,
                           code="unknown_parameter")
    name = obj.get("model")
    if name is not None and name != model_name:
        raise ApiError(404, f"the model '{name}' does not exist; this server has '{model_name}'",
                       param="model", code="model_not_found")
    texts = obj.get("texts")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "'texts' must be a list of strings", param="texts", code="invalid_type")
    if not 1 <= len(texts) <= MAX_TEXTS:
        raise ApiError(400, f"'texts' must hold 1 to {MAX_TEXTS} texts, got {len(texts)}", param="texts",
                       code="out_of_range")
    beam = _integer(obj, "beam", 1, MAX_BEAM, f"between 1 and {MAX_BEAM}") or 1
    n_best = _integer(obj, "n_best", 1, MAX_BEAM, f"between 1 and {MAX_BEAM}")
    if n_best is not None and n_best > beam:
        raise ApiError(400, f"'n_best' must be at most 'beam' ({beam}), got {n_best}", param="n_best",
                       code="out_of_range")
    max_len = _integer(obj, "max_len", 1, MAX_LEN, "a positive integer")      # the model's limit caps it
    alpha = obj.get("length_penalty")
    if alpha is None:
        alpha = 1.0
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ApiError(400, "'length_penalty' must be a number", param="length_penalty", code="invalid_type")
    elif not 0 <= alpha <= MAX_PENALTY:
        raise ApiError(400, f"'length_penalty' must be a number >= 0 and <= {MAX_PENALTY}, got {alpha!r}",
                       param="length_penalty", code="out_of_range")
    return texts, [_source(model, i, t) for i, t in enumerate(texts)], Options(beam, n_best, float(alpha), max_len)


def _source(model, index: int, text: str) -> list[int]:
    unknown = model.unknown(text)
    if unknown:
        raise ApiError(400, f"texts[{index}]: characters not in the model's vocabulary: "
                       + ", ".join(repr(c) for c in unknown[:10]), param="texts", code="unknown_characters")
    ids = model.codec.encode(text) if text else []
    limit = model.limits["source"]
    if len(ids) > limit:
        raise ApiError(400, f"texts[{index}]: {len(ids)} tokens, longer than the model's source limit of {limit}",
                       param="texts", code="text_too_long")
    return ids


class Job:
    """One request's texts, waiting for the worker. When `done` is set, `result` holds per
    text its hypotheses (best first) or `failure` says why not ("timeout", "shutdown",
    "cancelled" (the client left), "failed" (a bug) or an ApiError)."""

    def __init__(self, sources: list[list[int]], options: Options, deadline: float):
        self.sources, self.options, self.deadline = sources, options, deadline
        self.arrival = time.monotonic()
        self.result: list = [None] * len(sources)
        self.failure = None
        self.cancelled = False
        self.done = threading.Event()
        self._lock = threading.Lock()       # the worker and a waiter that gave up may both finish it
        self.on_done = None         # called on the worker's thread once done is set (gRPC wakes its loop)
        self.left = sum(1 for s in sources if s)

    @property
    def rows(self) -> int:
        return max(self.left, 1) * self.options.beam

    def finish(self, failure=None) -> None:
        with self._lock:
            if self.done.is_set():
                return
            self.failure = failure
            self.done.set()
        if self.on_done is not None:
            self.on_done()


class TranslationWorker(Worker):
    """Owns a seq2seq model's searches; `submit` from any thread, `start` once. Has what
    the drain (`nn2run.httpd.drain`) asks of a scheduler: idle(), abort(), stop()."""

    thread_name = "nn2-translator"

    def __init__(self, model, max_batch: int = 64, max_queue: int = 256):
        super().__init__(model, max_batch, max_queue)
        self._waiting: collections.deque[Job] = collections.deque()
        self._taken: list[Job] = []
        # figures for /metrics (written by the worker, read without a lock: ints)
        self.running = 0            # texts in the search now
        self.translated = 0
        self.tokens = 0
        self.batches = 0
        self.texts_per_batch = Histogram([1, 2, 4, 8, 16, 32, 64, 128, 256])

    # --- any thread ----------------------------------------------------------------
    def abort(self) -> None:
        """End every job now, queued or being translated, with "shutdown"."""
        with self._cond:
            self._aborting = True
            for job in list(self._waiting) + self._taken:
                job.finish("shutdown")
            self._waiting.clear()

    def submit(self, job: Job) -> None:
        with self._cond:
            # a job the idle worker takes at once does not wait (with --max-queue 0 the only kind taken)
            room = not self._taken and sum(j.rows for j in self._waiting) + job.rows <= self.max_batch
            if len(self._waiting) >= self.max_queue and not room:
                raise QueueFull()
            self._waiting.append(job)
            self._cond.notify()

    @property
    def queued(self) -> int:
        """Texts waiting for the worker."""
        return sum(len(j.sources) for j in list(self._waiting))

    def idle(self) -> bool:
        return not self._waiting and not self._taken

    # --- the worker thread ----------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                self._aborting = False
                rows, taken = 0, []
                while self._waiting and (not taken or rows + self._waiting[0].rows <= self.max_batch):
                    job = self._waiting.popleft()
                    if job.cancelled or job.done.is_set():      # its client left or gave up: no rows
                        job.finish("cancelled")
                        continue
                    rows += job.rows
                    taken.append(job)
                self._taken = taken
            try:
                self._translate(taken)
            except Exception:       # noqa: BLE001 — a bug must end its requests, not the server
                traceback.print_exc(file=sys.stderr)
                for job in taken:
                    job.finish("failed")
            finally:
                self.running = 0
                with self._cond:
                    self._taken = []

    def _translate(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list] = {}
        for job in jobs:
            for i, ids in enumerate(job.sources):
                if ids:
                    groups.setdefault(job.options.search_key(), []).append((job, i, ids))
                else:
                    job.result[i] = []          # an empty text: an empty translation
            if not job.left:
                job.finish()
        for (beam, alpha, max_len), items in groups.items():
            items.sort(key=lambda item: len(item[2]))
            per_batch = max(1, self.max_batch // beam)
            for at in range(0, len(items), per_batch):
                self._search([it for it in items[at:at + per_batch] if self._live(it[0])], beam, alpha, max_len)

    def _live(self, job: Job) -> bool:
        if self._aborting or job.done.is_set():
            return False
        if job.cancelled:
            job.finish("cancelled")
            return False
        if time.monotonic() > job.deadline:
            job.finish("timeout")
            return False
        return True

    def _search(self, items: list, beam: int, alpha: float, max_len) -> None:
        if not items:
            return
        self.running = len(items)
        try:
            found = self.model.search([ids for _, _, ids in items], beam, alpha, max_len)
        except ValueError as e:     # the model cannot hold this batch (its memory bound): say so
            for job in {id(j): j for j, _, _ in items}.values():
                job.finish(ApiError(400, str(e), code="too_large"))
            return
        self.batches += 1
        self.texts_per_batch.observe(len(items))
        for (job, i, _), hyps in zip(items, found):
            job.result[i] = hyps
            job.left -= 1
            self.translated += 1
            self.tokens += len(hyps[0].tokens)
            if not job.left:
                job.finish()


def hypotheses(model, job: Job, n: int) -> list[list[tuple[str, float]]]:
    """Per text of a finished job its n best (translation, average log-probability)."""
    return [[(model.detokenize(h.tokens), h.score) for h in hyps[:n]] if hyps else [("", 0.0)]
            for hyps in job.result]


def answers(model, job: Job) -> list:
    """The job's result as /v1/translations gives it: per text the best translation, or
    with n_best a list of {"text", "score"}."""
    n_best = job.options.n_best
    found = hypotheses(model, job, n_best or 1)
    if n_best is None:
        return [pairs[0][0] for pairs in found]
    return [[{"text": t, "score": s} for t, s in pairs] for pairs in found]


def failure_error(job: Job) -> ApiError:
    f = job.failure
    if isinstance(f, ApiError):
        return f
    if f == "shutdown":
        return ApiError(503, "the server stopped before the request finished", "server_error", code="shutdown")
    if f == "cancelled":
        return ApiError(499, "the client went away", "server_error", code="cancelled")
    if f == "timeout":
        return ApiError(504, f"the request ran past its deadline ({job.deadline - job.arrival:.3g} s after it came)",
                        "server_error", code="timeout")
    return ApiError(500, "internal error", "server_error")


def translations_route(app, body: bytes, alive, deadline) -> tuple[int, dict]:
    """POST /v1/translations on a seq2seq server: (status, JSON object); 499: the client left."""
    _, sources, options = parse_translation(body, app.model, app.name)
    if app.draining:
        raise ApiError(503, "the server is shutting down", "server_error", code="draining",
                       headers={"Retry-After": "5"})
    until = time.monotonic() + app.settings.request_timeout
    job = Job(sources, options, min(until, deadline) if deadline else until)
    try:
        app.scheduler.submit(job)
    except QueueFull:
        raise ApiError(429, "the queue is full; retry later", "server_error", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    while not job.done.wait(WAIT_TICK):
        if not alive():
            job.cancelled = True
            return 499, {}
        if time.monotonic() > job.deadline + WAIT_TICK:     # the worker is busy elsewhere: stop waiting
            job.cancelled = True
            job.finish("timeout")
    if job.failure is not None:
        raise failure_error(job)
    return 200, {"model": app.name, "translations": answers(app.model, job)}


def render_metrics(app) -> str:
    """GET /metrics on a seq2seq server: Prometheus text."""
    w = app.scheduler
    lines = ["# HELP nn2_requests_total Requests answered, by HTTP status.", "# TYPE nn2_requests_total counter"]
    for status, count in sorted(dict(app.by_status).items()):
        lines.append(f'nn2_requests_total{{status="{status}"}} {count}')
    for name, kind, text, value in (
            ("nn2_texts_running", "gauge", "Texts in the search now.", w.running),
            ("nn2_texts_queued", "gauge", "Texts waiting for the worker.", w.queued),
            ("nn2_texts_translated_total", "counter", "Texts translated.", w.translated),
            ("nn2_tokens_generated_total", "counter", "Tokens of the best translations.", w.tokens),
            ("nn2_search_batches_total", "counter", "Batches searched.", w.batches),
            ("nn2_draining", "gauge", "1 while the server drains before exit.", int(app.draining))):
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ["# HELP nn2_texts_per_batch Texts in each batch searched.", "# TYPE nn2_texts_per_batch histogram"]
    for bound, count in w.texts_per_batch.cumulative():
        lines.append(f'nn2_texts_per_batch_bucket{{le="{bound}"}} {count}')
    lines += [f"nn2_texts_per_batch_sum {w.texts_per_batch.sum:.6f}",
              f"nn2_texts_per_batch_count {w.texts_per_batch.count}"]
    return "\n".join(lines) + "\n"

"""The routes of the server, independent of the transport: (method, path, headers, body)
in, a `Response` out. The HTTP server (`nn2run.serve`) and the Lambda handler
(`nn2run.aws`) both answer through `App.handle`.

Routes: GET / (the playground), GET /health, GET /v1/models (and /v1/models/ID), GET /metrics,
POST /v1/completions (OpenAI's completions shape, streamed as server-sent events when
asked), POST /tokenize, POST /detokenize; HEAD is GET without the body; OPTIONS
answers CORS preflights. A seq2seq model has POST /v1/translations
(`nn2run.translations`) instead of the playground, completions and the tokenizer routes;
each kind's routes on the other answer 404 naming the model's kind.
Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}; an
unexpected exception is logged and answered 500 without its details.

Imports NumPy and the standard library only.
"""

from __future__ import annotations

import hmac
import html
import json
import queue
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .codec import CodecError
from .completions import ApiError, parse_completion, parse_tokens
from .scheduler import QueueFull, Request, Scheduler

MAX_BODY = 1 << 20
PUBLIC = {("GET", "/health"), ("GET", "/")}
ROUTES = {"/": {"GET"}, "/health": {"GET"}, "/v1/models": {"GET"}, "/v1/models/{id}": {"GET"}, "/metrics": {"GET"},
          "/v1/completions": {"POST"}, "/tokenize": {"POST"}, "/detokenize": {"POST"},
          "/v1/translations": {"POST"}}
LANGUAGE_ONLY = {"/", "/v1/completions", "/tokenize", "/detokenize"}
SEQ2SEQ_ONLY = {"/v1/translations"}
WAIT_TICK = 0.05      # seconds between checks that the client is still there


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    stream: EventStream | None = None     # server-sent events, written as they come


def _json(obj) -> bytes:
    # a lone surrogate (valid in a JSON string's escapes, so in a request's echoed values)
    # has no UTF-8: it goes out as the escape it came in as, \udXXX
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace")


def json_response(status: int, obj, headers: dict | None = None) -> Response:
    return Response(status, _json(obj), {"Content-Type": "application/json", **(headers or {})})


def error_response(e: ApiError) -> Response:
    return json_response(e.status, e.body(), e.headers)


@dataclass
class Settings:
    max_tokens_default: int = 256
    max_tokens_limit: int = 4096
    max_body: int = MAX_BODY
    request_timeout: float = 120.0
    api_key: str | None = None
    cors: str | None = None


class App:
    """The model, its scheduler and the counters behind /metrics."""

    def __init__(self, model, name: str, scheduler: Scheduler, settings: Settings):
        self.model, self.name, self.scheduler, self.settings = model, name, scheduler, settings
        self.seq2seq = hasattr(model, "translate")     # scheduler: then a TranslationWorker
        self.created = int(time.time())
        self.draining = False
        self.by_status: dict[int, int] = {}
        self._count_lock = threading.Lock()
        self._page = None

    # --- entry point ----------------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict, body: bytes,
               alive: Callable[[], bool] = lambda: True, deadline: float | None = None) -> Response:
        """Answer one request. `headers` has lower-case names; `alive()` says whether the
        client is still connected; `deadline` (monotonic) can shorten the request timeout."""
        try:
            resp = self._route(method, path.split("?", 1)[0], headers, body, alive, deadline)
        except ApiError as e:
            resp = error_response(e)
        except Exception:       # a bug: logged here, never shown to the client
            traceback.print_exc(file=sys.stderr)
            resp = error_response(ApiError(500, "internal error", "server_error"))
        self.count(resp.status)
        if self.settings.cors:
            resp.headers.setdefault("Access-Control-Allow-Origin", self.settings.cors)
        return resp

    def count(self, status: int) -> None:
        with self._count_lock:
            self.by_status[status] = self.by_status.get(status, 0) + 1

    def _route(self, method, path, headers, body, alive, deadline) -> Response:
        model_id = None
        if path.startswith("/v1/models/"):     # OpenAI's models.retrieve
            path, model_id = "/v1/models/{id}", urllib.parse.unquote(path[len("/v1/models/"):])
        if method == "OPTIONS":
            return self._preflight(path)
        if method == "HEAD":        # GET's answer; the transport sends its headers only
            method = "GET"
        if path not in ROUTES:
            raise ApiError(404, f"no route {path}", "invalid_request_error", code="not_found")
        self._check_kind(path)
        if method not in ROUTES[path]:
            raise ApiError(405, f"{path} takes {', '.join(sorted(ROUTES[path]))}", "invalid_request_error",
                           code="method_not_allowed", headers={"Allow": ", ".join(sorted(ROUTES[path]))})
        if (method, path) not in PUBLIC:
            self._check_key(headers)
        if len(body) > self.settings.max_body:
            raise ApiError(413, f"the body is over {self.settings.max_body} bytes", "invalid_request_error",
                           code="body_too_large")
        if path == "/health":
            if self.draining:
                return json_response(503, {"status": "draining"})
            return json_response(200, {"status": "ok"})
        if path == "/":
            return Response(200, self.page(), {"Content-Type": "text/html; charset=utf-8"})
        if path == "/v1/models":
            return json_response(200, {"object": "list", "data": [self._model_object()]})
        if path == "/v1/models/{id}":
            if model_id != self.name:
                raise ApiError(404, f"the model '{model_id}' does not exist; this server has '{self.name}'",
                               param="model", code="model_not_found")
            return json_response(200, self._model_object())
        if path == "/metrics":
            from .metrics import render
            from .translations import render_metrics
            text = render_metrics(self) if self.seq2seq else render(self)
            return Response(200, text.encode(), {"Content-Type": "text/plain; version=0.0.4"})
        if path == "/v1/translations":
            from .translations import translations_route
            status, obj = translations_route(self, body, alive, deadline)
            return Response(499) if status == 499 else json_response(status, obj)
        if path == "/tokenize":
            text = parse_tokens(body, "prompt", str)
            ids = self._encode(text, "prompt")
            return json_response(200, {"tokens": ids, "count": len(ids)})
        if path == "/detokenize":
            ids = parse_tokens(body, "tokens", list)
            vocab = len(self.model.vocab)
            if any(type(t) is not int or not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"'tokens' must be integers in [0, {vocab})", param="tokens")
            decode = self.model.codec.text_decoder()
            return json_response(200, {"prompt": "".join(decode(t) for t in ids)})
        return self._completions(body, alive, deadline)

    def _model_object(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "nn2"}

    def _check_kind(self, path) -> None:
        if self.seq2seq and path in LANGUAGE_ONLY:
            what = "the playground (/)" if path == "/" else path
            raise ApiError(404, f"{what} is for language models; this server runs the seq2seq model "
                           f"'{self.name}': POST /v1/translations", code="wrong_model_kind")
        if not self.seq2seq and path in SEQ2SEQ_ONLY:
            raise ApiError(404, f"{path} is for seq2seq models; this server runs the language model "
                           f"'{self.name}': POST /v1/completions", code="wrong_model_kind")

    def _preflight(self, path) -> Response:
        allow = ", ".join(sorted(ROUTES.get(path, set()) | {"OPTIONS"}))
        headers = {"Allow": allow}
        if self.settings.cors:
            headers.update({"Access-Control-Allow-Methods": allow,
                            "Access-Control-Allow-Headers": "Authorization, Content-Type",
                            "Access-Control-Max-Age": "600"})
        return Response(204, b"", headers)

    def _check_key(self, headers) -> None:
        key = self.settings.api_key
        if key is None:
            return
        got = headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "a valid API key is needed: 'Authorization: Bearer KEY'",
                           "invalid_request_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def _encode(self, text: str, param: str) -> list[int]:
        try:
            return self.model.codec.encode(text)
        except CodecError as e:
            raise ApiError(400, str(e), param=param, code="unknown_characters") from None
        except UnicodeEncodeError as e:     # a lone surrogate, for a codec that takes UTF-8
            raise ApiError(400, f"'{param}' is not valid Unicode: a lone surrogate, {text[e.start]!r}, "
                           f"at {e.start}", param=param, code="invalid_unicode") from None

    def page(self) -> bytes:
        """The playground, with the model's description filled in (made once)."""
        if self._page is None:
            from .dis import describe
            text = (Path(__file__).with_name("playground.html")).read_text(encoding="utf-8")
            self._page = (text.replace("{{MODEL}}", html.escape(self.name))
                          .replace("{{INFO}}", html.escape(describe(self.model)))
                          .replace("{{VERSION}}", __version__).encode())
        return self._page

    # --- completions ----------------------------------------------------------------
    def _completions(self, body, alive, deadline) -> Response:
        from .generate import start_token
        c = parse_completion(body, self.settings, self.name)
        if self.draining:
            raise ApiError(503, "the server is shutting down", "server_error", code="draining",
                           headers={"Retry-After": "5"})
        primes = [self._encode(p, "prompt") if p else [start_token(self.model)] for p in c.prompts]
        rows = [primes[i // c.n] for i in range(len(primes) * c.n)]
        until = time.monotonic() + self.settings.request_timeout
        req = Request(rows, c.max_tokens, c.temperature if c.temperature is not None
                      else self.model.sampling["temperature"], c.top_k, c.top_p, c.seed, c.stop,
                      min(until, deadline) if deadline else until,
                      [self.model.codec.text_decoder() for _ in rows])
        req.stream = c.stream
        meta = {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion",
                "created": int(time.time()), "model": self.name}
        # an empty prompt is fed the start token, which is not the user's
        usage = {"prompt_tokens": sum(len(ids) for p, ids in zip(c.prompts, primes) if p) * c.n}
        if c.max_tokens > 0:
            try:
                self.scheduler.submit(req)
            except QueueFull:
                raise ApiError(429, "the queue is full; retry later", "server_error", code="queue_full",
                               headers={"Retry-After": "1"}) from None
        else:                   # nothing to generate: each choice ends at once, as a stream says too
            for i in range(len(rows)):
                req.events.put((i, "", "length"))
        echo = [c.prompts[i // c.n] if c.echo else "" for i in range(len(rows))]
        if c.stream:
            return Response(200, b"", {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
                            stream=EventStream(req, meta, echo, usage, c.include_usage))
        texts, finish = [[e] for e in echo], [None] * len(rows)
        for batch in _events(req, alive):
            for ev in batch:
                if isinstance(ev[0], str):
                    raise _failure(req, ev)
                texts[ev[0]].append(ev[1])
                finish[ev[0]] = ev[2] or finish[ev[0]]
        if not alive():
            return Response(499)
        choices = [{"text": "".join(t), "index": i, "logprobs": None, "finish_reason": finish[i] or "length"}
                   for i, t in enumerate(texts)]
        return json_response(200, {**meta, "choices": choices, "usage": _usage(usage, req)})

class EventStream:
    """The server-sent events of one streamed completion: `data: {chunk}` … `data: [DONE]`.

    `poll()` returns what can be sent now without waiting (the transport calls it for
    many streams from one thread); iterating waits for each piece (a buffered transport).
    `close()` makes the request's rows leave at the next step.
    """

    def __init__(self, req: Request, meta: dict, echo: list, usage: dict, include_usage: bool):
        self.req, self.meta, self.usage, self.include_usage = req, meta, usage, include_usage
        self.done = False
        self._first = b"".join(self._chunk(i, e, None) for i, e in enumerate(echo) if e)

    def _chunk(self, index, text, finish) -> bytes:
        return _event({**self.meta, "choices": [{"text": text, "index": index, "logprobs": None,
                                                  "finish_reason": finish}]})

    def poll(self, wait: float = 0.0) -> bytes:
        """The events that arrived (waiting up to `wait` seconds for the first), as bytes."""
        out, self._first = [self._first], b""
        batch = _drain(self.req, wait)
        failed = [ev for ev in batch if isinstance(ev[0], str)]
        if failed:
            batch = batch[:batch.index(failed[0])]
        for ev in batch:
            if ev[2] is not None:
                self.req.open_rows -= 1
        out += [self._chunk(*ev) for ev in _merged(batch)]
        if failed:
            out += [_event(_failure(self.req, failed[0]).body()), b"data: [DONE]\n\n"]
            self.done = True
        elif self.req.open_rows <= 0 and not self.done:
            if self.include_usage:
                out.append(_event({**self.meta, "choices": [], "usage": _usage(self.usage, self.req)}))
            out.append(b"data: [DONE]\n\n")
            self.done = True
        return b"".join(out)

    def __iter__(self) -> Iterator[bytes]:
        while not self.done:
            piece = self.poll(WAIT_TICK)
            if piece:
                yield piece

    def close(self) -> None:
        self.req.cancelled = True


def _drain(req: Request, wait: float) -> list:
    """The events on the request's queue now (waiting up to `wait` for the first)."""
    batch = []
    try:
        batch.append(req.events.get(timeout=wait) if wait > 0 else req.events.get_nowait())
        while True:
            batch.append(req.events.get_nowait())
    except queue.Empty:
        pass
    return batch


def _events(req: Request, alive) -> Iterator[list]:
    """The request's events, in batches of what arrived, until every choice finished, the
    deadline passed or the client left (checked every WAIT_TICK, events or not)."""
    checked = time.monotonic()
    while req.open_rows > 0:
        batch = _drain(req, WAIT_TICK)
        now = time.monotonic()
        if now - checked >= WAIT_TICK:
            checked = now
            if not alive():
                req.cancelled = True
                return
        for ev in batch:
            if isinstance(ev[0], str):       # the request failed: nothing follows
                yield [ev]
                return
            if ev[2] is not None:
                req.open_rows -= 1
        if batch:
            yield batch


def _merged(batch: list) -> list:
    """Consecutive pieces of one choice as one chunk (fewer, larger writes under load)."""
    out = []
    for index, text, finish in batch:
        if out and out[-1][0] == index and out[-1][2] is None:
            out[-1] = (index, out[-1][1] + text, finish)
        else:
            out.append((index, text, finish))
    return out


def _usage(usage: dict, req: Request) -> dict:
    done = dict(usage, completion_tokens=req.generated)
    done["total_tokens"] = done["prompt_tokens"] + done["completion_tokens"]
    return done


def _failure(req: Request, event: tuple) -> ApiError:
    """The error for a ("timeout",), ("failed",) or ("shutdown",) event."""
    if event[0] == "failed":
        return ApiError(500, "internal error", "server_error")
    if event[0] == "shutdown":
        return ApiError(503, "the server stopped before the request finished", "server_error", code="shutdown")
    return ApiError(504, f"the request ran past its deadline ({req.deadline - req.arrival:.3g} s after it came)",
                    "server_error", code="timeout")


def _event(obj) -> bytes:
    return b"data: " + _json(obj) + b"\n\n"

"""AWS Lambda: `nn2run.aws.handler` answers Function URL and API Gateway HTTP API events
(payload format 2.0) with the routes of `nn2run serve`, through the same `routes.App`.

The model named by the environment variable NN2_MODEL is loaded once per execution
environment, during its init phase (when the runtime imports this module, before the
first invocation: the init phase is not billed and runs with a full CPU), and kept with its
scheduler for every invocation. If it cannot be loaded there, each invocation tries again
and answers 500 with the reason. Optional settings: NN2_API_KEY, NN2_CORS, NN2_MAX_BATCH,
NN2_MAX_TOKENS_LIMIT, NN2_MAX_TOKENS_DEFAULT, NN2_TIMEOUT (seconds); NN2_VERIFY=0 skips
the check of the tensor data's SHA-256 at load (on by default).

Responses are buffered (a handler returns one payload): a request with "stream": true
gets the whole server-sent-event stream, `data: {chunk}` … `data: [DONE]`, as one
text/event-stream body once generation ends. Each request's deadline is the sooner of
NN2_TIMEOUT and the invocation's remaining time (less a margin to send the answer).

Imports NumPy and the standard library only.
"""

from __future__ import annotations

import base64
import os
import sys
import threading
import time

_app = None
_lock = threading.Lock()
MARGIN_S = 0.5      # of the invocation's remaining time, kept to return the answer


def _env_number(name: str, default, kind: type, low, high=None):
    """The setting NN2_*: absent or empty, the default; else a number of `kind` in
    [low, high] (high None: no bound), or a ValueError naming the variable."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not (low <= value and (high is None or value <= high)):      # NaN fails this too
        what = "an integer" if kind is int else "a number"
        bounds = f"at least {low}" if high is None else f"from {low} to {high}"
        raise ValueError(f"{name} must be {what} {bounds}, got {raw!r}")
    return value


def _load():
    """The App for NN2_MODEL (made once per execution environment)."""
    global _app
    with _lock:
        if _app is None:
            from .model import load
            from .routes import App, Settings
            from .scheduler import Scheduler
            from .translations import TranslationWorker
            path = os.environ.get("NN2_MODEL")
            if not path:
                raise RuntimeError("NN2_MODEL is not set: it names the .nnb file to serve")
            limit = _env_number("NN2_MAX_TOKENS_LIMIT", 4096, int, 1)
            default = _env_number("NN2_MAX_TOKENS_DEFAULT", min(256, limit), int, 0, limit)
            settings = Settings(max_tokens_default=default, max_tokens_limit=limit,
                                request_timeout=_env_number("NN2_TIMEOUT", 120.0, float, 0.001, 1e12),
                                api_key=os.environ.get("NN2_API_KEY") or None,
                                cors=os.environ.get("NN2_CORS") or None)
            max_batch = _env_number("NN2_MAX_BATCH", 64, int, 1, 4096)
            model = load(path, verify=os.environ.get("NN2_VERIFY", "1") != "0")
            runner = TranslationWorker if hasattr(model, "translate") else Scheduler   # as nn2run serve
            scheduler = runner(model, max_batch=max_batch).start()
            name = os.path.splitext(os.path.basename(path))[0]
            _app = App(model, name, scheduler, settings)
        return _app


def _init() -> None:
    """Load the model in a Lambda execution environment's init phase; a failure is printed
    and left to the invocations, which report it."""
    if os.environ.get("AWS_LAMBDA_RUNTIME_API") and os.environ.get("NN2_MODEL"):
        try:
            _load()
        except Exception as e:      # noqa: BLE001 — reported by every invocation instead
            print(f"nn2run: cannot load the model: {e}", file=sys.stderr)


class NotHttp(ValueError):
    """An event that is not an HTTP request (a direct invocation with another payload)."""


def _request(event: dict):
    """(method, path, lower-case headers, body bytes) of a payload-2.0 event."""
    if not isinstance(event, dict):
        raise NotHttp()
    context = event.get("requestContext") or {}
    http = (context.get("http") or {}) if isinstance(context, dict) else None
    if not isinstance(http, dict):
        raise NotHttp()
    method = http.get("method") or event.get("httpMethod") or "GET"
    path = event.get("rawPath") or http.get("path") or "/"
    headers = event.get("headers") or {}
    body = event.get("body") or ""
    if not (isinstance(method, str) and isinstance(path, str) and isinstance(headers, dict)
            and isinstance(body, str)):
        raise NotHttp()
    headers = {str(k).lower(): str(v) for k, v in headers.items()}
    raw = base64.b64decode(body) if event.get("isBase64Encoded") else body.encode("utf-8", "surrogatepass")
    return method.upper(), path, headers, raw


def _answer(status: int, headers: dict, body: bytes) -> dict:
    return {"statusCode": status, "headers": headers, "body": body.decode("utf-8"), "isBase64Encoded": False}


def handler(event, context):
    """The Lambda entry point: an HTTP API / Function URL event in, its response out."""
    from .completions import ApiError
    from .routes import error_response
    try:
        app = _load()
    except Exception as e:          # noqa: BLE001 — a model that cannot load is the answer, not a crash loop
        print(f"nn2run: cannot load the model: {e}", file=sys.stderr)
        resp = error_response(ApiError(500, f"cannot load the model: {e}", "server_error", code="model_unavailable"))
        return _answer(resp.status, resp.headers, resp.body)
    try:
        method, path, headers, body = _request(event)
    except NotHttp:
        resp = error_response(ApiError(400, "the event is not an HTTP request: payload format 2.0 has strings for "
                                       "the method, rawPath and body, an object for headers",
                                       code="invalid_event"))
        return _answer(resp.status, resp.headers, resp.body)
    except (ValueError, TypeError):
        resp = error_response(ApiError(400, "the body is not valid base64", code="invalid_body"))
        return _answer(resp.status, resp.headers, resp.body)
    deadline = None
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is not None:
        deadline = time.monotonic() + max(remaining() / 1000 - MARGIN_S, 0.001)
    resp = app.handle(method, path, headers, body, deadline=deadline)
    if resp.stream is not None:
        try:
            resp.body = b"".join(resp.stream)
        finally:
            resp.stream.close()
    return _answer(resp.status, resp.headers, resp.body)


_init()

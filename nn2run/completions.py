"""Request bodies of the server's API: parsed and checked before anything runs.

Every problem is an `ApiError` (status 400 unless said otherwise) naming the parameter,
in the shape of OpenAI's errors. Imports the standard library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_PROMPTS = 64
MAX_CHOICES = 16
MAX_STOPS = 4
MAX_SEED = (1 << 63) - 1
# OpenAI parameters accepted only with the value that means "off" (nn2 has no logprobs, penalties, …)
NEUTRAL = {"logprobs": (None,), "best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
           "logit_bias": (None, {}), "suffix": (None, ""), "user": None}


class ApiError(Exception):
    """An error answered to the client: status, message, OpenAI's type, the parameter at fault."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Completion:
    prompts: list
    max_tokens: int
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: list
    n: int
    stream: bool
    include_usage: bool
    echo: bool


def parse_json(body: bytes) -> dict:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "the body is not valid JSON", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return obj


def _typed(obj: dict, key: str, kinds: tuple, what: str, default=None):
    v = obj.get(key)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise ApiError(400, f"'{key}' must be {what}", param=key, code="invalid_type")
    return v


def _in_range(key: str, value, ok: bool, what: str):
    if not ok:
        raise ApiError(400, f"'{key}' must be {what}, got {value!r}", param=key, code="out_of_range")
    return value


def _strings(obj: dict, key: str, default, limit: int, what: str) -> list:
    v = obj.get(key)
    if v is None:
        return default
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not v or len(v) > limit or not all(isinstance(s, str) for s in v):
        raise ApiError(400, f"'{key}' must be {what}", param=key, code="invalid_type")
    return v


def parse_completion(body: bytes, settings, model_name: str) -> Completion:
    """POST /v1/completions: the body as OpenAI's completions API takes it."""
    obj = parse_json(body)
    known = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
             "stream", "stream_options", "echo"} | set(NEUTRAL)
    for key in obj:
        if key not in known:
            raise ApiError(400, f"unrecognized request argument supplied: {key}", param=key,
                           code="unknown_parameter")
    for key, allowed in NEUTRAL.items():
        if allowed is not None and obj.get(key) not in allowed:
            raise ApiError(400, f"'{key}' is not supported by this server", param=key, code="unsupported")
    model = _typed(obj, "model", (str,), "a string")
    if model is not None and model != model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server has '{model_name}'",
                       param="model", code="model_not_found")
    prompts = _strings(obj, "prompt", [""], MAX_PROMPTS, f"a string or a list of 1 to {MAX_PROMPTS} strings")
    cap = settings.max_tokens_limit
    max_tokens = _typed(obj, "max_tokens", (int,), "an integer", settings.max_tokens_default)
    _in_range("max_tokens", max_tokens, 0 <= max_tokens <= cap, f"between 0 and {cap}")
    t = _typed(obj, "temperature", (int, float), "a number")
    if t is not None:
        _in_range("temperature", t, 0 <= t <= 2, "between 0 and 2")
    top_p = _typed(obj, "top_p", (int, float), "a number")
    if top_p is not None:
        _in_range("top_p", top_p, 0 < top_p <= 1, "in (0, 1]")
    top_k = _typed(obj, "top_k", (int,), "an integer")
    if top_k is not None:
        _in_range("top_k", top_k, top_k >= 1, "at least 1")
    seed = _typed(obj, "seed", (int,), "an integer")
    if seed is not None:
        _in_range("seed", seed, 0 <= seed <= MAX_SEED, f"between 0 and {MAX_SEED}")
    stop = _strings(obj, "stop", [], MAX_STOPS, f"a string or a list of 1 to {MAX_STOPS} strings")
    n = _typed(obj, "n", (int,), "an integer", 1)
    _in_range("n", n, 1 <= n <= MAX_CHOICES, f"between 1 and {MAX_CHOICES}")
    stream = _typed(obj, "stream", (bool,), "true or false", False)
    options = _typed(obj, "stream_options", (dict,), "an object", {})
    include_usage = _typed(options, "include_usage", (bool,), "true or false", False)
    echo = _typed(obj, "echo", (bool,), "true or false", False)
    _typed(obj, "user", (str,), "a string")
    return Completion(prompts, max_tokens, None if t is None else float(t), top_p, top_k, seed, stop, n,
                      stream, include_usage, echo)


def parse_tokens(body: bytes, key: str, kind: type):
    """POST /tokenize {"prompt": text} and /detokenize {"tokens": [ids]}: the one field."""
    obj = parse_json(body)
    v = obj.get(key)
    if not isinstance(v, kind):
        raise ApiError(400, f"'{key}' must be {'a string' if kind is str else 'a list of token ids'}", param=key,
                       code="invalid_type")
    return v

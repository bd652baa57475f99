"""nn2run.aws.handler driven by AWS's runtime interface client (awslambdaric) against a
stand-in of the Lambda Runtime API on 127.0.0.1, as a Lambda execution environment runs it."""

from __future__ import annotations

import base64
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from support.models import ROOT, build_model
from test_serve import cli_text, parse_sse, texts_of

pytest.importorskip("awslambdaric")

PREFIX = "/2018-06-01/runtime"


class RuntimeAPI:
    """The Runtime API's invocation loop: /invocation/next hands out queued events, the
    client posts each result to /invocation/{id}/response (or /error, /init/error)."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()
        self.results: dict = {}
        self.done = threading.Condition()
        self.polled = threading.Event()      # the client asked for its first invocation: init is over
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                if self.path != f"{PREFIX}/invocation/next":
                    return self._reply(404, b"{}")
                api.polled.set()
                while True:
                    try:
                        request_id, event, budget_ms = api.events.get(timeout=0.5)
                        break
                    except queue.Empty:
                        continue
                deadline = int(time.time() * 1000) + budget_ms
                self._reply(200, json.dumps(event).encode(), {
                    "Lambda-Runtime-Aws-Request-Id": request_id,
                    "Lambda-Runtime-Deadline-Ms": str(deadline),
                    "Lambda-Runtime-Invoked-Function-Arn": "arn:aws:lambda:us-east-1:123456789012:function:nn2",
                    "Lambda-Runtime-Trace-Id": "Root=1-00000000-000000000000000000000000"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                parts = self.path[len(PREFIX):].strip("/").split("/")
                key = parts[1] if parts[0] == "invocation" else "init"
                with api.done:
                    api.results[key] = (parts[-1], json.loads(body) if body else None)
                    api.done.notify_all()
                self._reply(202, b'{"status":"OK"}')

            def _reply(self, status, body, headers=None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.address = f"127.0.0.1:{self.server.server_address[1]}"

    def invoke(self, event: dict, timeout: float = 60.0, budget_ms: int = 60_000):
        """('response' or 'error', payload) for one invocation given budget_ms to run."""
        request_id = str(uuid.uuid4())
        self.events.put((request_id, event, budget_ms))
        with self.done:
            if not self.done.wait_for(lambda: request_id in self.results or "init" in self.results, timeout):
                raise AssertionError("no result from the runtime interface client")
        return self.results.get(request_id) or self.results["init"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def http_event(method: str, path: str, body=None, headers=None, base64_body: bool = False) -> dict:
    """A Function URL / HTTP API event, payload format 2.0."""
    raw = body if isinstance(body, (str, type(None))) else json.dumps(body)
    event = {"version": "2.0", "routeKey": "$default", "rawPath": path, "rawQueryString": "",
             "headers": {"content-type": "application/json", "host": "abc.lambda-url.us-east-1.on.aws",
                         **(headers or {})},
             "requestContext": {"accountId": "123456789012", "apiId": "abc", "domainName": "abc.lambda-url",
                                "http": {"method": method, "path": path, "protocol": "HTTP/1.1",
                                         "sourceIp": "127.0.0.1", "userAgent": "test"},
                                "requestId": str(uuid.uuid4()), "routeKey": "$default", "stage": "$default",
                                "timeEpoch": int(time.time() * 1000)},
             "isBase64Encoded": base64_body}
    if raw is not None:
        event["body"] = base64.b64encode(raw.encode()).decode() if base64_body else raw
    return event


def start_client(api: RuntimeAPI, env: dict, tmp_path):
    log = open(tmp_path / f"ric-{time.monotonic_ns()}.log", "w")
    full = {**os.environ, "AWS_LAMBDA_RUNTIME_API": api.address, "LAMBDA_TASK_ROOT": str(ROOT),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env}
    proc = subprocess.Popen([sys.executable, "-m", "awslambdaric", "nn2run.aws.handler"], env=full,
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, log


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _, _ = build_model(tmp_path_factory.mktemp("aws") / "m.nnb", "lstm", 16, 2, 5)
    return path


@pytest.fixture(scope="module")
def lam(model, tmp_path_factory):
    api = RuntimeAPI()
    env = {"NN2_MODEL": str(model), "NN2_MAX_BATCH": "8", "NN2_MAX_TOKENS_LIMIT": "100000000"}
    proc, log = start_client(api, env, tmp_path_factory.mktemp("ric"))
    yield api
    proc.kill()
    proc.wait()
    log.close()
    api.close()


def answer(lam, *args, **kwargs):
    kind, payload = lam.invoke(http_event(*args, **kwargs))
    assert kind == "response", payload
    return payload


def test_health_and_models(lam):
    out = answer(lam, "GET", "/health")
    assert out["statusCode"] == 200 and json.loads(out["body"]) == {"status": "ok"}
    assert json.loads(answer(lam, "GET", "/v1/models")["body"])["data"][0]["id"] == "m"


def test_completion_matches_the_cli_for_the_same_seed(lam, model):
    out = answer(lam, "POST", "/v1/completions", {"prompt": "abc", "max_tokens": 30, "seed": 3})
    assert out["statusCode"] == 200 and out["headers"]["Content-Type"] == "application/json"
    assert json.loads(out["body"])["choices"][0]["text"] == cli_text(model, "abc", 30, 3)


def test_a_streamed_request_gets_the_whole_event_stream_at_once(lam):
    body = {"prompt": "ab", "max_tokens": 20, "seed": 8}
    whole = json.loads(answer(lam, "POST", "/v1/completions", body)["body"])["choices"][0]["text"]
    out = answer(lam, "POST", "/v1/completions", {**body, "stream": True})
    assert out["statusCode"] == 200 and out["headers"]["Content-Type"] == "text/event-stream"
    events, done = parse_sse(out["body"].encode())
    assert done and texts_of(events) == {0: whole}


def test_a_base64_body_is_decoded(lam):
    out = answer(lam, "POST", "/tokenize", {"prompt": "cab"}, base64_body=True)
    assert json.loads(out["body"]) == {"tokens": [2, 0, 1], "count": 3}


def test_bad_input_gets_the_openai_error_shape(lam):
    out = answer(lam, "POST", "/v1/completions", '{"prompt": "aZ"')
    assert out["statusCode"] == 400 and json.loads(out["body"])["error"]["code"] == "invalid_json"
    out = answer(lam, "POST", "/v1/completions", {"prompt": "aZ"})
    assert out["statusCode"] == 400 and "'Z'" in json.loads(out["body"])["error"]["message"]


def test_the_model_is_loaded_once_and_kept_between_invocations(lam):
    def tokens():
        text = answer(lam, "GET", "/metrics")["body"]
        return int(next(line.split()[1] for line in text.splitlines()
                        if line.startswith("nn2_tokens_generated_total ")))
    before = tokens()
    answer(lam, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 7})
    answer(lam, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 5})
    assert tokens() == before + 12


def test_a_request_stops_before_the_invocation_runs_out_of_time(lam):
    t0 = time.monotonic()
    kind, out = lam.invoke(http_event("POST", "/v1/completions", {"prompt": "a", "max_tokens": 10**8}),
                           budget_ms=1500)
    assert kind == "response" and out["statusCode"] == 504 and time.monotonic() - t0 < 1.5
    assert json.loads(out["body"])["error"]["code"] == "timeout"


def test_the_model_is_loaded_in_the_init_phase_before_the_first_invocation(model, tmp_path):
    copy = tmp_path / "init.nnb"
    copy.write_bytes(model.read_bytes())
    api = RuntimeAPI()
    proc, log = start_client(api, {"NN2_MODEL": str(copy)}, tmp_path)
    try:
        assert api.polled.wait(60)
        copy.unlink()               # loaded (and mapped) already: the first request is served
        kind, out = api.invoke(http_event("POST", "/tokenize", {"prompt": "ab"}))
        assert kind == "response" and out["statusCode"] == 200
    finally:
        proc.kill()
        proc.wait()
        log.close()
        api.close()


def test_without_nn2_model_every_request_gets_a_500_saying_so(tmp_path):
    api = RuntimeAPI()
    proc, log = start_client(api, {"NN2_MODEL": ""}, tmp_path)
    try:
        for _ in range(2):
            kind, out = api.invoke(http_event("GET", "/health"))
            assert kind == "response" and out["statusCode"] == 500
            assert "NN2_MODEL is not set" in json.loads(out["body"])["error"]["message"]
    finally:
        proc.kill()
        proc.wait()
        log.close()
        api.close()


def test_the_key_the_body_limit_and_cors_apply_as_on_the_server(model, tmp_path):
    api = RuntimeAPI()
    proc, log = start_client(api, {"NN2_MODEL": str(model), "NN2_API_KEY": "k", "NN2_CORS": "*"}, tmp_path)
    try:
        def status(*args, **kwargs):
            kind, out = api.invoke(http_event(*args, **kwargs))
            assert kind == "response", out
            return out["statusCode"], out["headers"]
        assert status("POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 401
        assert status("POST", "/v1/completions", {"prompt": "a", "max_tokens": 2},
                      headers={"authorization": "Bearer k"})[0] == 200
        assert status("GET", "/health")[0] == 200
        code, headers = status("OPTIONS", "/v1/completions", headers={"origin": "https://x.example"})
        assert code == 204 and headers["Access-Control-Allow-Origin"] == "*"
        big = {"prompt": "a" * (1 << 20)}
        assert status("POST", "/v1/completions", big, headers={"authorization": "Bearer k"})[0] == 413
    finally:
        proc.kill()
        proc.wait()
        log.close()
        api.close()


def test_a_seq2seq_model_is_served_its_translations_route(tmp_path):
    import nn2run
    from support import seq2seq as s2s
    path, _ = s2s.build(tmp_path / "s.nnb", hidden=8, seed=3)
    api = RuntimeAPI()
    proc, log = start_client(api, {"NN2_MODEL": str(path)}, tmp_path)
    try:
        texts = ["abc", "", "cab"]
        out = answer(api, "POST", "/v1/translations", {"texts": texts, "beam": 2})
        assert out["statusCode"] == 200, out
        with nn2run.load(path) as m:
            assert json.loads(out["body"])["translations"] == m.translate(texts, beam=2)
        wrong = answer(api, "POST", "/v1/completions", {"prompt": "abc"})
        assert wrong["statusCode"] == 404 and "seq2seq" in json.loads(wrong["body"])["error"]["message"]
    finally:
        proc.kill()
        proc.wait()
        log.close()
        api.close()



@pytest.mark.parametrize("change", [{"body": {"prompt": "a"}}, {"headers": ["accept"]}, {"rawPath": 3},
                                    {"requestContext": {"http": {"method": 5}}}, {"requestContext": "x"}, None])
def test_an_event_of_the_wrong_shape_is_a_400_not_a_failed_invocation(lam, change):
    event = {**http_event("POST", "/v1/completions", {"prompt": "a"}), **change} if change else ["a list"]
    kind, out = lam.invoke(event)
    assert kind == "response", out
    assert out["statusCode"] == 400 and json.loads(out["body"])["error"]["code"] == "invalid_event"


@pytest.mark.parametrize("env, words", [({"NN2_MAX_BATCH": "0"}, "NN2_MAX_BATCH must be an integer from 1"),
                                        ({"NN2_TIMEOUT": "-1"}, "NN2_TIMEOUT must be a number"),
                                        ({"NN2_TIMEOUT": "soon"}, "NN2_TIMEOUT must be a number"),
                                        ({"NN2_MAX_TOKENS_LIMIT": "9", "NN2_MAX_TOKENS_DEFAULT": "10"},
                                         "NN2_MAX_TOKENS_DEFAULT must be an integer from 0 to 9")])
def test_a_setting_out_of_range_is_a_500_naming_it(model, tmp_path, env, words):
    api = RuntimeAPI()
    proc, log = start_client(api, {"NN2_MODEL": str(model), **env}, tmp_path)
    try:
        kind, out = api.invoke(http_event("POST", "/v1/completions", {"prompt": "a", "max_tokens": 2}), budget_ms=3000)
        assert kind == "response" and out["statusCode"] == 500, out
        assert words in json.loads(out["body"])["error"]["message"]
    finally:
        proc.kill()
        proc.wait()
        log.close()
        api.close()


def test_a_token_limit_under_the_default_lowers_the_default(model, tmp_path):
    api = RuntimeAPI()
    proc, log = start_client(api, {"NN2_MODEL": str(model), "NN2_MAX_TOKENS_LIMIT": "9"}, tmp_path)
    try:
        kind, out = api.invoke(http_event("POST", "/v1/completions", {"prompt": "a"}))
        assert kind == "response" and out["statusCode"] == 200, out
        assert json.loads(out["body"])["usage"]["completion_tokens"] == 9
    finally:
        proc.kill()
        proc.wait()
        log.close()
        api.close()

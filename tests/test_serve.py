"""`nn2run serve` through raw HTTP: the API's shape, continuous batching, limits, bad input,
the drain on SIGTERM. Every server listens on 127.0.0.1 on a port the kernel picks."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from support.models import BIN, build_model

VOCAB = "abcde"


class Served:
    """A `nn2run serve` process; stderr goes to a file (a full pipe would block the server)."""

    def __init__(self, model, *args, tmp_path):
        self.log = tmp_path / f"serve-{time.monotonic_ns()}.log"
        self._err = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "nn2run.serve", str(model), "--port", "0", *map(str, args)],
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", self.log.read_text())
            if m:
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError("the server did not start: " + self.log.read_text())

    def request(self, method, path, body=None, headers=None, timeout=30):
        """(status, headers, body bytes)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        out = r.status, dict(r.getheaders()), r.read()
        conn.close()
        return out

    def complete(self, **body):
        status, _, data = self.request("POST", "/v1/completions", body)
        assert status == 200, data
        return json.loads(data)

    def stream(self, **body):
        """The events of a streamed completion, as parsed JSON, and whether [DONE] ended it."""
        status, headers, data = self.request("POST", "/v1/completions", {**body, "stream": True})
        assert status == 200 and headers["Content-Type"] == "text/event-stream", data
        return parse_sse(data)

    def metric(self, name: str) -> float:
        _, _, text = self.request("GET", "/metrics")
        m = re.search(rf"^{re.escape(name)} (\S+)$", text.decode(), re.M)
        return float(m.group(1)) if m else 0.0

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        return self.proc.returncode


def parse_sse(data: bytes):
    events = [line[6:] for line in data.decode().split("\n\n") if line.startswith("data: ")]
    done = bool(events) and events[-1] == "[DONE]"
    return [json.loads(e) for e in events if e != "[DONE]"], done


def texts_of(events) -> dict:
    out = {}
    for e in events:
        for c in e.get("choices", []):
            out[c["index"]] = out.get(c["index"], "") + c["text"]
    return out


def read_to_close(sock) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def wait_for(predicate, timeout=20.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    _, _, logical = build_model(d / "draft.nnb", "lstm", 16, 2, len(VOCAB))
    # large weights: the text depends strongly on each row's state (a mixed-up row shows)
    path, _, _ = build_model(d / "m.nnb", "lstm", 16, 2, len(VOCAB), logical={k: 6 * v for k, v in logical.items()})
    return path


@pytest.fixture
def serve(model, tmp_path):
    servers = []

    def start(*args, path=None):
        s = Served(path or model, *args, tmp_path=tmp_path)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    s = Served(model, "--max-batch", 8, tmp_path=tmp_path_factory.mktemp("served"))
    yield s
    assert s.stop() == 0


def cli_text(model, prime, n, seed, *extra):
    r = subprocess.run([str(BIN / "nn2run"), str(model), "--prime", prime, "-n", str(n), "--seed", str(seed), *extra],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout[len(prime):]


# --- the API's shape -----------------------------------------------------------------

def test_health_and_models(server):
    assert server.request("GET", "/health")[::2] == (200, b'{"status": "ok"}')
    status, _, data = server.request("GET", "/v1/models")
    assert status == 200 and json.loads(data)["data"][0]["id"] == "m"


def test_completion_has_openai_shape_and_the_cli_text_for_the_same_seed(server, model):
    out = server.complete(model="m", prompt="abc", max_tokens=40, seed=7)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == "m"
    (choice,) = out["choices"]
    assert choice["text"] == cli_text(model, "abc", 40, 7)
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 40, "total_tokens": 43}


def test_sampling_options_reach_the_sampler(server, model):
    out = server.complete(prompt="ab", max_tokens=30, seed=3, temperature=0.7, top_k=3, top_p=0.9)
    assert out["choices"][0]["text"] == cli_text(model, "ab", 30, 3, "-t", "0.7", "--top-k", "3", "--top-p", "0.9")
    greedy = server.complete(prompt="ab", max_tokens=30, temperature=0)
    assert greedy["choices"][0]["text"] == cli_text(model, "ab", 30, 0, "--greedy")


def test_stream_is_sse_ending_in_done_with_the_same_text(server):
    events, done = server.stream(prompt="cab", max_tokens=25, seed=11)
    assert done
    assert texts_of(events) == {0: server.complete(prompt="cab", max_tokens=25, seed=11)["choices"][0]["text"]}
    finishes = [c["finish_reason"] for e in events for c in e["choices"]]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])


def test_stream_usage_when_asked(server):
    events, _ = server.stream(prompt="a", max_tokens=5, stream_options={"include_usage": True})
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5


def test_prompt_list_and_n_give_one_choice_each(server):
    out = server.complete(prompt=["ab", "c"], n=3, max_tokens=12, seed=5)
    assert sorted(c["index"] for c in out["choices"]) == list(range(6))
    texts = [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    assert all(len(t) == 12 for t in texts) and len(set(texts)) > 1
    assert texts[0] == server.complete(prompt="ab", max_tokens=12, seed=5)["choices"][0]["text"]
    assert out["usage"]["prompt_tokens"] == 9 and out["usage"]["completion_tokens"] == 72


def test_stop_string_ends_the_text_before_it(server):
    full = server.complete(prompt="a", max_tokens=60, seed=2)["choices"][0]["text"]
    stop = full[20:23]
    out = server.complete(prompt="a", max_tokens=60, seed=2, stop=[stop, "zz"])["choices"][0]
    assert out["text"] == full[:full.index(stop)] and out["finish_reason"] == "stop"
    events, done = server.stream(prompt="a", max_tokens=60, seed=2, stop=stop)
    assert done and texts_of(events)[0] == out["text"]


def test_echo_prepends_the_prompt(server):
    out = server.complete(prompt="abc", max_tokens=4, seed=1, echo=True)["choices"][0]["text"]
    assert out.startswith("abc") and len(out) == 7


def test_tokenize_and_detokenize_round_trip(server):
    status, _, data = server.request("POST", "/tokenize", {"prompt": "bead"})
    assert status == 200 and json.loads(data) == {"tokens": [1, 4, 0, 3], "count": 4}
    status, _, data = server.request("POST", "/detokenize", {"tokens": [1, 4, 0, 3]})
    assert status == 200 and json.loads(data) == {"prompt": "bead"}


def test_metrics_count_requests_tokens_steps_and_first_tokens(server):
    before = server.metric("nn2_tokens_generated_total")
    server.complete(prompt="a", max_tokens=9)
    _, headers, text = server.request("GET", "/metrics")
    text = text.decode()
    assert headers["Content-Type"].startswith("text/plain")
    assert server.metric("nn2_tokens_generated_total") == before + 9
    for name in ('nn2_requests_total{status="200"}', "nn2_vm_steps_total", "nn2_rows_running",
                 "nn2_rows_queued", "nn2_rows_per_step_count", "nn2_time_to_first_token_seconds_count"):
        assert re.search(rf"^{re.escape(name)} \d", text, re.M), name


# --- continuous batching -------------------------------------------------------------

def test_a_seed_gives_the_same_text_alone_or_beside_other_requests(server):
    jobs = [{"prompt": p, "max_tokens": 150, "seed": s} for p, s in
            [("abc", 1), ("e", 2), ("dddd", 3), ("", 4), ("bca", 5), ("ab", 6), ("cc", 7), ("eda", 8)]]
    alone = [server.complete(**j)["choices"][0]["text"] for j in jobs]
    together = [None] * len(jobs)
    steps_before = server.metric("nn2_rows_per_step_sum")

    def run(i):
        together[i] = texts_of(server.stream(**jobs[i])[0])[0]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    # the requests did share steps: more rows were stepped than one request's worth per step
    assert server.metric("nn2_rows_per_step_sum") - steps_before >= 150 * len(jobs)


def test_rows_join_while_others_run(serve):
    s = serve("--max-batch", 4, "--max-tokens-limit", 10**7)
    long = {"prompt": "a", "max_tokens": 10**7, "seed": 1}
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({**long, "stream": True}))
    r = conn.getresponse()
    r.read1(100)            # the long request is generating
    out = s.complete(prompt="b", max_tokens=10, seed=1)
    assert len(out["choices"][0]["text"]) == 10 and s.metric("nn2_rows_running") == 1
    conn.close()


# --- limits and bad input ------------------------------------------------------------

@pytest.mark.parametrize("body, param, code", [
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    (b"\xff\xfe", None, "invalid_json"),
    (b"[" * 100000, None, "invalid_json"),
    ({"prompt": 3}, "prompt", "invalid_type"),
    ({"prompt": ["a", 2]}, "prompt", "invalid_type"),
    ({"prompt": "a", "max_tokens": "9"}, "max_tokens", "invalid_type"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens", "invalid_type"),
    ({"prompt": "a", "max_tokens": -1}, "max_tokens", "out_of_range"),
    ({"prompt": "a", "max_tokens": 10**6}, "max_tokens", "out_of_range"),
    ({"prompt": "a", "temperature": 2.5}, "temperature", "out_of_range"),
    ({"prompt": "a", "top_p": 0}, "top_p", "out_of_range"),
    ({"prompt": "a", "top_k": 0}, "top_k", "out_of_range"),
    ({"prompt": "a", "n": 0}, "n", "out_of_range"),
    ({"prompt": "a", "seed": -1}, "seed", "out_of_range"),
    ({"prompt": "a", "stop": ["a"] * 5}, "stop", "invalid_type"),
    ({"prompt": "a", "stream": "yes"}, "stream", "invalid_type"),
    ({"prompt": "a", "logprobs": 3}, "logprobs", "unsupported"),
    ({"prompt": "a", "frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ({"prompt": "a", "model": "gpt-4"}, "model", "model_not_found"),
])
def test_bad_completion_requests_get_an_openai_error(server, body, param, code):
    status, headers, data = server.request("POST", "/v1/completions", body)
    err = json.loads(data)["error"]
    assert status == (404 if code == "model_not_found" else 400)
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["code"] == code
    assert "Traceback" not in data.decode()


def test_unknown_characters_are_named(server):
    status, _, data = server.request("POST", "/v1/completions", {"prompt": "abXcY!"})
    assert status == 400
    msg = json.loads(data)["error"]["message"]
    assert "'X'" in msg and "'Y'" in msg and "'!'" in msg


def test_max_tokens_has_a_default(serve):
    s = serve("--max-tokens-default", 7, "--max-tokens-limit", 50)
    assert s.complete(prompt="a")["usage"]["completion_tokens"] == 7
    assert s.request("POST", "/v1/completions", {"prompt": "a", "max_tokens": 51})[0] == 400


def test_a_body_over_the_limit_is_refused_from_content_length_alone(serve):
    s = serve("--max-body", 1000)
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
    answer = read_to_close(sock).decode()       # answered without a byte of the body sent
    assert answer.startswith("HTTP/1.1 413") and '"code": "body_too_large"' in answer
    sock.close()


def test_a_full_queue_answers_429_with_retry_after(serve):
    s = serve("--max-batch", 1, "--max-queue", 1, "--max-tokens-limit", 10**7)
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "a", "max_tokens": 10**7, "stream": True}))
    running = conn.getresponse()
    running.read1(100)
    queued = threading.Thread(target=s.request, args=("POST", "/v1/completions", {"prompt": "b", "max_tokens": 3}))
    queued.start()
    wait_for(lambda: s.metric("nn2_rows_queued") == 1, what="a queued request")
    status, headers, data = s.request("POST", "/v1/completions", {"prompt": "c", "max_tokens": 3})
    assert status == 429 and headers["Retry-After"] == "1" and json.loads(data)["error"]["code"] == "queue_full"
    conn.close()                                # the running client leaves: the queued one gets its row
    queued.join(20)
    assert not queued.is_alive()


def test_a_client_that_disconnects_frees_its_row(serve):
    s = serve("--max-batch", 1, "--max-tokens-limit", 10**7)
    for stream in (True, False):
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "a", "max_tokens": 10**7,
                                                            "stream": stream}))
        if stream:
            conn.getresponse().read1(100)
        wait_for(lambda: s.metric("nn2_rows_running") == 1, what="a running row")
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_for(lambda: s.metric("nn2_rows_running") == 0, timeout=5, what=f"the row to be freed ({stream=})")
        assert len(s.complete(prompt="b", max_tokens=5)["choices"][0]["text"]) == 5


def test_a_request_past_its_deadline_gets_504(serve):
    s = serve("--timeout", 0.3, "--max-tokens-limit", 10**7)
    status, _, data = s.request("POST", "/v1/completions", {"prompt": "a", "max_tokens": 10**7})
    assert status == 504 and json.loads(data)["error"]["code"] == "timeout"
    events, done = s.stream(prompt="a", max_tokens=10**7)
    assert done and events[-1]["error"]["code"] == "timeout"
    assert s.metric("nn2_rows_running") == 0


def test_256_clients_connecting_at_once_are_all_answered(serve):
    s = serve("--quiet")
    listen = subprocess.run(["ss", "-ltnH", f"sport = :{s.port}"], capture_output=True, text=True).stdout.split()
    if listen:
        assert int(listen[2]) >= 256, listen       # Send-Q of a listening socket is its backlog
    socks = [socket.create_connection(("127.0.0.1", s.port), timeout=20) for _ in range(256)]
    for sock in socks:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answers = [sock.recv(1024) for sock in socks]
    for sock in socks:
        sock.close()
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers)


def test_health_is_answered_while_a_small_model_streams(serve):
    # a 16-unit model's steps never release the interpreter lock on their own; the scheduler
    # hands it over now and then, so a health check does not wait for the stream to end
    s = serve("--max-batch", 2, "--max-tokens-limit", 10**5)
    result = {}
    t = threading.Thread(target=lambda: result.update(events=s.stream(prompt="a", max_tokens=20000, seed=1)))
    t.start()
    wait_for(lambda: s.metric("nn2_rows_running") == 1 or not t.is_alive(), what="the stream to start")
    answered = 0
    while t.is_alive() and answered < 20:
        assert s.request("GET", "/health")[0] == 200
        answered += t.is_alive()
    t.join(60)
    assert answered == 20, f"{answered} health checks answered while the stream ran"
    assert len(texts_of(result["events"][0])[0]) == 20000


def test_sigterm_drains_then_exits_zero(serve):
    s = serve("--max-batch", 2, "--max-tokens-limit", 10**5)
    result = {}

    def long_request():
        result["events"] = s.stream(prompt="a", max_tokens=30000, seed=1)
    t = threading.Thread(target=long_request)
    t.start()
    wait_for(lambda: s.metric("nn2_rows_running") == 1, what="the request to run")
    s.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: s.request("GET", "/health")[0] == 503, what="health to turn 503")
    status, headers, data = s.request("POST", "/v1/completions", {"prompt": "b", "max_tokens": 3})
    assert status == 503 and json.loads(data)["error"]["code"] == "draining"
    t.join(60)
    events, done = result["events"]
    assert done and len(texts_of(events)[0]) == 30000
    assert s.proc.wait(30) == 0


def test_the_drain_timeout_bounds_the_wait_and_says_so_to_the_clients_left(serve):
    s = serve("--drain-timeout", 0.5, "--max-tokens-limit", 10**7, "--timeout", 600, "--max-batch", 1)
    result = {}

    def run(key, stream):
        result[key] = s.request("POST", "/v1/completions", {"prompt": "a", "max_tokens": 10**7, "stream": stream})
    threads = [threading.Thread(target=run, args=("running", True))]
    threads[0].start()
    wait_for(lambda: s.metric("nn2_rows_running") == 1, what="a running request")
    threads.append(threading.Thread(target=run, args=("queued", False)))
    threads[1].start()
    wait_for(lambda: s.metric("nn2_rows_queued") == 1, what="a queued request")
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(20) == 0 and time.monotonic() - t0 < 10
    for t in threads:
        t.join(10)
    events, done = parse_sse(result["running"][2])
    assert done and events[-1]["error"]["code"] == "shutdown"
    status, _, data = result["queued"]
    assert status == 503 and json.loads(data)["error"]["code"] == "shutdown"


# --- keys and browsers -----------------------------------------------------------------

def test_api_key_is_checked_except_for_health_and_preflight(serve):
    s = serve("--api-key", "sekret", "--cors", "https://app.example")
    body = {"prompt": "a", "max_tokens": 2}
    assert s.request("POST", "/v1/completions", body)[0] == 401
    status, _, data = s.request("POST", "/v1/completions", body, {"Authorization": "Bearer wrong"})
    assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
    assert s.request("POST", "/v1/completions", body, {"Authorization": "Bearer sekret"})[0] == 200
    assert s.request("GET", "/v1/models")[0] == 401
    assert s.request("GET", "/health")[0] == 200
    status, headers, _ = s.request("OPTIONS", "/v1/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "authorization" in headers["Access-Control-Allow-Headers"].lower()
    assert "POST" in headers["Access-Control-Allow-Methods"]


def test_unknown_routes_and_methods(server):
    assert server.request("GET", "/v2/nothing")[0] == 404
    status, headers, data = server.request("GET", "/v1/completions")
    assert status == 405 and headers["Allow"] == "POST" and "error" in json.loads(data)


def test_a_malformed_request_line_gets_a_json_error(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"GET / HTTP/x.y\r\n\r\n")
    answer = read_to_close(sock).decode()
    sock.close()
    assert answer.startswith("HTTP/1.") and " 400 " in answer.split("\r\n")[0] and '"error"' in answer


def test_a_model_that_cannot_be_loaded_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.nnb"
    bad.write_bytes(b"nope")
    r = subprocess.run([sys.executable, "-m", "nn2run.serve", str(bad), "--port", "0"], capture_output=True,
                       text=True, timeout=30, env={**os.environ})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("nn2run: cannot load")


def test_a_byte_codec_model_counts_utf8_bytes_as_tokens(serve, tmp_path):
    import numpy as np

    from nn2c.compiler.emit import logical_shapes, pack
    from nn2c.compiler.pipeline import compile_kernel, write_model
    from nn2run.codec import ByteCodec
    compiled = compile_kernel("lstm", 8, 1, 256)
    specs = compiled.network.tensors()
    rng = np.random.default_rng(0)
    logical = {k: rng.uniform(-0.5, 0.5, s).astype(np.float32) for k, s in logical_shapes(specs).items()}
    path = tmp_path / "bytes.nnb"
    write_model(path, compiled, pack(specs, logical), ByteCodec(), {"test": True})
    s = serve(path=path)
    out = s.complete(prompt="é€", max_tokens=20, seed=1)
    assert out["usage"]["prompt_tokens"] == 5 and out["usage"]["completion_tokens"] == 20
    assert isinstance(out["choices"][0]["text"], str)
    status, _, data = s.request("POST", "/tokenize", {"prompt": "é"})
    assert json.loads(data) == {"tokens": [0xC3, 0xA9], "count": 2}


def test_a_port_in_use_is_one_line_and_exit_1(server, model):
    r = subprocess.run([sys.executable, "-m", "nn2run.serve", str(model), "--port", str(server.port)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"nn2run: cannot listen on 127.0.0.1:{server.port}")


def test_a_default_over_the_limit_is_a_usage_error(model):
    r = subprocess.run([sys.executable, "-m", "nn2run.serve", str(model), "--port", "0",
                        "--max-tokens-default", "60", "--max-tokens-limit", "50"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr == "nn2run: --max-tokens-default is over --max-tokens-limit\n"

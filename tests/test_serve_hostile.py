"""`nn2run serve` against careless and hostile clients: headers and bodies that are not
what HTTP or JSON promise. Each answer is a status with OpenAI's error shape, nothing
reaches the server's stderr as a traceback, and the server goes on serving."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

from support.models import build_model
from test_serve import Served, read_to_close, texts_of, wait_for


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _, _ = build_model(tmp_path_factory.mktemp("hostile") / "m.nnb", "lstm", 8, 1, 5)
    return path


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    s = Served(model, "--max-body", 1000, tmp_path=tmp_path_factory.mktemp("served"))
    yield s
    assert s.stop() == 0


@pytest.fixture
def serve(model, tmp_path):
    servers = []

    def start(*args):
        servers.append(Served(model, *args, tmp_path=tmp_path))
        return servers[-1]
    yield start
    for s in servers:
        s.stop(signal.SIGKILL)


@pytest.fixture
def quiet(server):
    """The server: after the test, still serving, with no traceback on its stderr."""
    start = len(server.log.read_bytes())
    yield server
    assert server.complete(prompt="ab", max_tokens=3)["usage"]["completion_tokens"] == 3
    assert b"Traceback" not in server.log.read_bytes()[start:]


def raw(server, data: bytes) -> tuple[int, dict]:
    """(status, parsed JSON body) of the answer to bytes sent as they are."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(data)
    answer = read_to_close(sock)
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("length, status, code", [
    ("\xb2", 400, "invalid_length"),            # a digit to str.isdigit, not to int()
    ("9" * 5000, 413, "body_too_large"),        # more digits than int() converts
    ("-1", 400, "invalid_length"),
    ("0000000000000000000000000000000000000000000000000000000000000000010", 400, "invalid_json"),
])
def test_a_content_length_that_is_not_a_plain_number(quiet, length, status, code):
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
               + length.encode("latin-1") + b"\r\n\r\n" + b"x" * 10)
    got, body = raw(quiet, request)
    assert (got, body["error"]["code"]) == (status, code)


def test_two_different_content_lengths_are_refused(quiet):
    # a proxy in front may go by the other one: the rest of the body would be read as a request
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b'{"prompt": "ab", "max_tokens": 2}'
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nContent-Length: %d\r\n\r\n%s%s"
               % (len(body), len(body) + len(smuggled), body, smuggled))
    sock = socket.create_connection(("127.0.0.1", quiet.port), timeout=10)
    sock.sendall(request)
    answer = read_to_close(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1
    assert b'"code": "invalid_length"' in answer


def test_spaces_around_the_content_length_are_allowed(quiet):
    body = b'{"prompt": "ab", "max_tokens": 2}'
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d \r\n\r\n%s"
               % (len(body), body))
    status, answer = raw(quiet, request)
    assert status == 200 and answer["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("body, status, param, code", [
    (b'{"prompt": "a", "model": "\\ud800"}', 404, "model", "model_not_found"),
    (b'{"prompt": "a", "\\udfff": 1}', 400, "\udfff", "unknown_parameter"),
])
def test_a_lone_surrogate_echoed_in_an_error_comes_back_escaped(quiet, body, status, param, code):
    got, _, data = quiet.request("POST", "/v1/completions", body)
    err = json.loads(data)["error"]
    assert (got, err["param"], err["code"]) == (status, param, code)


@pytest.fixture(scope="module")
def byte_server(tmp_path_factory):
    import numpy as np

    from nn2c.compiler.emit import logical_shapes, pack
    from nn2c.compiler.pipeline import compile_kernel, write_model
    from nn2run.codec import ByteCodec
    d = tmp_path_factory.mktemp("bytes")
    compiled = compile_kernel("lstm", 8, 1, 256)
    specs = compiled.network.tensors()
    rng = np.random.default_rng(0)
    logical = {k: rng.uniform(-0.5, 0.5, s).astype(np.float32) for k, s in logical_shapes(specs).items()}
    write_model(d / "bytes.nnb", compiled, pack(specs, logical), ByteCodec(), {"test": True})
    s = Served(d / "bytes.nnb", tmp_path=d)
    yield s
    assert s.stop() == 0


@pytest.mark.parametrize("path, body", [("/v1/completions", b'{"prompt": "ab\\ud800", "max_tokens": 2}'),
                                        ("/tokenize", b'{"prompt": "\\udfff"}')])
def test_a_lone_surrogate_in_a_byte_codec_prompt_is_a_400(byte_server, path, body):
    start = len(byte_server.log.read_bytes())
    status, _, data = byte_server.request("POST", path, body)
    err = json.loads(data)["error"]
    assert (status, err["param"], err["code"]) == (400, "prompt", "invalid_unicode")
    assert "surrogate" in err["message"]
    assert b"Traceback" not in byte_server.log.read_bytes()[start:]


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/metrics", "/"])
def test_head_is_answered_where_get_is_with_the_headers_only(quiet, path):
    status, headers, data = quiet.request("HEAD", path)
    get_status, get_headers, _ = quiet.request("GET", path)
    assert status == get_status == 200 and data == b""
    assert headers["Content-Type"] == get_headers["Content-Type"] and int(headers["Content-Length"]) > 0


def test_head_where_only_post_is_allowed_is_a_405(quiet):
    status, headers, data = quiet.request("HEAD", "/v1/completions")
    assert status == 405 and headers["Allow"] == "POST" and data == b""


@pytest.mark.parametrize("headers, status", [(b"Content-Length: 1000000000\r\n", 413),
                                             (b"Transfer-Encoding: chunked\r\n", 411),
                                             (b"Content-Length: x\r\n", 400)])
def test_a_body_to_be_refused_gets_its_status_instead_of_100_continue(quiet, headers, status):
    sock = socket.create_connection(("127.0.0.1", quiet.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n" + headers + b"\r\n")
    answer = read_to_close(sock)            # the client waits: not a byte of the body is sent
    sock.close()
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:40]


def test_a_body_within_the_limit_gets_100_continue(quiet):
    body = b'{"prompt": "ab", "max_tokens": 2}'
    sock = socket.create_connection(("127.0.0.1", quiet.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: 100-continue\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body))
    assert sock.recv(100).startswith(b"HTTP/1.1 100 ")
    sock.sendall(body)
    answer = read_to_close(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"completion_tokens": 2' in answer


def test_a_stream_to_an_http_1_0_client_is_not_chunked(quiet):
    body = b'{"prompt": "ab", "max_tokens": 5, "seed": 1, "stream": true}'
    sock = socket.create_connection(("127.0.0.1", quiet.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    answer = read_to_close(sock)            # the end of the stream is the end of the connection
    sock.close()
    head, _, data = answer.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" not in head.lower()
    assert data.startswith(b"data: {") and data.endswith(b"data: [DONE]\n\n")
    text = "".join(c["text"] for e in data.split(b"\n\n") if e.startswith(b"data: {")
                   for c in json.loads(e[6:])["choices"])
    assert text == quiet.complete(prompt="ab", max_tokens=5, seed=1)["choices"][0]["text"]


# --- queue, drain, CORS and addresses ------------------------------------------------

def test_a_queued_client_that_disconnects_gives_up_its_place_in_the_queue(serve):
    s = serve("--max-batch", 1, "--max-queue", 1, "--max-tokens-limit", 10**7)
    running = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    running.request("POST", "/v1/completions", json.dumps({"prompt": "a", "max_tokens": 10**7, "stream": True}))
    running.getresponse().read1(100)                # it holds the only row
    gone = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    gone.request("POST", "/v1/completions", json.dumps({"prompt": "b", "max_tokens": 3}))
    wait_for(lambda: s.metric("nn2_rows_queued") == 1, what="a queued request")
    gone.sock.shutdown(socket.SHUT_RDWR)            # it leaves while it waits
    gone.close()
    wait_for(lambda: s.metric("nn2_rows_queued") == 0, timeout=5, what="the queue to be empty")
    result = {}
    queued = threading.Thread(target=lambda: result.update(
        answer=s.request("POST", "/v1/completions", {"prompt": "c", "max_tokens": 3})))
    queued.start()                                  # takes the place the other left: waits, no 429
    wait_for(lambda: s.metric("nn2_rows_queued") == 1 or "answer" in result, what="the request to queue")
    assert "answer" not in result, result
    running.close()
    queued.join(20)
    assert result["answer"][0] == 200


def test_max_tokens_0_ends_each_choice_streamed_or_not(server):
    out = server.complete(prompt=["ab", "c"], n=2, max_tokens=0, echo=True)
    assert [(c["text"], c["finish_reason"]) for c in out["choices"]] == [("ab", "length")] * 2 + [("c", "length")] * 2
    events, done = server.stream(prompt=["ab", "c"], n=2, max_tokens=0, echo=True)
    assert done and texts_of(events) == {0: "ab", 1: "ab", 2: "c", 3: "c"}
    finish = {c["index"]: c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]}
    assert finish == {i: "length" for i in range(4)}


def test_a_client_still_sending_its_body_does_not_hold_up_the_drain(serve):
    s = serve("--drain-timeout", 60)
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
    assert s.request("GET", "/health")[0] == 200          # the server has the headers: its thread reads the body
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(20) == 0                             # not the 60 s of --drain-timeout
    sock.close()
    assert "stopped\n" in s.log.read_text()


def test_a_body_refused_unread_carries_the_cors_header(serve):
    s = serve("--max-body", 100, "--cors", "https://app.example")
    status, headers, data = s.request("POST", "/v1/completions", b"x" * 200, {"Origin": "https://app.example"})
    assert status == 413 and json.loads(data)["error"]["code"] == "body_too_large"
    assert headers["Access-Control-Allow-Origin"] == "https://app.example"


def test_max_queue_0_takes_requests_while_rows_are_free_and_refuses_the_rest(serve):
    s = serve("--max-batch", 1, "--max-queue", 0, "--max-tokens-limit", 10**7)
    assert len(s.complete(prompt="a", max_tokens=4)["choices"][0]["text"]) == 4
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "a", "max_tokens": 10**7, "stream": True}))
    conn.getresponse().read1(100)                   # the only row is taken
    status, headers, data = s.request("POST", "/v1/completions", {"prompt": "b", "max_tokens": 3})
    assert status == 429 and headers["Retry-After"] == "1" and json.loads(data)["error"]["code"] == "queue_full"
    conn.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_an_ipv6_host_is_served(model, tmp_path):
    log = tmp_path / "serve6.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "nn2run.serve", str(model), "--host", "::1", "--port", "0"],
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: "http://[::1]:" in log.read_text() or proc.poll() is not None, what="the server")
            port = int(re.search(r"http://\[::1\]:(\d+)", log.read_text()).group(1))
            conn = http.client.HTTPConnection("::1", port, timeout=10)
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
            conn.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()

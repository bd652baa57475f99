"""`nn2run serve` against careless and hostile clients: headers and bodies that are not
what HTTP or JSON promise. Each answer is a status with OpenAI's error shape, nothing
reaches the server's stderr as a traceback, and the server goes on serving."""

from __future__ import annotations

import json
import socket

import pytest

from support.models import build_model
from test_serve import Served, read_to_close


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

"""`nn2run serve` on a seq2seq model: POST /v1/translations through raw HTTP and gRPC's
Translate through stubs generated from the proto in the test, against
`nn2run.load(path).translate(...)` of the same file (tests/test_seq2seq_runtime.py checks
that against a float64 reference); the batching of queued requests, each error status, a
client that goes away, the timeout and the drain on SIGTERM. Every server listens on
127.0.0.1 on ports the kernel picks.

Servers whose worker must be held mid-search run under GATED: the model's search waits
while a file exists, so a test decides when it goes on instead of guessing timings."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import nn2run
from support import seq2seq as s2s
from support.models import BIN, build_model

HAVE_GRPC = all(importlib.util.find_spec(m) for m in ("grpc", "grpc_tools", "grpc_health"))
needs_grpc = pytest.mark.skipif(not HAVE_GRPC, reason="the grpc extra and grpcio-tools are not installed")
LINES = ["abc", "hgfedcba", "a", "ddd", "bcdefgh", "h", "abab", "gggggggggggg", "ca", ""]

GATED = textwrap.dedent("""
    import os, sys, time
    from nn2run import seq2seq
    from nn2run.serve import serve_command
    gate, search = os.environ["NN2_TEST_GATE"], seq2seq.Seq2SeqModel.search
    def gated(self, *args, **kwargs):
        end = time.monotonic() + 30
        while os.path.exists(gate) and time.monotonic() < end:
            time.sleep(0.01)
        return search(self, *args, **kwargs)
    seq2seq.Seq2SeqModel.search = gated
    serve_command(sys.argv[1:], prog_name="nn2run serve")
""")


class Served:
    """A `nn2run serve` process (under GATED when a gate file is given); stderr in a file."""

    def __init__(self, model, tmp_path, *args, gate=None, grpc_port=False):
        self.log = tmp_path / f"serve-{time.monotonic_ns()}.log"
        self._err = open(self.log, "w")
        argv = [str(model), "--port", "0", "--quiet", *map(str, args)] + (["--grpc-port", "0"] if grpc_port else [])
        command = [sys.executable, "-c", GATED, *argv] if gate else [str(BIN / "nn2run"), "serve", *argv]
        # cwd: `python -c` puts the working directory first on sys.path; nn2run comes from the path
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._err, cwd=tmp_path,
                                     env={**os.environ, "NN2_TEST_GATE": str(gate)})
        self.channel = None
        pattern = r"http://127\.0\.0\.1:(\d+)" + (r".*\n.*over gRPC on 127\.0\.0\.1:(\d+)" if grpc_port else "")
        end = time.monotonic() + 30
        while time.monotonic() < end and self.proc.poll() is None:
            m = re.search(pattern, self.log.read_text())
            if m:
                self.port = int(m.group(1))
                if grpc_port:
                    import grpc
                    self.channel = grpc.insecure_channel(f"127.0.0.1:{m.group(2)}")
                return
            time.sleep(0.05)
        self.stop()
        raise AssertionError("the server did not start: " + self.log.read_text())

    def request(self, method, path, body=None, timeout=30):
        """(status, body bytes)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data)
        r = conn.getresponse()
        out = r.status, r.read()
        conn.close()
        return out

    def translate(self, **body):
        """(status, the JSON answer)."""
        status, data = self.request("POST", "/v1/translations", body)
        return status, json.loads(data)

    def metric(self, name: str) -> float:
        _, text = self.request("GET", "/metrics")
        m = re.search(rf"^{re.escape(name)} (\S+)$", text.decode(), re.M)
        return float(m.group(1)) if m else 0.0

    def wait_metric(self, name: str, value: float, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while self.metric(name) != value:
            assert time.monotonic() < end, f"{name} never reached {value}: {self.metric(name)}"
            time.sleep(0.02)

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.channel is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        return self.proc.returncode


def in_thread(fn, *args, **kwargs):
    """Run fn in a thread; returns (thread, the dict its result lands in under "out")."""
    box = {}
    t = threading.Thread(target=lambda: box.__setitem__("out", fn(*args, **kwargs)))
    t.start()
    return t, box


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path, _ = s2s.build(tmp_path_factory.mktemp("s2s") / "dates.nnb", seed=0)
    return path


@pytest.fixture(scope="module")
def model(model_path):
    with nn2run.load(model_path) as m:
        yield m


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    s = Served(model_path, tmp_path_factory.mktemp("served"), "--max-batch", 16, grpc_port=HAVE_GRPC)
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.log.read_text()          # no expected error ever gives one


@pytest.fixture
def serve(model_path, tmp_path):
    started = []

    def start(*args, gated=False, grpc_port=False):
        gate = tmp_path / f"gate-{len(started)}"
        if gated:
            gate.touch()
        s = Served(model_path, tmp_path, *args, gate=gate if gated else None, grpc_port=grpc_port)
        s.gate = gate
        started.append(s)
        return s
    yield start
    for s in started:
        s.gate.unlink(missing_ok=True)
        s.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    """(messages, services) generated from nn2run/proto/nn2.proto, as any client would."""
    if not HAVE_GRPC:
        pytest.skip("the grpc extra and grpcio-tools are not installed")
    from test_grpc import generated_stubs
    return generated_stubs(tmp_path_factory.mktemp("stubs"))


def expected(model, texts, beam=1, n_best=None, length_penalty=1.0, max_len=None):
    return model.translate(texts, beam=beam, n_best=n_best, length_penalty=length_penalty, max_len=max_len)


def assert_same(got, want):
    """Translations equal; with n_best, texts equal and scores within float rounding."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(w, str):
            assert g == w
        else:
            assert [h["text"] for h in g] == [t for t, _ in w]
            assert [h["score"] for h in g] == pytest.approx([s for _, s in w], abs=1e-6)


# --- HTTP ---------------------------------------------------------------------------------
def test_translations_are_what_the_python_api_gives(server, model):
    status, obj = server.translate(texts=LINES)
    assert status == 200 and obj["model"] == "dates"
    assert obj["translations"] == expected(model, LINES)
    assert len(set(obj["translations"])) >= 5              # the model's outputs differ from text to text
    options = dict(beam=3, n_best=2, length_penalty=0.6, max_len=4)
    status, obj = server.translate(texts=LINES, **options)
    assert status == 200
    assert_same(obj["translations"], expected(model, LINES, **options))
    assert obj["translations"][-1] == [{"text": "", "score": 0.0}]       # an empty text
    status, obj = server.translate(texts=["abc"], beam=4, n_best=None, length_penalty=None, max_len=None)
    assert status == 200 and obj["translations"] == expected(model, ["abc"], beam=4)


def test_health_models_metrics_and_the_language_model_routes_named(server):
    assert server.request("GET", "/health") == (200, b'{"status": "ok"}')
    status, data = server.request("GET", "/v1/models")
    assert status == 200 and json.loads(data)["data"][0]["id"] == "dates"
    before = server.metric("nn2_texts_translated_total")
    assert server.translate(texts=["ab", "", "cd"])[0] == 200
    assert server.metric("nn2_texts_translated_total") == before + 2        # the empty text needs no search
    for method, path in (("POST", "/v1/completions"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/")):
        status, data = server.request(method, path, b'{"prompt": "ab"}' if method == "POST" else None)
        error = json.loads(data)["error"]
        assert status == 404 and error["code"] == "wrong_model_kind", (path, data)
        assert "language models" in error["message"] and "seq2seq model 'dates'" in error["message"]
    status, data = server.request("GET", "/v1/translations")
    assert status == 405 and json.loads(data)["error"]["code"] == "method_not_allowed"


def test_a_language_model_server_names_its_kind_on_translations(tmp_path):
    lm, _, _ = build_model(tmp_path / "lm.nnb", "lstm", 8, 1, 5)
    s = Served(lm, tmp_path)
    try:
        status, obj = s.translate(texts=["abc"])
        assert status == 404 and obj["error"]["code"] == "wrong_model_kind"
        assert "seq2seq models" in obj["error"]["message"] and "language model 'lm'" in obj["error"]["message"]
        assert s.request("POST", "/v1/completions", {"prompt": "ab", "max_tokens": 3})[0] == 200
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("body, param, code, words", [
    (b'{"texts": ["ab"', None, "invalid_json", "not valid JSON"),
    ({"texts": ["ab", "aZbQ"]}, "texts", "unknown_characters",
     "texts[1]: characters not in the model's vocabulary: 'Z', 'Q'"),
    ({"texts": ["a" * 13]}, "texts", "text_too_long",
     "texts[0]: 13 tokens, longer than the model's source limit of 12"),
    ({"texts": ["ab"] * 65}, "texts", "out_of_range", "1 to 64 texts, got 65"),
    ({"texts": []}, "texts", "out_of_range", "1 to 64 texts, got 0"),
    ({"texts": "ab"}, "texts", "invalid_type", "a list of strings"),
    ({"texts": ["ab", 3]}, "texts", "invalid_type", "a list of strings"),
    ({"texts": ["ab"], "beam": 0}, "beam", "out_of_range", "got 0"),
    ({"texts": ["ab"], "beam": 2.5}, "beam", "invalid_type", "an integer"),
    ({"texts": ["ab"], "beam": 2, "n_best": 3}, "n_best", "out_of_range", "at most 'beam' (2), got 3"),
    ({"texts": ["ab"], "n_best": 2}, "n_best", "out_of_range", "at most 'beam' (1)"),
    ({"texts": ["ab"], "length_penalty": -1}, "length_penalty", "out_of_range", ">= 0"),
    ({"texts": ["ab"], "length_penalty": "x"}, "length_penalty", "invalid_type", "a number"),
    ({"texts": ["abc", "a"], "beam": 3, "length_penalty": 1e308}, "length_penalty", "out_of_range", "<= 10"),
    ({"texts": ["ab"], "max_len": 0}, "max_len", "out_of_range", "a positive integer"),
    ({"texts": ["ab"], "temperature": 1}, "temperature", "unknown_parameter", "temperature"),
])
def test_bad_requests_are_400_naming_the_problem(server, body, param, code, words):
    status, data = server.request("POST", "/v1/translations", body)
    error = json.loads(data)["error"]
    assert status == 400 and (error["param"], error["code"]) == (param, code), data
    assert words in error["message"] and "\n" not in error["message"]


def test_the_model_field_must_name_the_served_model(server):
    status, obj = server.translate(texts=["ab"], model="other")
    assert status == 404 and obj["error"]["code"] == "model_not_found"
    assert server.translate(texts=["ab"], model="dates")[0] == 200


def test_concurrent_clients_get_exactly_the_single_request_answers(server, model):
    rng = random.Random(1)
    plans = [[(rng.sample(LINES, rng.randint(1, 4)), rng.choice([1, 2, 3])) for _ in range(3)] for _ in range(8)]
    results = [[] for _ in plans]

    def client(i):
        for texts, beam in plans[i]:
            results[i].append(server.translate(texts=texts, beam=beam, n_best=beam if beam > 1 else None))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for plan, got in zip(plans, results):
        assert len(got) == len(plan)
        for (texts, beam), (status, obj) in zip(plan, got):
            assert status == 200, obj
            assert_same(obj["translations"], expected(model, texts, beam=beam, n_best=beam if beam > 1 else None))


def test_queued_requests_are_translated_together_and_a_full_queue_is_429(serve, model):
    s = serve("--max-queue", 2, gated=True)
    first, first_box = in_thread(s.translate, texts=["abc"])
    s.wait_metric("nn2_texts_running", 1)                     # the worker holds it in its search
    waiting = [in_thread(s.translate, texts=texts) for texts in (["hgfedcba", "a"], ["ddd"])]
    s.wait_metric("nn2_texts_queued", 3)
    status, obj = s.translate(texts=["ab"])
    assert status == 429 and obj["error"]["code"] == "queue_full" and "queue" in obj["error"]["message"]
    s.gate.unlink()
    for (t, box), texts in zip([(first, first_box)] + waiting, (["abc"], ["hgfedcba", "a"], ["ddd"])):
        t.join(30)
        assert box["out"] == (200, {"model": "dates", "translations": expected(model, texts)})
    # the two requests that waited went in one batch of three texts
    assert (s.metric("nn2_search_batches_total"), s.metric("nn2_texts_per_batch_sum")) == (2, 4)
    assert s.metric('nn2_texts_per_batch_bucket{le="2"}') == 1
    assert s.stop() == 0 and "Traceback" not in s.log.read_text()


def test_max_queue_0_takes_requests_while_the_worker_is_free(serve, model):
    s = serve("--max-queue", 0, gated=True)
    first, first_box = in_thread(s.translate, texts=["abc"])
    s.wait_metric("nn2_texts_running", 1)                     # the worker is busy with it
    status, obj = s.translate(texts=["ab"])
    assert status == 429 and obj["error"]["code"] == "queue_full"
    s.gate.unlink()
    first.join(30)
    assert first_box["out"] == (200, {"model": "dates", "translations": expected(model, ["abc"])})
    assert s.translate(texts=["ddd"]) == (200, {"model": "dates", "translations": expected(model, ["ddd"])})


def test_a_client_that_goes_away_does_not_break_the_worker(serve, model):
    s = serve(gated=True)
    running, running_box = in_thread(s.translate, texts=["abc"])
    s.wait_metric("nn2_texts_running", 1)
    body = json.dumps({"texts": ["ddd", "ca"]}).encode()
    for k in (1, 2):          # clients that leave while their request waits
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        sock.sendall(b"POST /v1/translations HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        s.wait_metric("nn2_texts_queued", 2 * k)
        sock.close()
        s.wait_metric('nn2_requests_total{status="499"}', k)
    assert s.metric("nn2_texts_queued") == 4      # still queued: the worker drops them when it comes to them
    s.gate.unlink()
    running.join(30)
    assert running_box["out"][0] == 200
    assert s.translate(texts=["ddd"]) == (200, {"model": "dates", "translations": expected(model, ["ddd"])})
    assert s.metric("nn2_texts_translated_total") == 2       # the abandoned texts were never searched
    assert s.stop() == 0 and "Traceback" not in s.log.read_text()


def test_a_request_past_the_timeout_gets_504(serve, model):
    s = serve("--timeout", 0.3, gated=True)
    running, _ = in_thread(s.translate, texts=["abc"])
    s.wait_metric("nn2_texts_running", 1)
    status, obj = s.translate(texts=["ddd"])                   # waits behind it, past its deadline
    assert status == 504 and obj["error"]["code"] == "timeout" and "deadline" in obj["error"]["message"]
    s.gate.unlink()
    running.join(30)
    assert s.translate(texts=["ca"]) == (200, {"model": "dates", "translations": expected(model, ["ca"])})
    assert s.stop() == 0 and "Traceback" not in s.log.read_text()


def test_sigterm_drains_then_exits_zero(serve, model):
    s = serve(gated=True, grpc_port=HAVE_GRPC)
    running, box = in_thread(s.translate, texts=["hgfedcba", "abab"], beam=2)
    s.wait_metric("nn2_texts_running", 2)
    s.proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + 20
    while s.request("GET", "/health")[0] != 503:
        assert time.monotonic() < end
        time.sleep(0.02)
    status, obj = s.translate(texts=["ab"])
    assert status == 503 and obj["error"]["code"] == "draining"
    s.gate.unlink()
    running.join(30)
    assert box["out"] == (200, {"model": "dates", "translations": expected(model, ["hgfedcba", "abab"], beam=2)})
    assert s.proc.wait(30) == 0
    log = s.log.read_text()
    assert "nn2run: stopped\n" in log and "Traceback" not in log


def test_the_drain_timeout_ends_the_requests_left_with_503(serve):
    s = serve("--drain-timeout", 0.3, gated=True)
    running = in_thread(s.translate, texts=["abc"])
    s.wait_metric("nn2_texts_running", 1)
    queued = in_thread(s.translate, texts=["ddd"])
    s.wait_metric("nn2_texts_queued", 1)
    s.proc.send_signal(signal.SIGTERM)
    for t, box in (running, queued):
        t.join(30)
        status, obj = box["out"]
        assert status == 503 and obj["error"]["code"] == "shutdown" and "stopped" in obj["error"]["message"]
    s.gate.unlink()
    assert s.proc.wait(30) == 0
    log = s.log.read_text()
    assert "nn2run: stopped with requests still running\n" in log and "Traceback" not in log


def test_serve_help_names_the_translations_route():
    r = subprocess.run([str(BIN / "nn2run"), "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "/v1/translations" in r.stdout and "Translator" in r.stdout


# --- gRPC -------------------------------------------------------------------------------------
def _translate(pb, channel, timeout=30, **fields):
    messages, services = pb
    return services.TranslatorStub(channel).Translate(messages.TranslateRequest(**fields), timeout=timeout)


def _grpc_error(pb, channel, **fields):
    import grpc
    with pytest.raises(grpc.RpcError) as e:
        _translate(pb, channel, **fields)
    return e.value.code(), e.value.details()


@needs_grpc
def test_grpc_translate_gives_the_http_answers_beside_health(pb, server, model):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "nn2.v1.Translator"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reply = _translate(pb, server.channel, texts=LINES)
    assert [[h.text for h in t.hypotheses] for t in reply.translations] == [[t] for t in expected(model, LINES)]
    reply = _translate(pb, server.channel, texts=LINES, beam=3, n_best=2, length_penalty=0.6, max_len=4)
    got = [[{"text": h.text, "score": h.score} for h in t.hypotheses] for t in reply.translations]
    assert_same(got, expected(model, LINES, beam=3, n_best=2, length_penalty=0.6, max_len=4))
    messages, services = pb
    with pytest.raises(grpc.RpcError) as e:                    # a seq2seq server has no Generator
        list(services.GeneratorStub(server.channel).Generate(messages.GenerateRequest(prompt="ab"), timeout=10))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


@needs_grpc
def test_grpc_bad_input_is_invalid_argument_naming_the_problem(pb, server):
    import grpc
    for fields, words in ((dict(texts=["ab", "aZ"]), "texts[1]: characters not in the model's vocabulary: 'Z'"),
                          (dict(texts=["a" * 13]), "source limit of 12"), (dict(texts=["a"] * 65), "got 65"),
                          (dict(texts=[]), "got 0"), (dict(texts=["ab"], beam=0), "'beam'"),
                          (dict(texts=["ab"], beam=2, n_best=3), "'n_best'"),
                          (dict(texts=["ab"], length_penalty=-1.0), "'length_penalty'"),
                          (dict(texts=["ab"], max_len=-2), "'max_len'")):
        code, details = _grpc_error(pb, server.channel, **fields)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, (fields, details)


@needs_grpc
def test_grpc_full_queue_deadline_and_drain(pb, serve, model):
    import grpc
    s = serve("--max-queue", 2, gated=True, grpc_port=True)
    running, box = in_thread(_translate, pb, s.channel, texts=["abc"])
    s.wait_metric("nn2_texts_running", 1)
    code, _ = _grpc_error(pb, s.channel, timeout=0.3, texts=["ddd"])          # the client's deadline
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    queued, queued_box = in_thread(_translate, pb, s.channel, texts=["ca"])
    s.wait_metric("nn2_texts_queued", 2)                     # the call past its deadline waits to be dropped
    code, details = _grpc_error(pb, s.channel, texts=["ab"])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in details
    s.proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + 20
    while s.request("GET", "/health")[0] != 503:
        assert time.monotonic() < end
        time.sleep(0.02)
    code, details = _grpc_error(pb, s.channel, texts=["ab"])
    assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
    s.gate.unlink()
    for t, b, texts in ((running, box, ["abc"]), (queued, queued_box, ["ca"])):
        t.join(30)
        assert [t.hypotheses[0].text for t in b["out"].translations] == expected(model, texts)
    assert s.proc.wait(30) == 0 and "Traceback" not in s.log.read_text()

"""`nn2run serve --grpc-port`: real gRPC clients on 127.0.0.1, their stubs generated from
nn2run/proto/nn2.proto in the test (as a client in any language would be): health, a
streamed Generate, determinism by seed, each error status, cancellation freeing the row,
the drain on SIGTERM, and the one line without the extra."""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from support.models import BIN, ROOT, build_model

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_tools")
pytest.importorskip("grpc_health")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def generated_stubs(out):
    """(messages, services) generated from the proto into the folder `out`."""
    from grpc_tools import protoc
    proto = ROOT / "nn2run" / "proto"
    assert protoc.main(["protoc", f"-I{proto}", f"--python_out={out}", f"--grpc_python_out={out}",
                        str(proto / "nn2.proto")]) == 0
    sys.path.insert(0, str(out))
    try:
        import nn2_pb2
        import nn2_pb2_grpc
    finally:
        sys.path.remove(str(out))
    return nn2_pb2, nn2_pb2_grpc


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    return generated_stubs(tmp_path_factory.mktemp("stubs"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _, _ = build_model(tmp_path_factory.mktemp("m") / "m.nnb", "lstm", 16, 1, 5)
    return path


class Served:
    """`nn2run serve --grpc-port 0`; the HTTP and gRPC ports from its first lines."""

    def __init__(self, model, tmp_path, *args):
        self.log = tmp_path / f"serve-{time.monotonic_ns()}.log"
        self._err = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "nn2run.serve", str(model), "--port", "0",
                                      "--grpc-port", "0", "--quiet", *map(str, args)],
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        end = time.monotonic() + 30
        while time.monotonic() < end and self.proc.poll() is None:
            text = self.log.read_text()
            m = re.search(r"http://127\.0\.0\.1:(\d+).*\n.*over gRPC on 127\.0\.0\.1:(\d+)", text)
            if m:
                self.port, self.grpc_port = int(m.group(1)), int(m.group(2))
                self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
                return
            time.sleep(0.05)
        self.stop()
        raise AssertionError("the server did not start: " + self.log.read_text())

    def metric(self, name: str) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    def wait_for(self, name: str, value: float, timeout: float = 10.0) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.metric(name)
            if got == value:
                return got
            time.sleep(0.02)
        return got

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self._err.close()


@pytest.fixture
def serve(model, tmp_path):
    started = []

    def start(*args):
        s = Served(model, tmp_path, *args)
        started.append(s)
        return s
    yield start
    for s in started:
        s.channel.close()
        s.stop()


def _generate(pb, channel, timeout=30, **fields):
    messages, services = pb
    return list(services.GeneratorStub(channel).Generate(messages.GenerateRequest(**fields), timeout=timeout))


def _status(pb, channel, **fields):
    with pytest.raises(grpc.RpcError) as e:
        _generate(pb, channel, **fields)
    return e.value.code(), e.value.details()


def _cli(model, *args) -> str:
    r = subprocess.run([str(BIN / "nn2run"), str(model), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_health_and_a_streamed_generate_that_matches_the_command_line(pb, model, serve):
    s = serve("--max-tokens-limit", 10**7)
    health = health_pb2_grpc.HealthStub(s.channel)
    for service in ("", "nn2.v1.Generator"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == SERVING
    messages, services = pb
    # streamed, not one reply at the end: text arrives while a long request is still running
    # (a short one may finish between two of the server's reads and come as one reply)
    long = services.GeneratorStub(s.channel).Generate(messages.GenerateRequest(prompt="a", max_tokens=10**7),
                                                      timeout=60)
    first = next(long)
    assert first.text and first.finish_reason == messages.FINISH_REASON_UNSPECIFIED
    long.cancel()
    replies = _generate(pb, s.channel, prompt="abc", max_tokens=400, seed=3, temperature=0.7)
    assert all(r.finish_reason == messages.FINISH_REASON_UNSPECIFIED for r in replies[:-1])
    last = replies[-1]
    assert last.finish_reason == messages.FINISH_REASON_LENGTH
    assert (last.prompt_tokens, last.completion_tokens) == (3, 400)
    text = "".join(r.text for r in replies)
    # the float 0.7 arrives as a float32; it samples as `nn2run -t 0.7` does
    assert "abc" + text == _cli(model, "--prime", "abc", "-n", "400", "--seed", "3", "-t", "0.7")


def test_the_same_seed_gives_the_same_text_over_grpc_and_http(pb, serve):
    s = serve()
    texts = ["".join(r.text for r in _generate(pb, s.channel, prompt="ab", max_tokens=80, seed=seed))
             for seed in (5, 5, 6)]
    assert texts[0] == texts[1] != texts[2]
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "ab", "max_tokens": 80, "seed": 5}))
    assert json.loads(conn.getresponse().read())["choices"][0]["text"] == texts[0]
    conn.close()
    stop = _generate(pb, s.channel, prompt="ab", max_tokens=80, seed=5, stop=[texts[0][10:13]])
    assert "".join(r.text for r in stop) == texts[0][:texts[0].find(texts[0][10:13])]
    assert stop[-1].finish_reason == pb[0].FINISH_REASON_STOP


def test_bad_input_is_invalid_argument_naming_the_problem(pb, serve):
    s = serve("--max-tokens-limit", 100, "--max-tokens-default", 50)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    code, details = _status(pb, s.channel, prompt="abZcÜ")
    assert code == invalid and "'Z'" in details and "'Ü'" in details
    for fields, named in ((dict(max_tokens=101), "max_tokens"), (dict(top_p=0.0), "top_p"),
                          (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                          (dict(seed=-1), "seed"), (dict(stop=["a", "b", "c", "d", "e"]), "stop")):
        code, details = _status(pb, s.channel, prompt="ab", **fields)
        assert code == invalid and named in details, (fields, details)
    messages, services = pb
    stub = services.GeneratorStub(s.channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.Detokenize(messages.DetokenizeRequest(ids=[0, 9]), timeout=10)
    assert e.value.code() == invalid and "9" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Tokenize(messages.TokenizeRequest(text="aXb"), timeout=10)
    assert e.value.code() == invalid and "'X'" in e.value.details()
    assert list(stub.Tokenize(messages.TokenizeRequest(text="abe"), timeout=10).ids) == [0, 1, 4]
    assert stub.Detokenize(messages.DetokenizeRequest(ids=[4, 0]), timeout=10).text == "ea"


def test_a_request_that_does_not_parse_is_invalid_argument(serve):
    # field 1 (the prompt, the text) holding bytes that are not UTF-8: a client the generated
    # stubs would not let through, but another language's client or a proxy can send
    s = serve()
    raw = b"\x0a\x02\xff\xfe"
    calls = [s.channel.unary_stream("/nn2.v1.Generator/Generate", request_serializer=bytes),
             s.channel.unary_unary("/nn2.v1.Generator/Tokenize", request_serializer=bytes)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            list(call(raw, timeout=10))         # a unary call raises in the call, a stream in the list
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not parse" in e.value.details() and "UTF-8" in e.value.details()


def test_a_full_queue_is_resource_exhausted(pb, serve):
    s = serve("--max-batch", 1, "--max-queue", 1, "--max-tokens-limit", 1000000)
    messages, services = pb
    stub = services.GeneratorStub(s.channel)
    running = stub.Generate(messages.GenerateRequest(prompt="a", max_tokens=1000000), timeout=60)
    next(running)                                              # it holds the only row
    waiting = stub.Generate(messages.GenerateRequest(prompt="a", max_tokens=5), timeout=60)
    assert s.wait_for("nn2_rows_queued", 1) == 1               # and this one the only place in the queue
    code, details = _status(pb, s.channel, prompt="a", max_tokens=5)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in details
    running.cancel()
    assert "".join(r.text for r in waiting) and s.wait_for("nn2_rows_running", 0) == 0


def test_deadlines_are_deadline_exceeded(pb, serve):
    s = serve("--max-tokens-limit", 1000000, "--timeout", 0.5)
    code, _ = _status(pb, s.channel, timeout=0.3, prompt="a", max_tokens=1000000)      # the client's deadline
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    code, details = _status(pb, s.channel, timeout=30, prompt="a", max_tokens=1000000)  # the server's --timeout
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in details
    assert s.wait_for("nn2_rows_running", 0) == 0


def test_a_client_that_cancels_or_goes_away_frees_its_row(pb, serve):
    s = serve("--max-tokens-limit", 1000000)
    messages, services = pb
    call = services.GeneratorStub(s.channel).Generate(messages.GenerateRequest(prompt="a", max_tokens=1000000))
    next(call)
    other = grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}")
    gone = services.GeneratorStub(other).Generate(messages.GenerateRequest(prompt="b", max_tokens=1000000))
    next(gone)
    assert s.metric("nn2_rows_running") == 2                   # two rows of one batched VM
    call.cancel()
    assert s.wait_for("nn2_rows_running", 1) == 1
    other.close()                                              # the connection goes: its call with it
    assert s.wait_for("nn2_rows_running", 0) == 0
    assert "".join(r.text for r in _generate(pb, s.channel, prompt="a", max_tokens=5))   # still serving


def test_sigterm_drains_health_not_serving_new_calls_unavailable(pb, serve):
    s = serve("--max-tokens-limit", 1000000)
    messages, services = pb
    # long enough (~0.5 s here) to be running still when the signal comes, on a loaded machine too
    running = services.GeneratorStub(s.channel).Generate(messages.GenerateRequest(prompt="a", max_tokens=30000),
                                                         timeout=60)
    first = next(running)
    assert first.finish_reason == messages.FINISH_REASON_UNSPECIFIED
    s.proc.send_signal(signal.SIGTERM)
    health = health_pb2_grpc.HealthStub(s.channel)
    end = time.monotonic() + 10
    while health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status != NOT_SERVING:
        assert time.monotonic() < end
        time.sleep(0.02)
    code, details = _status(pb, s.channel, prompt="a", max_tokens=5)
    assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
    rest = list(running)                                       # the call in flight finishes
    assert len(first.text + "".join(r.text for r in rest)) == 30000
    assert rest[-1].finish_reason == messages.FINISH_REASON_LENGTH
    assert s.proc.wait(30) == 0


BLOCK_GRPC = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("grpc", "grpc_health", "google"):
                raise ImportError(name + " is blocked in this test")
    sys.meta_path.insert(0, Block())
    from nn2run.cli import main
    sys.argv = ["nn2run"] + sys.argv[1:]
    main()
""")


@pytest.mark.parametrize("args", [["serve", "{m}", "--grpc-port", "0"], ["serve", "{m}", "--codec-service", "h:1"],
                                  ["{m}", "--codec-service", "h:1", "-n", "3"]])
def test_without_the_extra_the_grpc_options_say_what_to_install(model, args):
    r = subprocess.run([sys.executable, "-c", BLOCK_GRPC, *[a.format(m=model) for a in args]],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and 'pip install "nn2[grpc]"' in r.stderr and "grpcio" in r.stderr, r.stderr


def test_a_grpc_port_in_use_is_one_line(model):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "nn2run.serve", str(model), "--port", "0", "--grpc-port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr == f"nn2run: cannot listen on 127.0.0.1:{port} for gRPC: the port is in use or not allowed\n"

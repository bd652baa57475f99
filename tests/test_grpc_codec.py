"""The sample codec service end to end: start samples/codec_service/word_codec.py, train a
tiny model with `nn2c train --codec-service`, generate with `nn2run --codec-service`
and serve with it (HTTP and gRPC), one Encode per prompt and one DecodeStep per step."""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from support.models import BIN, ROOT

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_tools")
pytest.importorskip("grpc_health")
pytest.importorskip("torch")
pytest.importorskip("lark")

RHYMES = ROOT / "samples" / "corpus" / "rhymes.txt"
WORD = re.compile(r"[\w']+|\n|[^\w\s]")


class WordCodec:
    def __init__(self, tmp, corpus=RHYMES):
        self.log = tmp / f"codec-{time.monotonic_ns()}.log"
        self._err = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "samples" / "codec_service" / "word_codec.py"),
                                      "--port", "0", "--corpus", str(corpus)],
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        end = time.monotonic() + 30
        while time.monotonic() < end and self.proc.poll() is None:
            m = re.search(r"on 127\.0\.0\.1:(\d+)", self.log.read_text())
            if m:
                self.address = f"127.0.0.1:{m.group(1)}"
                return
            time.sleep(0.05)
        raise AssertionError("the codec service did not start: " + self.log.read_text())

    def stop(self) -> dict:
        """Stop it; the calls it answered, by name, and the rows it decoded."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)
        self._err.close()
        last = self.log.read_text().strip().splitlines()[-1]
        counts = {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", last.split(";")[0].split("answered")[1])}
        counts["rows"] = int(re.search(r"(\d+) rows decoded", last).group(1))
        return counts


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    c = WordCodec(tmp_path_factory.mktemp("codec"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def trained(codec, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "words.nnb"
    r = subprocess.run([str(BIN / "nn2c"), "train", str(RHYMES), "--codec-service", codec.address, "-o", str(out),
                        "--steps", "30", "--hidden", "32", "--layers", "1", "--seq-len", "16", "--batch", "8",
                        "--eval-every", "30", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def _nn2run(*args, stdin=None):
    return subprocess.run([str(BIN / "nn2run"), *map(str, args)], capture_output=True, text=True, timeout=60,
                          input=stdin)


def test_the_file_records_the_services_vocabulary(trained):
    import nn2run
    text = RHYMES.read_text(encoding="utf-8")
    tokens = list(dict.fromkeys(["\n", *WORD.findall(text)]))      # the sample's rule, written again
    with nn2run.load(trained) as m:
        c = m.header["codec"]
        assert (c["name"], c["service"], c["version"]) == ("service", "word", "1")
        assert c["vocab"] == tokens and c["special"] == {"start": 0}
        assert m.param("W_y").shape == (len(tokens), 32)


def test_generate_with_the_codec_service(trained, codec):
    args = (trained, "--codec-service", codec.address, "--prime", "The old dog", "-n", "40", "--seed", "1")
    r = _nn2run(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The old dog") and _nn2run(*args).stdout == r.stdout   # then a word or "."
    vocab = set(_header_vocab(trained))
    words = WORD.findall(r.stdout)
    assert len(words) == 3 + 40 and set(words) <= vocab
    for line in r.stdout.split("\n"):                       # the decoder's spacing
        assert "  " not in line and not line.startswith(" ") and not re.search(r" [.,!?;:]", line)
    lines = _nn2run(trained, "--codec-service", codec.address, "--lines", "-n", "10", "--seed", "2",
                    stdin="The cat\nThe moon\n")
    assert lines.returncode == 0, lines.stderr
    got = lines.stdout.splitlines()
    assert len(got) == 2 and got[0].startswith("The cat ") and got[1].startswith("The moon ")
    scored = _nn2run("score", trained, "--codec-service", codec.address, "--jsonl", stdin="The old dog\nThe moon\n")
    assert scored.returncode == 0, scored.stderr
    assert [json.loads(x)["tokens"] for x in scored.stdout.splitlines()] == [3, 2]      # words, not characters


def _header_vocab(path):
    import nn2run
    with nn2run.load(path) as m:
        return m.vocab


def test_without_the_service_or_with_another_one_is_one_line(trained, codec, tmp_path):
    r = _nn2run(trained, "--prime", "The", "-n", "5")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--codec-service" in r.stderr, r.stderr
    for args in (["-n", "5"], ["-n", "5", "--jsonl"]):          # no prime: nothing to encode, still one line
        r = _nn2run(trained, *args)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--codec-service" in r.stderr, r.stderr
        assert r.stdout == "" and "Traceback" not in r.stderr
    r = _nn2run(trained, "--codec-service", codec.address, "--prime", "The zebra", "-n", "5")
    assert r.returncode == 1 and "'zebra'" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text("A different text.\nWith other words.\n", encoding="utf-8")
    other = WordCodec(tmp_path, other_corpus)
    try:
        r = _nn2run(trained, "--codec-service", other.address, "-n", "5")
        assert r.returncode == 1 and "other tokens" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    finally:
        other.stop()
    r = _nn2run(trained, "--codec-service", "127.0.0.1:1", "-n", "5")
    assert r.returncode == 1 and "not reachable" in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("args, says", [(["--codec-service", "127.0.0.1:1"], "not reachable"),
                                        (["--codec-service", "{addr}", "--codec", "byte"], "not both")])
def test_train_with_a_service_it_cannot_use_is_one_line(codec, tmp_path, args, says):
    r = subprocess.run([str(BIN / "nn2c"), "train", str(RHYMES), "-o", str(tmp_path / "m.nnb"), "--steps", "1",
                        *[a.format(addr=codec.address) for a in args]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "m.nnb").exists()


def test_serve_with_the_codec_service_one_decode_call_per_step(trained, tmp_path):
    from test_grpc import Served, generated_stubs
    (tmp_path / "stubs").mkdir()
    messages, services = generated_stubs(tmp_path / "stubs")
    codec = WordCodec(tmp_path)                              # its own, to count its calls
    s = Served(trained, tmp_path, "--codec-service", codec.address)
    try:
        stub = services.GeneratorStub(s.channel)
        texts = [None] * 8

        def run(i):
            replies = stub.Generate(messages.GenerateRequest(prompt="The old dog", max_tokens=40, seed=i), timeout=60)
            texts[i] = "".join(r.text for r in replies)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(t is not None and len(WORD.findall(t)) == 40 for t in texts), texts
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "The old dog", "max_tokens": 40, "seed": 3}))
        assert json.loads(conn.getresponse().read())["choices"][0]["text"] == texts[3]      # HTTP beside gRPC
        conn.close()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(messages.GenerateRequest(prompt="The zebra", max_tokens=4), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'zebra'" in e.value.details()
    finally:
        s.channel.close()
        s.stop()
        counts = codec.stop()
    assert counts["Encode"] == 8 + 1 + 1                     # once per prompt: 8 gRPC, 1 HTTP, the refused one
    assert counts["rows"] == 9 * 40
    assert counts["DecodeStep"] <= counts["rows"] / 4         # one call per step, for every stream in it


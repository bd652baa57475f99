"""A word-level codec served over gRPC: the Codec service of nn2run/proto/nn2.proto.

    python samples/codec_service/word_codec.py --port 50151 [--corpus FILE]
    nn2c train FILE --codec-service 127.0.0.1:50151 -o words.nnb
    nn2run words.nnb --codec-service 127.0.0.1:50151 --prime "The old dog" -n 40

Tokens are the words of the corpus (letters, digits and apostrophes, case kept), each
punctuation character and the newline; spaces are not tokens. Decoding puts them back:
a word gets a space before it unless it starts the text, a line or follows an opening
bracket. So the decoder of a stream has state (what its last token was), which is why
DecodeStep names streams and StreamStart gives each its prompt. Text with a word the
corpus does not have is refused (INVALID_ARGUMENT naming the words).

Needs the grpc extra (`pip install "nn2[grpc]"`); the messages come from nn2run.proto.
On exit (SIGTERM, Ctrl-C) it prints how many calls it answered.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "NONE")     # grpcio's own log lines would follow ours on stderr
import grpc  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))      # run from a checkout: this nn2run
from nn2run.proto import nn2_pb2, nn2_pb2_grpc  # noqa: E402

NAME, VERSION = "word", "1"
TOKEN = re.compile(r"[\w']+|\n|[^\w\s]")
OPENING = set("([{")
MAX_STREAMS = 1 << 16        # decoders kept for streams never ended; the oldest go first
DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "rhymes.txt"


def vocabulary(text: str) -> list[str]:
    """The newline, then every token of the corpus in order of first appearance."""
    return list(dict.fromkeys(["\n", *TOKEN.findall(text)]))


class WordCodec(nn2_pb2_grpc.CodecServicer):
    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        self.last: collections.OrderedDict[int, str] = collections.OrderedDict()   # stream -> last token
        self.lock = threading.Lock()
        self.calls = collections.Counter()
        self.rows = 0

    def Info(self, request, context):
        self.calls["Info"] += 1
        return nn2_pb2.InfoReply(name=NAME, version=VERSION, vocab_size=len(self.tokens), tokens=self.tokens,
                                 special=[nn2_pb2.SpecialToken(name="start", id=self.index["\n"])])

    def Encode(self, request, context):
        self.calls["Encode"] += 1
        words = TOKEN.findall(request.text)
        unknown = list(dict.fromkeys(w for w in words if w not in self.index))
        if unknown:
            shown = ", ".join(repr(w) for w in unknown[:10])
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"words not in the codec's vocabulary: {shown}")
        return nn2_pb2.EncodeReply(ids=[self.index[w] for w in words])

    def _text(self, previous: str | None, token: str) -> str:
        glued = previous is None or previous == "\n" or previous in OPENING
        is_word = TOKEN.fullmatch(token) is not None and (token[0].isalnum() or token[0] in "_'")
        return token if glued or not (is_word or token in OPENING) else " " + token

    def DecodeStep(self, request, context):
        self.calls["DecodeStep"] += 1
        out = []
        with self.lock:
            for s in request.started:
                self.last[s.stream_id] = self.tokens[s.prompt[-1]] if s.prompt else None
            for row in request.rows:
                if row.id >= len(self.tokens):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token id {row.id} is not in the vocabulary")
                token = self.tokens[row.id]
                text = self._text(self.last.get(row.stream_id), token)
                out.append(nn2_pb2.TextRow(stream_id=row.stream_id, text=text))
                self.last[row.stream_id] = token
                self.last.move_to_end(row.stream_id)
            for sid in request.ended:
                self.last.pop(sid, None)
            while len(self.last) > MAX_STREAMS:
                self.last.popitem(last=False)
            self.rows += len(request.rows)
        return nn2_pb2.DecodeStepReply(rows=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=50151, help="0 picks a free port (printed)")
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="the text whose words are the vocabulary")
    args = ap.parse_args(argv)
    try:
        text = Path(args.corpus).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        print(f"word_codec: cannot read {args.corpus}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    codec = WordCodec(vocabulary(text))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    nn2_pb2_grpc.add_CodecServicer_to_server(codec, server)
    try:
        port = server.add_insecure_port(f"{args.host}:{args.port}")
    except RuntimeError:
        port = 0
    if port == 0:
        print(f"word_codec: cannot listen on {args.host}:{args.port}: the port is in use or not allowed",
              file=sys.stderr)
        return 1
    server.start()
    print(f"word_codec: serving {NAME} {VERSION} ({len(codec.tokens)} tokens) on {args.host}:{port}",
          file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    calls = ", ".join(f"{k} {v}" for k, v in sorted(codec.calls.items()))
    print(f"word_codec: answered {calls or 'nothing'}; {codec.rows} rows decoded", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

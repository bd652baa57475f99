"""A codec served over gRPC (the Codec service of nn2run/proto/nn2.proto), as the model file
records it: the service's name and version, its tokens and its special tokens.

A model trained with `nn2c train --codec-service HOST:PORT` loads anywhere (its tokens are
in the file, so --info and the parameters work); encoding and decoding need the service,
attached with `attach(HOST:PORT)` (`nn2run --codec-service`), which first checks that the
service still has the name, version and tokens the model was trained with. Then the
runtime calls Encode once per prompt and DecodeStep once per VM step for all its streams
(`step_decoder`).

Imports the standard library only; attaching imports grpcio (`nn2run.grpc.client`).
"""

from __future__ import annotations

MAX_VOCAB = 1 << 20


def _error(message: str):
    from ..codec import CodecError
    return CodecError(message)


class ServiceCodec:
    name = "service"
    binary = False
    remote = True           # encode and decode are calls to another process

    def __init__(self, service: str, version: str, vocab: list[str], special: dict[str, int]):
        self.service, self.version = service, version
        self.vocab = list(vocab)
        self.special = dict(special)
        self.address = None
        self._client = None

    @property
    def start(self) -> int | None:
        """The token fed for an empty prompt, when the service names one."""
        return self.special.get("start")

    @property
    def label(self) -> str:
        return f"{self.service!r} version {self.version!r}"

    @classmethod
    def from_header(cls, header: dict) -> ServiceCodec:
        service, version, vocab = header.get("service"), header.get("version"), header.get("vocab")
        special = header.get("special", {})
        if not isinstance(service, str) or not service or not isinstance(version, str):
            raise _error("service codec needs the service's name and version")
        if not isinstance(vocab, list) or not 1 <= len(vocab) <= MAX_VOCAB \
                or not all(isinstance(t, str) for t in vocab):
            raise _error("service codec needs its tokens: a list of strings")
        if not isinstance(special, dict) or not all(
                isinstance(k, str) and type(v) is int and 0 <= v < len(vocab) for k, v in special.items()):
            raise _error("service codec special tokens must map names to token ids")
        return cls(service, version, vocab, special)

    def to_header(self) -> dict:
        return {"name": self.name, "service": self.service, "version": self.version, "vocab": self.vocab,
                "special": self.special}

    # --- with the service ---------------------------------------------------------------
    def attach(self, address: str) -> ServiceCodec:
        """Connect to the codec service at HOST:PORT, checking it is the model's codec."""
        from .client import CodecClient
        client = CodecClient(address)
        info = client.info()
        if (info.name, info.version) != (self.service, self.version):
            raise _error(f"the codec service at {address} is {info.name!r} version {info.version!r}; "
                         f"this model was trained with {self.label}")
        if list(info.tokens) != self.vocab:
            raise _error(f"the codec service at {address} ({self.label}) has other tokens than this model's "
                         f"({len(info.tokens)} against {len(self.vocab)}); the model was trained with another "
                         "vocabulary")
        self._client, self.address = client, address
        return self

    def _attached(self):
        if self._client is None:
            raise _error(f"this model's codec is the codec service {self.label}: "
                         "give its address with --codec-service HOST:PORT")
        return self._client

    def encode(self, text: str) -> list[int]:
        return self._attached().encode(text, len(self.vocab))

    def step_decoder(self):
        """One token for each of many streams per call: `start(key, prompt)`, `end(key)`,
        `decoder([(key, id), ...]) -> [text, ...]` (one DecodeStep)."""
        return self._attached().step_decoder()

    def text_decoder(self):
        """A function id -> text for one stream (one call per token: for a stream of its own)."""
        step = self.step_decoder()
        step.start(0, [])
        return lambda token: step([(0, token)])[0]

    decoder = text_decoder

    def decode(self, ids: list[int]) -> str:
        """The text of a whole id sequence, in one call."""
        step = self.step_decoder()
        step.start(0, [])
        text = "".join(step([(0, int(i)) for i in ids])) if len(ids) else ""
        step.end(0)
        step.flush()
        return text


def connect(address: str) -> ServiceCodec:
    """The codec the service at HOST:PORT describes (Info), attached to it."""
    from .client import CodecClient
    info = CodecClient(address).info()
    special = {s.name: s.id for s in info.special}
    codec = ServiceCodec.from_header({"service": info.name, "version": info.version,
                                      "vocab": list(info.tokens), "special": special})
    return codec.attach(address)


CORPUS_PIECE = 1 << 20      # bytes of corpus per Encode call, cut after a newline


def encode_corpus(address: str, buf, start: int = 0):
    """(codec, ids) for a corpus (bytes or a memory map, UTF-8 from `start`): the codec the
    service at HOST:PORT describes, and the corpus encoded by it in pieces of about
    CORPUS_PIECE bytes, each cut after a newline (the contract of Encode in nn2.proto)."""
    import numpy as np
    codec = connect(address)
    parts, at, n = [], start, len(buf)
    while at < n:
        end = min(at + CORPUS_PIECE, n)
        if end < n:
            cut = buf.rfind(b"\n", at, end)
            end = cut + 1 if cut >= 0 else end
            while end < n and (buf[end] & 0xC0) == 0x80:     # a piece never splits a character
                end += 1
        try:
            text = bytes(buf[at:end]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _error(f"the corpus is not UTF-8 text (bad byte at offset {at + e.start})") from None
        parts.append(np.asarray(codec.encode(text), dtype=np.uint32))
        at = end
    ids = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
    if ids.size == 0:
        raise _error("the codec service gave no tokens for the corpus")
    return codec, ids

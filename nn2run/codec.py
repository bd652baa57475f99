"""Codecs: text <-> token ids. The codec is named in the .nnb file and looked up here.

Built in: `char` (one token per Unicode character seen in the corpus, the default) and
`byte` (256 tokens, any input). Other packages add codecs through the entry-point group
`nn2.codecs`; a codec class has `name`, `vocab`, `encode`, `decoder`, `to_header`, a
classmethod `from_header`, and `binary`: False for a codec whose data is text (`encode`
takes str, the decoder gives str), True for one whose data is bytes (`encode` takes
bytes, or str that it encodes as UTF-8; the decoder gives bytes), and `text_decoder`, a
streaming decoder that always gives str (for JSON and other text-only channels). The
command line reads and writes raw bytes for a binary codec and UTF-8 text otherwise.
"""

from __future__ import annotations

MAX_VOCAB = 1 << 20


class CodecError(ValueError):
    """Text the codec cannot encode, or a codec description that is not valid."""


class CharCodec:
    """One token per character; the vocabulary is the sorted set of corpus characters."""

    name = "char"
    binary = False

    def __init__(self, vocab: list[str]):
        self.vocab = list(vocab)
        self._index = {ch: i for i, ch in enumerate(self.vocab)}

    @classmethod
    def from_header(cls, header: dict) -> CharCodec:
        vocab = header.get("vocab")
        if not isinstance(vocab, list) or not 1 <= len(vocab) <= MAX_VOCAB:
            raise CodecError("char codec needs a non-empty vocabulary")
        if any(not isinstance(t, str) or len(t) != 1 for t in vocab):
            raise CodecError("char codec vocabulary entries must be single characters")
        if len(set(vocab)) != len(vocab):
            raise CodecError("char codec vocabulary has duplicate entries")
        return cls(vocab)

    def to_header(self) -> dict:
        return {"name": self.name, "vocab": self.vocab}

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of `text` outside the vocabulary, in order of appearance."""
        return list(dict.fromkeys(ch for ch in text if ch not in self._index))

    def encode(self, text: str) -> list[int]:
        missing = self.unknown(text)
        if missing:
            shown = ", ".join(repr(ch) for ch in missing[:10])
            raise CodecError(f"characters not in the model's vocabulary: {shown}")
        return [self._index[ch] for ch in text]

    def decoder(self):
        """A function id -> text, for streaming output: every token is a whole character."""
        vocab = self.vocab
        return vocab.__getitem__

    text_decoder = decoder


class ByteCodec:
    """One token per byte: any data, binary or text (text is encoded as UTF-8)."""

    name = "byte"
    binary = True
    vocab = [bytes([b]).decode("latin-1") for b in range(256)]

    @classmethod
    def from_header(cls, header: dict) -> ByteCodec:
        return cls()

    def to_header(self) -> dict:
        return {"name": self.name}

    def encode(self, data: bytes | str) -> list[int]:
        return list(data.encode("utf-8") if isinstance(data, str) else bytes(data))

    def decoder(self):
        """A function id -> bytes: each token is one byte of output, written as it is."""
        table = [bytes((b,)) for b in range(256)]
        return table.__getitem__

    def text_decoder(self):
        """A function id -> text for text-only channels (JSON, the terminal's sample): the bytes
        are decoded as UTF-8 incrementally, so a character split over tokens comes out whole
        with its last byte; bytes that are not UTF-8 become U+FFFD."""
        import codecs
        step = codecs.getincrementaldecoder("utf-8")("replace").decode
        table = self.decoder()
        return lambda token: step(table(token))


BUILTIN = {"char": CharCodec, "byte": ByteCodec}


def lookup(name: str):
    """The codec class called `name`: built in, or from an installed package's entry point."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name == "service":       # a codec served over gRPC (the `grpc` extra attaches it at run time)
        from .grpc.codec import ServiceCodec
        return ServiceCodec
    from importlib.metadata import entry_points  # only paid for third-party codecs
    for ep in entry_points(group="nn2.codecs"):
        if ep.name == name:
            return ep.load()
    raise CodecError(f"unknown codec {name!r} (built in: {', '.join(BUILTIN)})")


def from_header(header) -> CharCodec | ByteCodec:
    if not isinstance(header, dict) or not isinstance(header.get("name"), str):
        raise CodecError("codec must be an object with a name")
    return lookup(header["name"]).from_header(header)

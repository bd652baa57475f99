"""Codecs: text <-> token ids. The codec is named in the .nnb file and looked up here.

Built in: `char` (one token per Unicode character seen in the corpus, the default) and
`byte` (256 tokens, any input). Other packages add codecs through the entry-point group
`nn2.codecs`; a codec class has `name`, `vocab`, `encode`, `decoder`, `to_header` and a
classmethod `from_header`.
"""

from __future__ import annotations

import codecs as _stdcodecs

MAX_VOCAB = 1 << 20


class CodecError(ValueError):
    """Text the codec cannot encode, or a codec description that is not valid."""


class CharCodec:
    """One token per character; the vocabulary is the sorted set of corpus characters."""

    name = "char"

    def __init__(self, vocab: list[str]):
        self.vocab = list(vocab)
        self._index = {ch: i for i, ch in enumerate(self.vocab)}

    @classmethod
    def from_header(cls, header: dict) -> "CharCodec":
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
        """A function id -> text, for streaming output."""
        vocab = self.vocab
        return vocab.__getitem__


class ByteCodec:
    """One token per byte; text is UTF-8. Any input can be encoded."""

    name = "byte"
    vocab = [bytes([b]).decode("latin-1") for b in range(256)]

    @classmethod
    def from_header(cls, header: dict) -> "ByteCodec":
        return cls()

    def to_header(self) -> dict:
        return {"name": self.name}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decoder(self):
        """A function id -> text that buffers incomplete UTF-8 sequences."""
        dec = _stdcodecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: dec.decode(bytes((i,)))


BUILTIN = {"char": CharCodec, "byte": ByteCodec}


def lookup(name: str):
    """The codec class called `name`: built in, or from an installed package's entry point."""
    if name in BUILTIN:
        return BUILTIN[name]
    from importlib.metadata import entry_points   # only paid for third-party codecs
    for ep in entry_points(group="nn2.codecs"):
        if ep.name == name:
            return ep.load()
    raise CodecError(f"unknown codec {name!r} (built in: {', '.join(BUILTIN)})")


def from_header(header) -> "CharCodec | ByteCodec":
    if not isinstance(header, dict) or not isinstance(header.get("name"), str):
        raise CodecError("codec must be an object with a name")
    return lookup(header["name"]).from_header(header)

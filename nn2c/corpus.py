"""Corpora: a text file -> a codec and an array of token ids, without holding the text twice.

The file is memory-mapped and decoded in chunks, twice (once to find the vocabulary, once
to encode), so memory holds the mapped file and the id array (1 byte a token when the
vocabulary fits), never a second copy of the text.
"""

from __future__ import annotations

import codecs as _stdcodecs
import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nn2run.codec import ByteCodec, CharCodec

CHUNK = 8 << 20


class CorpusError(Exception):
    """A corpus that cannot be trained on; the message says why and what to do."""


@dataclass
class Corpus:
    path: str
    codec: "CharCodec | ByteCodec"
    ids: np.ndarray            # token ids, smallest unsigned dtype that fits
    sha256: str
    size_bytes: int


def _chunks(buf, label: str):
    """Decode `buf` as UTF-8 in chunks; yields code-point arrays (uint32)."""
    dec = _stdcodecs.getincrementaldecoder("utf-8")(errors="strict")
    at, n = 0, len(buf)
    while True:
        piece = buf[at:at + CHUNK]
        at += CHUNK
        try:
            text = dec.decode(piece, final=at >= n)
        except UnicodeDecodeError as e:
            raise CorpusError(f"{label} is not UTF-8 text (byte {at - CHUNK + e.start}); "
                              "train on raw bytes with --codec byte") from None
        if "\x00" in text:
            raise CorpusError(f"{label} looks binary (it contains NUL bytes); use --codec byte for binary data")
        yield np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if at >= n:
            break


def _ids_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32


def _open_map(path: str):
    p = Path(path)
    if p.is_dir():
        raise CorpusError(f"{path} is a directory, not a text file")
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise CorpusError(f"{path}: no such file") from None
    except OSError as e:
        raise CorpusError(f"{path}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CorpusError(f"{path} is empty")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size


def read_corpus(path: str, codec: str = "char", vocab: list[str] | None = None) -> Corpus:
    """Read and encode a corpus. `vocab` fixes the character set (when resuming)."""
    buf, size = _open_map(path)
    with buf:
        sha = hashlib.sha256(buf).hexdigest()
        if codec == "byte":
            ids = np.frombuffer(buf, dtype=np.uint8).copy()
            return Corpus(path, ByteCodec(), ids, sha, size)
        if codec != "char":
            raise CorpusError(f"unknown codec {codec!r}: use char or byte")
        if vocab is None:
            seen = np.zeros(0, dtype=np.uint32)
            for cps in _chunks(buf, path):
                seen = np.union1d(seen, np.unique(cps))
            vocab = [chr(c) for c in seen]
        table = np.array([ord(c) for c in vocab], dtype=np.uint32)
        parts = []
        for cps in _chunks(buf, path):
            pos = np.searchsorted(table, cps)
            pos = np.minimum(pos, len(table) - 1)
            if not np.array_equal(table[pos], cps):
                bad = sorted({chr(c) for c in cps[table[pos] != cps]})[:5]
                raise CorpusError(f"{path} has characters the model does not know: {bad}")
            parts.append(pos.astype(_ids_dtype(len(vocab))))
        ids = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return Corpus(path, CharCodec(list(vocab)), ids, sha, size)

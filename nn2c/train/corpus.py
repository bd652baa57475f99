"""Corpora: a text file -> a codec and an array of token ids, without holding the text twice.

The file is memory-mapped and decoded in 256 KiB chunks, twice: once to check it, count its
tokens and find the vocabulary, once to encode into an id array allocated up front (1 byte
a token when the vocabulary fits). Memory therefore holds the id array and one chunk's
work, never a copy of the text: a 1 GB corpus needs about 1 GB plus a few MB.
"""

from __future__ import annotations

import codecs as _stdcodecs
import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nn2run.atomic import not_regular
from nn2run.codec import ByteCodec, CharCodec

CHUNK = 1 << 18
UNICODE = 0x110000
BOM = b"\xef\xbb\xbf"            # a UTF-8 byte-order mark: a marker of the file, not text


class CorpusError(Exception):
    """A corpus that cannot be trained on; the message says why and what to do."""


@dataclass
class Corpus:
    path: str
    codec: CharCodec | ByteCodec
    ids: np.ndarray            # token ids, smallest unsigned dtype that fits
    sha256: str                # of the whole file, byte-order mark included
    notes: tuple = ()          # things about the file worth a line on stderr


def _chunks(buf, label: str, start: int = 0):
    """Decode `buf[start:]` as UTF-8 in chunks; yields code-point arrays (uint32)."""
    dec = _stdcodecs.getincrementaldecoder("utf-8")(errors="strict")
    n = len(buf)
    for at in range(start, n, CHUNK):
        piece = buf[at:at + CHUNK]
        nul = piece.find(b"\x00")
        if nul >= 0:
            raise CorpusError(f"{label} looks binary (a NUL byte at offset {at + nul}); "
                              "train on raw bytes with --codec byte")
        pending = len(dec.getstate()[0])
        try:
            text = dec.decode(piece, final=at + CHUNK >= n)
        except UnicodeDecodeError as e:
            raise CorpusError(f"{label} is not UTF-8 text (bad byte at offset {at - pending + e.start}); "
                              "train on raw bytes with --codec byte") from None
        del piece
        yield np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _ids_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32


def _open_map(path: str):
    p = Path(path)
    if p.is_dir():
        raise CorpusError(f"{path} is a directory, not a text file")
    kind = not_regular(path)            # before opening: a FIFO's open waits for a writer
    if kind is not None:
        raise CorpusError(f"{path} is {kind}, not a regular file: the corpus is memory-mapped and read "
                          "twice; save it to a file first")
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise CorpusError(f"{path}: no such file") from None
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise CorpusError(f"{path} is empty")
        try:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CorpusError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _survey(buf, label: str, start: int) -> tuple[np.ndarray, int]:
    """First pass: which code points occur (a mask over Unicode), and how many tokens."""
    seen = np.zeros(UNICODE, dtype=bool)
    count = 0
    for cps in _chunks(buf, label, start):
        seen[cps] = True
        count += len(cps)
    return seen, count


def _encode(buf, label: str, start: int, vocab: list[str], count: int) -> np.ndarray:
    """Second pass: code points -> ids, written straight into one preallocated array."""
    dtype = _ids_dtype(len(vocab))
    lut = np.zeros(UNICODE, dtype=dtype)
    lut[[ord(c) for c in vocab]] = np.arange(len(vocab), dtype=dtype)
    ids = np.empty(count, dtype=dtype)
    at = 0
    for cps in _chunks(buf, label, start):
        np.take(lut, cps, out=ids[at:at + len(cps)])
        at += len(cps)
    return ids


def read_corpus(path: str, codec: str = "char", service: str | None = None) -> Corpus:
    """Read and encode a corpus; the character set is the one the file uses. A leading
    UTF-8 byte-order mark is skipped (the char codec only: the byte codec keeps every byte);
    '\r' of CRLF line endings is kept, and noted. The `service` codec is the codec service
    at the address `service` (HOST:PORT), which encodes the corpus and gives the vocabulary."""
    if codec not in ("char", "byte", "service"):
        raise CorpusError(f"unknown codec {codec!r}: use char or byte")
    buf = _open_map(path)
    with buf:
        sha = hashlib.sha256(buf).hexdigest()
        if codec == "byte":
            return Corpus(path, ByteCodec(), np.frombuffer(buf, dtype=np.uint8).copy(), sha)
        if codec == "service":
            return _read_with_service(path, buf, sha, service)
        start = len(BOM) if buf[:len(BOM)] == BOM else 0
        seen, count = _survey(buf, path, start)
        if count == 0:
            raise CorpusError(f"{path} holds nothing but a byte-order mark")
        vocab = [chr(c) for c in np.flatnonzero(seen)]
        del seen
        ids = _encode(buf, path, start, vocab, count)
        crlf = (f"{path} has Windows line endings (CRLF): '\\r' is a token of the vocabulary and generated "
                "text will have it too; convert the file (e.g. dos2unix) to train without it")
        notes = (crlf,) if buf.find(b"\r\n") >= 0 else ()
    return Corpus(path, CharCodec(vocab), ids, sha, notes)


def _read_with_service(path: str, buf, sha: str, address: str | None) -> Corpus:
    from nn2run.codec import CodecError
    from nn2run.grpc import needs_extra
    if address is None:
        raise CorpusError("this model's codec is a codec service: give its address with --codec-service HOST:PORT")
    if needs_extra("--codec-service"):
        raise CorpusError(needs_extra("--codec-service"))
    from nn2run.grpc.codec import encode_corpus
    try:
        codec, ids = encode_corpus(address, buf, len(BOM) if buf[:len(BOM)] == BOM else 0)
    except CodecError as e:
        raise CorpusError(f"{path}: {e}") from None
    return Corpus(path, codec, ids.astype(_ids_dtype(len(codec.vocab))), sha)


class Batches:
    """Windows of a token stream laid out as `rows` contiguous rows; batch k -> (x, y), (T, B).

    The ids are put on the device once (on the CPU a view of the corpus's array, 1 byte a
    token for most corpora, never copied); a step slices its window there and widens it to
    int64, so no step copies from host memory or waits for a transfer. `part` keeps only
    the rows [start, stop) (a process's share of the batch)."""

    def __init__(self, ids: np.ndarray, rows: int, seq_len: int, device, part: tuple[int, int] | None = None):
        per_row = len(ids) // rows
        start, stop = part or (0, rows)
        self.data = _on_device(ids[:rows * per_row].reshape(rows, per_row)[start:stop], device)
        self.rows, self.seq_len, self.device = stop - start, seq_len, device
        self.count = (per_row - 1) // seq_len

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int):
        a = k * self.seq_len
        w = self.data[:, a:a + self.seq_len + 1].to(torch.int64).t().contiguous()
        return w[:-1], w[1:]


def _on_device(ids: np.ndarray, device) -> torch.Tensor:
    """Token ids as a tensor on `device`: on the CPU the array itself; on a GPU uint8 when
    they fit, else int32 (torch's uint16/uint32 support few operations on CUDA)."""
    if device.type == "cpu":
        return torch.from_numpy(ids)
    dtype = np.uint8 if ids.dtype == np.uint8 else np.int32
    return torch.from_numpy(np.ascontiguousarray(ids, dtype=dtype)).to(device)

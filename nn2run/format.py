"""The .nnb container: writer, reader and validator.

Owns the bytes of a .nnb file and nothing above them: the program, codec and
provenance are keys of the header that their own layers put there and check.
Imports numpy and the standard library only (never nn2c).

FORMAT (version 1.0; all integers little-endian, unsigned)
==========================================================
A file is three parts, and its size is exactly 128 + header_len + data_len::

    offset size  field
    0      8     magic          89 4E 4E 42 0D 0A 1A 0A  (b"\\x89NNB\\r\\n\\x1a\\n")
    8      2     major          u16, 1; a reader refuses a major it does not know
    10     2     minor          u16, 0; additions a 1.0 reader may ignore
    12     4     flags          u32, 0; any set bit is refused (no optional features yet)
    16     8     header_len     u64, byte length of the header, a multiple of 64,
                                64 <= header_len <= 4 MiB
    24     8     data_len       u64, byte length of the data section
    32     32    reserved       zero
    64     32    header_sha256  SHA-256 of bytes 0..63 of the file followed by the header
    96     32    data_sha256    SHA-256 of the data section
    128    header_len           header: UTF-8 JSON object, padded with spaces (0x20)
    128+header_len  data_len    data: the tensors' raw bytes

Bytes 0..11 (magic, major, minor) keep their place in every future version, so
any reader can say which version a file is. header_sha256 covers the whole
prefix except the two digests, so a flipped bit there or in the header is always
caught; data_sha256 is checked only on request (verify_data), so that opening a
file costs the same whatever its size: the data is memory-mapped, not read.

The header is a JSON object (RFC 8259, strict): no duplicate keys at any level,
no NaN/Infinity, finite numbers only, integers of at most 100 digits, nesting at
most 64 deep, at most 65536 "[" or "{" bytes in all, no lone surrogates.
(The caps bound what parsing costs: ~120 MB and 0.5 s at worst.) Its key
"tensors" is the tensor table; every other key belongs to a higher layer.
The table maps each name (1..256 printable characters) to an object with
exactly these keys::

    "dtype":  "f32" | "f16" | "i32" | "i64" | "u8" | "i8"
              (IEEE binary32/binary16, two's-complement integers of 4/8 bytes,
              a byte, a signed byte; little-endian)
    "shape":  list of 0..4 integers >= 0 (not booleans); the product of the
              non-zero ones is at most 2**40
    "offset": byte offset from the start of the data section
    "nbytes": prod(shape) * itemsize

Quantized tensors. An "i8" tensor NAME has rank 1..4, shape (d0, ..., n), and
stands for the float32 values q[..., j] * s[j] (each product rounded to float32),
where q is its stored bytes and s is the tensor named NAME + "#scale": dtype
"f32", shape [n], every value finite and >= 0 (-0.0 counts as 0). Every "i8"
tensor has that scale tensor, and every tensor whose name ends in "#scale" is the
scale of an "i8" tensor (the name without the suffix); anything else is refused.
The scales' values are checked on every open (they are n floats per tensor).

The table's order is the data's order. The first tensor starts at offset 0; each
next one starts at the end of the previous one rounded up to a multiple of 64
(a zero-size tensor too); the gaps are zero bytes; data_len is the end of the
last tensor (0 when there are none). The layout is therefore fully determined
by the table: no overlap, no aliasing, no unused bytes. Tensor bytes are
C-order. At most 4096 tensors.

Python API: write/dumps make a file; read (mmap) and loads (bytes) validate it
completely before making any tensor view and raise NNBFormatError, whose str()
is one line without the path, for every malformed input. NNBFile.header is the
header *without* "tensors"; NNBFile.table holds the parsed table and
NNBFile.tensors read-only zero-copy numpy views (the stored values: "i8" tensors
and their scales as they are); logical(nnb) gives the float32 values every
floating or quantized tensor stands for, without the scale tensors. A mapped
file must not be modified in place (write replaces files atomically, so
readers are safe).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import stat
import struct

import numpy as np

from . import header as header_mod
from .header import (  # noqa: F401 (the format's names, used by callers as format.NAME)
    ALIGN,
    DTYPES,
    MAX_CONTAINERS,
    MAX_DEPTH,
    MAX_ELEMENTS,
    MAX_INT_DIGITS,
    MAX_NAME_CHARS,
    MAX_RANK,
    MAX_TENSORS,
    SCALE_SUFFIX,
    NNBFormatError,
    TensorEntry,
    align,
    short,
)

FORMAT_MAJOR, FORMAT_MINOR = 1, 0
MAGIC = b"\x89NNB\r\n\x1a\n"
PREFIX_SIZE = 128
MAX_HEADER_BYTES = 4 << 20  # parsing the largest header costs ~120 MB, < 0.5 s
_DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}
_FIELDS = struct.Struct("<8sHHIQQ32s32s32s")  # the 128-byte prefix


# ----------------------------------------------------------------- writing
def _layout(header: dict, tensors: dict) -> tuple[bytes, list]:
    """Prefix + header bytes, and the data chunks (arrays and zero padding)."""
    if not isinstance(header, dict) or "tensors" in header:
        raise ValueError("header must be a dict without a 'tensors' key")
    table, chunks, end = {}, [], 0
    for name, value in tensors.items():
        array = _storable(name, value)
        offset = align(end)
        if offset > end:
            chunks.append(bytes(offset - end))
        table[name] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                       "offset": offset, "nbytes": array.nbytes}
        chunks.append(array.reshape(-1).view(np.uint8))
        end = offset + array.nbytes
    text = json.dumps({**header, "tensors": table}, allow_nan=False,
                      ensure_ascii=False, separators=(",", ":"))
    body = text.encode("utf-8")
    body += b" " * (align(len(body)) - len(body))
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    fixed = _FIELDS.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR, 0, len(body), end,
                         bytes(32), bytes(32), bytes(32))[:64]
    prefix = fixed + hashlib.sha256(fixed + body).digest() + digest.digest()
    try:  # the writer never makes a file its own reader would refuse
        _check_header_len(len(body))
        header_mod.check_table(header_mod.parse(body), end)
    except NNBFormatError as exc:
        raise ValueError(f"refusing to write: {exc}") from None
    return prefix + body, chunks


def _storable(name, value) -> np.ndarray:
    if not isinstance(name, str):
        raise TypeError(f"tensor name {short(name)} is not a str")
    array = np.asarray(value)
    dtype = array.dtype.newbyteorder("<")
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"tensor {name!r}: dtype {array.dtype} is not storable "
                        "(float32, float16, int32, int64, uint8)")
    return np.ascontiguousarray(array, dtype=dtype)


def dumps(header: dict, tensors: dict) -> bytes:
    """The bytes write() would put in a file. Raises TypeError/ValueError."""
    head, chunks = _layout(header, tensors)
    return b"".join([head, *(bytes(c) for c in chunks)])


def write(path, header: dict, tensors: dict) -> None:
    """Write atomically (see `nn2run.atomic`): temp file beside the file `path` names (a
    symlink's target), fsync, rename, fsync dir; a stale temp file of an earlier, killed
    write of the same file is removed.

    On any error the temp file is removed, an existing file at path is left as
    it was, and the exception (TypeError/ValueError for bad arguments, OSError
    for I/O, and for a path that exists but is not a regular file) propagates.
    A new file gets mode 0644; a replaced one keeps its mode.
    Only a failure to fsync the directory comes after the new file is in place.
    """
    head, chunks = _layout(header, tensors)
    from .atomic import write_atomic  # here, not at the top: loading a model should not pay for it
    write_atomic(path, [head, *chunks])


# ----------------------------------------------------------------- reading
class NNBFile:
    """A validated .nnb: header (without "tensors"), table, tensors (read-only
    views), version, path (None from loads), size (bytes), data_sha256_ok (None
    if unchecked).

    close() drops the views and unmaps the file; arrays the caller still holds
    stay valid, and the mapping goes when the last of them does.
    """

    def __init__(self, buf, path, version, header, table, data_range, data_digest):
        self.path, self.version, self.header, self.table = path, version, header, table
        self.data_sha256_ok, self.size = None, data_range[1]
        self._buf, self._data_range, self._data_digest = buf, data_range, data_digest
        start = data_range[0]
        self.tensors = {name: _view(buf, start, e) for name, e in table.items()}

    def close(self) -> None:
        self.tensors = {}
        buf, self._buf = self._buf, None
        if isinstance(buf, mmap.mmap):
            try:
                buf.close()
            except BufferError:  # caller still holds views; they keep the map alive
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"<NNBFile {self.path or '(bytes)'} format {self.version[0]}."
                f"{self.version[1]}, {len(self.table)} tensors>")


def _view(buf, start: int, entry: TensorEntry) -> np.ndarray:
    dtype = DTYPES[entry.dtype]
    if entry.nbytes == 0:
        array = np.empty(entry.shape, dtype)
        array.flags.writeable = False
        return array
    flat = np.frombuffer(buf, dtype, entry.nbytes // dtype.itemsize, start + entry.offset)
    return flat.reshape(entry.shape)


def read(path, verify_data: bool = False) -> NNBFile:
    """Map and validate the file at path. Every failure, including a missing
    file, a directory or another OSError on opening, is an NNBFormatError."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise NNBFormatError(_os_reason(exc)) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise NNBFormatError("is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise NNBFormatError("not a regular file")
        if info.st_size == 0:
            raise NNBFormatError("empty file")
        try:
            buf = mmap.mmap(fd, info.st_size, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise NNBFormatError(_os_reason(exc)) from None
    finally:
        os.close(fd)
    try:
        return _open(buf, os.fspath(path), verify_data)
    except BaseException:
        buf.close()
        raise


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    return (exc.strerror or type(exc).__name__).lower()


def loads(data, verify_data: bool = True) -> NNBFile:
    """Validate bytes (any bytes-like) as an .nnb; views share data's memory."""
    buf = memoryview(data).toreadonly().cast("B")
    return _open(buf, None, verify_data)


def verify_data(nnb: NNBFile) -> bool:
    """Check the data section against data_sha256; records it in data_sha256_ok."""
    if nnb._buf is None:
        raise ValueError("NNBFile is closed")
    start, end = nnb._data_range
    digest = hashlib.sha256()
    with memoryview(nnb._buf) as whole:
        for at in range(start, end, 1 << 24):
            with whole[at:min(end, at + (1 << 24))] as piece:
                digest.update(piece)
    nnb.data_sha256_ok = digest.digest() == nnb._data_digest
    return nnb.data_sha256_ok


def _open(buf, path, verify: bool) -> NNBFile:
    size = len(buf)
    major, minor, header_len, data_len, data_digest, body = _check_prefix(buf, size)
    start = PREFIX_SIZE + header_len
    header = header_mod.parse(body)
    table = header_mod.check_table(header, data_len)
    _check_padding(buf, start, table)
    nnb = NNBFile(buf, path, (major, minor), header, table,
                  (start, start + data_len), data_digest)
    if verify and not verify_data(nnb):
        nnb.close()
        raise NNBFormatError("data checksum mismatch (the tensor data is corrupt)")
    try:  # after the checksum, so that corrupt data is reported as such
        _check_scale_values(buf, start, table)
    except NNBFormatError:
        nnb.close()
        raise
    return nnb


def _check_prefix(buf, size: int):
    if size == 0:
        raise NNBFormatError("empty file")
    if bytes(buf[:min(size, 8)]) != MAGIC[:min(size, 8)]:
        raise NNBFormatError("not an .nnb file (bad magic)")
    if size < PREFIX_SIZE:
        raise NNBFormatError(f"truncated: expected at least {PREFIX_SIZE} bytes, "
                             f"file has {size}")
    prefix = bytes(buf[:PREFIX_SIZE])
    _, major, minor, flags, header_len, data_len, reserved, header_digest, data_digest \
        = _FIELDS.unpack(prefix)
    if major > FORMAT_MAJOR:
        raise NNBFormatError(f"made by a newer nn2c (format {major}.{minor}; "
                             f"this nn2run reads {FORMAT_MAJOR}.x)")
    if major < FORMAT_MAJOR:
        raise NNBFormatError(f"unsupported format version {major}.{minor}")
    if flags:
        raise NNBFormatError(f"unknown flags 0x{flags:08x}")
    if any(reserved):
        raise NNBFormatError("reserved prefix bytes are not zero")
    _check_header_len(header_len)
    expected = PREFIX_SIZE + header_len + data_len
    if expected > size:
        raise NNBFormatError(f"truncated: expected {expected} bytes, file has {size}")
    if expected < size:
        raise NNBFormatError(f"trailing bytes: expected {expected} bytes, file has {size}")
    body = bytes(buf[PREFIX_SIZE:PREFIX_SIZE + header_len])
    if hashlib.sha256(prefix[:64] + body).digest() != header_digest:
        raise NNBFormatError("header checksum mismatch (the file is corrupt)")
    return major, minor, header_len, data_len, data_digest, body


def _check_header_len(header_len: int) -> None:
    if header_len > MAX_HEADER_BYTES:
        raise NNBFormatError(f"header too large ({header_len} bytes; "
                             f"limit {MAX_HEADER_BYTES})")
    if header_len == 0 or header_len % ALIGN:
        raise NNBFormatError(f"header length {header_len} is not a positive "
                             f"multiple of {ALIGN}")


def _check_scale_values(buf, start: int, table: dict) -> None:
    """Finite and >= 0; read from a copy, so that a refusal holds no view of buf."""
    for name, entry in table.items():
        if name.endswith(SCALE_SUFFIX) and entry.nbytes:
            at = start + entry.offset
            array = np.frombuffer(bytes(buf[at:at + entry.nbytes]), DTYPES["f32"])
            if not np.isfinite(array).all():
                raise NNBFormatError(f"tensor {short(name)}: a scale is not finite")
            if (array < 0).any():
                raise NNBFormatError(f"tensor {short(name)}: a scale is negative")


def logical(nnb: NNBFile) -> dict:
    """name -> the values each tensor stands for: f32 tensors as they are (zero-copy
    views), f16 and i8 ones converted to new read-only float32 arrays (at most 4 bytes
    allocated per stored byte), integer ones as they are; the #scale tensors are
    consumed, not listed."""
    out = {}
    for name, array in nnb.tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        dtype = nnb.table[name].dtype
        if dtype in ("f16", "i8"):
            array = array.astype(np.float32)    # exact for both
            if dtype == "i8":                   # then one rounding per product
                array *= nnb.tensors[name + SCALE_SUFFIX]
            array.flags.writeable = False
        out[name] = array
    return out


def _check_padding(buf, start: int, table: dict) -> None:
    end = 0
    for name, entry in table.items():
        if entry.offset > end and any(buf[start + end:start + entry.offset]):
            raise NNBFormatError(f"tensor {short(name)}: padding before it is not zero")
        end = entry.offset + entry.nbytes

"""The header of a .nnb file, checked: strict JSON with bounded cost, and the tensor table
(names, dtypes, shapes, the offsets that lay out the data, the i8 tensors' scales).

The rules are the format's (written out in `nn2run.format`, which calls `parse` and
`check_table` before it makes any view of the data). Standard library and NumPy only.
"""
from __future__ import annotations

import json
import math
from typing import NamedTuple

import numpy as np

ALIGN = 64
MAX_CONTAINERS = 1 << 16  # "[" and "{" in the header: bounds parse memory
MAX_TENSORS = 4096
MAX_NAME_CHARS = 256
MAX_RANK = 4
MAX_ELEMENTS = 1 << 40
MAX_DEPTH = 64
MAX_INT_DIGITS = 100
DTYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "i32": np.dtype("<i4"),
          "i64": np.dtype("<i8"), "u8": np.dtype("u1"), "i8": np.dtype("i1")}
SCALE_SUFFIX = "#scale"  # NAME#scale holds the per-column scales of the i8 tensor NAME
_ENTRY_KEYS = ("dtype", "shape", "offset", "nbytes")


class NNBFormatError(ValueError):
    """A file, or bytes, that is not a valid .nnb; str() is one line, no path."""


class TensorEntry(NamedTuple):
    dtype: str
    shape: tuple
    offset: int
    nbytes: int


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------- the header
def _pairs(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise NNBFormatError(f"duplicate key {short(dup)} in header")
    return obj


def _constant(name):
    raise NNBFormatError(f"header contains {name} (NaN/Infinity are not JSON)")


def _float(text):
    value = float(text)
    if not math.isfinite(value):
        raise NNBFormatError(f"header number {short(text)} is not finite")
    return value


def _int(text):
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise NNBFormatError(f"header integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def parse(body: bytes) -> dict:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NNBFormatError(f"header is not valid UTF-8 (byte {exc.start})") from None
    containers = body.count(b"[") + body.count(b"{")
    if containers > MAX_CONTAINERS:
        raise NNBFormatError(f"header has too many arrays/objects ({containers}; "
                             f"limit {MAX_CONTAINERS})")
    try:
        header = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant,
                            parse_float=_float, parse_int=_int)
    except NNBFormatError:
        raise
    except RecursionError:
        raise NNBFormatError(f"header nested more than {MAX_DEPTH} deep") from None
    except ValueError as exc:
        raise NNBFormatError(f"header is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise NNBFormatError("header is not a JSON object")
    _check_tree(header)
    return header


def _check_tree(header: dict) -> None:
    """Depth cap and well-formed Unicode everywhere, without recursion."""
    stack = [(header, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise NNBFormatError(f"header nested more than {MAX_DEPTH} deep")
        if isinstance(node, dict):
            for key in node:
                _check_str(key)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, str):
            _check_str(node)


def _check_str(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise NNBFormatError("header string has a lone surrogate (not Unicode)") from None


def check_table(header: dict, data_len: int) -> dict:
    """Validate header["tensors"] against data_len; return name -> TensorEntry."""
    raw = header.pop("tensors", None)
    if not isinstance(raw, dict):
        raise NNBFormatError("header has no tensor table (\"tensors\" object)")
    if len(raw) > MAX_TENSORS:
        raise NNBFormatError(f"too many tensors ({len(raw)}; limit {MAX_TENSORS})")
    table = {name: _check_entry(name, item) for name, item in raw.items()}
    offsets = [entry.offset for entry in table.values()]
    if offsets != sorted(offsets):
        raise NNBFormatError("tensors are not listed in offset order")
    end = 0
    for name, entry in table.items():
        where = f"tensor {short(name)}"
        if entry.offset + entry.nbytes > data_len:
            raise NNBFormatError(f"{where}: bytes {entry.offset}..{entry.offset + entry.nbytes}"
                                 f" run past the end of the data section ({data_len})")
        if entry.offset < end:
            raise NNBFormatError(f"{where}: offset {entry.offset} overlaps the previous tensor")
        if entry.offset != align(end):
            raise NNBFormatError(f"{where}: gap of {entry.offset - end} bytes before it "
                                 f"(expected offset {align(end)})")
        end = entry.offset + entry.nbytes
    if end != data_len:
        raise NNBFormatError(f"data section has {data_len - end} unused bytes at its end")
    _check_scales(table)
    return table


def _check_scales(table: dict) -> None:
    """Each i8 tensor has its NAME#scale (f32, one per column); no scale without one."""
    for name, entry in table.items():
        if name.endswith(SCALE_SUFFIX):
            base = table.get(name[:-len(SCALE_SUFFIX)])
            if base is None or base.dtype != "i8":
                raise NNBFormatError(f"tensor {short(name)}: a scale tensor without an "
                                     "i8 tensor to scale (orphan scale)")
            if entry.dtype != "f32":
                raise NNBFormatError(f"tensor {short(name)}: scales must be f32, "
                                     f"not {entry.dtype}")
            if entry.shape != base.shape[-1:]:
                raise NNBFormatError(f"tensor {short(name)}: scale shape "
                                     f"{list(entry.shape)} should be {list(base.shape[-1:])}"
                                     " (one per column)")
        elif entry.dtype == "i8" and name + SCALE_SUFFIX not in table:
            raise NNBFormatError(f"tensor {short(name)}: i8 tensor has no scale tensor "
                                 f"{short(name + SCALE_SUFFIX)}")



def _check_entry(name, item) -> TensorEntry:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS \
            or not name.isprintable():
        raise NNBFormatError(f"bad tensor name {short(name)} (1..{MAX_NAME_CHARS} "
                             "printable characters)")
    where = f"tensor {short(name)}"
    if not isinstance(item, dict):
        raise NNBFormatError(f"{where}: entry is not an object")
    if set(item) != set(_ENTRY_KEYS):
        odd = sorted(set(item) ^ set(_ENTRY_KEYS))
        raise NNBFormatError(f"{where}: missing or unknown keys {short(odd, 60)}")
    dtype, shape = item["dtype"], item["shape"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise NNBFormatError(f"{where}: unknown dtype {short(dtype)}")
    if not isinstance(shape, list):
        raise NNBFormatError(f"{where}: shape is not a list")
    if len(shape) > MAX_RANK:
        raise NNBFormatError(f"{where}: rank {len(shape)} exceeds {MAX_RANK}")
    if dtype == "i8" and not shape:
        raise NNBFormatError(f"{where}: an i8 tensor needs rank 1 or more (scaled per column)")
    for dim in shape:
        if not _is_int(dim):
            raise NNBFormatError(f"{where}: dimension {short(dim)} is not an integer")
        if dim < 0:
            raise NNBFormatError(f"{where}: negative dimension {dim}")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise NNBFormatError(f"{where}: dimensions too large {short(shape, 80)}")
    nbytes, offset = item["nbytes"], item["offset"]
    for key, value in (("nbytes", nbytes), ("offset", offset)):
        if not _is_int(value) or value < 0:
            raise NNBFormatError(f"{where}: {key} {short(value)} is not an integer >= 0")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if nbytes != expected:
        raise NNBFormatError(f"{where}: nbytes {nbytes} does not match shape "
                             f"{short(shape, 80)} of {dtype} ({expected})")
    if offset % ALIGN:
        raise NNBFormatError(f"{where}: offset {offset} is not aligned to {ALIGN}")
    return TensorEntry(dtype, tuple(shape), offset, nbytes)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

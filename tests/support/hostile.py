"""Builders of hostile .nnb files, for tests and fuzzers.

Every builder takes the bytes of a *valid* .nnb (a synthetic one or a real
model) and returns ``(bad_bytes, fragment)``: a file that a loader must refuse
with an NNBFormatError whose message contains ``fragment``; or None when the
file lacks what the case needs (e.g. two tensors). Builders that change the
header re-seal it (recompute both digests), so the damage reaches the
validator instead of stopping at the checksum.

This module re-implements the layout from the FORMAT section of
nn2run/format.py on purpose (a second reader/writer), sharing only constants.
"""
from __future__ import annotations

import hashlib
import json
import struct

from nn2run.format import ALIGN, MAGIC, MAX_HEADER_BYTES, MAX_TENSORS, PREFIX_SIZE

_PREFIX = struct.Struct("<8sHHIQQ32s32s32s")


# ----------------------------------------------------------------- plumbing
def split(blob: bytes) -> tuple[dict, str, bytes]:
    """(prefix fields, header JSON text without padding, data) of a valid file."""
    magic, major, minor, flags, hlen, dlen, reserved, _, _ = _PREFIX.unpack(blob[:PREFIX_SIZE])
    fields = dict(magic=magic, major=major, minor=minor, flags=flags, reserved=reserved)
    text = blob[PREFIX_SIZE:PREFIX_SIZE + hlen].decode("utf-8").rstrip(" ")
    return fields, text, blob[PREFIX_SIZE + hlen:PREFIX_SIZE + hlen + dlen]


def seal(header: bytes, data: bytes, *, magic=MAGIC, major=1, minor=0, flags=0,
         reserved=bytes(32), header_len=None, data_len=None) -> bytes:
    """Build a file with correct digests; header is padded with spaces to 64."""
    header = header + b" " * (-len(header) % ALIGN)
    hlen = len(header) if header_len is None else header_len
    dlen = len(data) if data_len is None else data_len
    fixed = _PREFIX.pack(magic, major, minor, flags, hlen, dlen, reserved,
                         bytes(32), bytes(32))[:64]
    return (fixed + hashlib.sha256(fixed + header).digest()
            + hashlib.sha256(data).digest() + header + data)


def reseal(blob: bytes, text=None, data=None, **fields) -> bytes:
    """The file with its header text, data or prefix fields replaced, re-sealed."""
    old, old_text, old_data = split(blob)
    old.update(fields)
    header = (old_text if text is None else text)
    header = header.encode("utf-8") if isinstance(header, str) else header
    return seal(header, old_data if data is None else data, **old)


def edit_header(blob: bytes, change) -> bytes:
    """Re-seal after change(header_dict) edits the parsed header in place."""
    _, text, _ = split(blob)
    header = json.loads(text)
    change(header)
    return reseal(blob, json.dumps(header, ensure_ascii=False, separators=(",", ":")))


def inject(blob: bytes, member: str) -> bytes:
    """Re-seal with raw JSON text `"key":value` inserted first in the header."""
    _, text, _ = split(blob)
    return reseal(blob, "{" + member + "," + text[1:])


def table(blob: bytes) -> dict:
    return json.loads(split(blob)[1])["tensors"]


def flip_bit(blob: bytes, bit: int) -> bytes:
    out = bytearray(blob)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def header_end(blob: bytes) -> int:
    return PREFIX_SIZE + _PREFIX.unpack(blob[:PREFIX_SIZE])[4]


def _tensor(blob, change, index=0, need=1):
    """Edit the index-th tensor entry (None if the table has fewer than need)."""
    names = list(table(blob))
    if len(names) < max(need, index + 1):
        return None
    return edit_header(blob, lambda h: change(h["tensors"][names[index]]))


def _nonempty(blob):
    return next((i for i, e in enumerate(table(blob).values()) if e["nbytes"]), None)


# ----------------------------------------------------------------- the cases
def empty(blob):
    return b"", "empty file"


def bad_magic(blob):
    return b"GGUF" + blob[4:], "bad magic"


def text_file(blob):
    return b"hello, world\n", "bad magic"


def future_major(blob):
    return reseal(blob, major=2, minor=3), "newer nn2c (format 2.3"


def major_zero(blob):
    return reseal(blob, major=0), "unsupported format version"


def unknown_flags(blob):
    return reseal(blob, flags=1 << 7), "unknown flags"


def reserved_bytes(blob):
    return reseal(blob, reserved=b"\x01" + bytes(31)), "reserved"


def header_len_too_big(blob):
    return seal(split(blob)[1].encode(), split(blob)[2],
                header_len=MAX_HEADER_BYTES + ALIGN), "header too large"


def header_len_huge(blob):
    return seal(split(blob)[1].encode(), split(blob)[2], header_len=2**64 - 64), "too large"


def header_len_unaligned(blob):
    fields, text, data = split(blob)
    header = text.encode() + b" " * (-len(text.encode()) % ALIGN)
    return seal(header + b" ", data, header_len=len(header) + 1), "multiple of 64"


def data_len_huge(blob):
    fields, text, data = split(blob)
    return seal(text.encode(), data, data_len=2**64 - 1), "truncated"


def truncated(blob):
    return blob[:len(blob) - 1], "truncated"


def truncated_in_prefix(blob):
    return blob[:PREFIX_SIZE // 2], "truncated"


def trailing_bytes(blob):
    return blob + b"\0", "trailing bytes"


def header_checksum(blob):
    return flip_bit(blob, (PREFIX_SIZE + 2) * 8), "header checksum"


def not_utf8(blob):
    _, text, _ = split(blob)
    return reseal(blob, b'{"x":"\xff\xfe",' + text[1:].encode()), "UTF-8"


def utf8_bom(blob):
    return reseal(blob, b"\xef\xbb\xbf" + split(blob)[1].encode()), "not valid JSON"


def not_json(blob):
    return reseal(blob, split(blob)[1] + "}"), "not valid JSON"


def duplicate_key(blob):
    return inject(blob, '"k":1,"k":2'), "duplicate key"


def duplicate_tensors_key(blob):
    return inject(blob, '"tensors":{}'), "duplicate key"


def duplicate_tensor_name(blob):
    _, text, _ = split(blob)
    names = list(table(blob))
    if not names:
        return None
    entry = json.dumps(table(blob)[names[0]])
    at = text.index('"tensors":{') + len('"tensors":{')
    dup = json.dumps(names[0]) + ":" + entry + ","
    return reseal(blob, text[:at] + dup + text[at:]), "duplicate key"


def nan_value(blob):
    return inject(blob, '"loss":NaN'), "NaN"


def infinity_value(blob):
    return inject(blob, '"loss":-Infinity'), "Infinity"


def overflowing_float(blob):
    return inject(blob, '"loss":1e999'), "not finite"


def long_integer(blob):
    return inject(blob, '"steps":' + "9" * 5000), "digits"


def deep_nesting(blob):
    return inject(blob, '"deep":' + "[" * 100 + "]" * 100), "nested"


def very_deep_nesting(blob):
    """Deep enough to hit the JSON parser's own recursion limit."""
    return inject(blob, '"deep":' + "[" * 50000 + "]" * 50000), "nested"


def too_many_containers(blob):
    """A parse-amplification bomb: 70,000 empty lists."""
    return inject(blob, '"bomb":[' + "[]," * 70000 + "[]]"), "too many arrays"


def lone_surrogate(blob):
    return inject(blob, '"s":"\\ud800"'), "surrogate"


def top_level_array(blob):
    return reseal(blob, "[" + split(blob)[1] + "]"), "not a JSON object"


def no_tensor_table(blob):
    return edit_header(blob, lambda h: h.pop("tensors")), "no tensor table"


def tensor_table_is_list(blob):
    return edit_header(blob, lambda h: h.update(tensors=[])), "no tensor table"


def too_many_tensors(blob):
    entry = '{"dtype":"u8","shape":[0],"offset":0,"nbytes":0}'
    many = ",".join(f'"t{i}":{entry}' for i in range(MAX_TENSORS + 1))
    return reseal(blob, '{"tensors":{' + many + "}}", data=b""), "too many tensors"


def entry_not_object(blob):
    names = list(table(blob))
    if not names:
        return None
    return edit_header(blob, lambda h: h["tensors"].update({names[0]: [1]})), "not an object"


def entry_missing_key(blob):
    return _tensor(blob, lambda e: e.pop("nbytes")), "missing or unknown keys"


def entry_unknown_key(blob):
    return _tensor(blob, lambda e: e.update(strides=[4])), "missing or unknown keys"


def _rename_first(blob, new):
    names = list(table(blob))
    if not names:
        return None
    def change(h):
        h["tensors"] = {new if n == names[0] else n: e for n, e in h["tensors"].items()}
    return edit_header(blob, change)


def empty_name(blob):
    return _rename_first(blob, ""), "bad tensor name"


def long_name(blob):
    return _rename_first(blob, "w" * 257), "bad tensor name"


def control_char_name(blob):
    return _rename_first(blob, "w\n\x00"), "bad tensor name"


def unknown_dtype(blob):
    return _tensor(blob, lambda e: e.update(dtype="f64")), "unknown dtype"


def dtype_not_string(blob):
    return _tensor(blob, lambda e: e.update(dtype=["f32"])), "unknown dtype"


def shape_not_list(blob):
    return _tensor(blob, lambda e: e.update(shape=7)), "shape is not a list"


def rank_too_high(blob):
    return _tensor(blob, lambda e: e.update(shape=[1] * 5)), "rank 5"


def negative_dim(blob):
    return _tensor(blob, lambda e: e.update(shape=[-1] + e["shape"])), "negative dimension"


def bool_dim(blob):
    return _tensor(blob, lambda e: e.update(shape=[True])), "not an integer"


def float_dim(blob):
    return _tensor(blob, lambda e: e.update(shape=[2.0])), "not an integer"


def huge_dim(blob):
    """10**12 elements, nbytes consistent: only the size check can refuse it."""
    return _tensor(blob, lambda e: e.update(dtype="f32", shape=[10**12],
                                            nbytes=4 * 10**12)), "past the end"


def enormous_dims(blob):
    return _tensor(blob, lambda e: e.update(shape=[2**64, 2**64, 0], nbytes=0)), "too large"


def nbytes_mismatch(blob):
    return _tensor(blob, lambda e: e.update(nbytes=e["nbytes"] + 4)), "does not match shape"


def nbytes_negative(blob):
    return _tensor(blob, lambda e: e.update(nbytes=-4)), "nbytes"


def offset_not_int(blob):
    return _tensor(blob, lambda e: e.update(offset="0")), "offset"


def offset_negative(blob):
    return _tensor(blob, lambda e: e.update(offset=-64)), "offset"


def offset_misaligned(blob):
    return _tensor(blob, lambda e: e.update(offset=e["offset"] + 4)), "not aligned"


def offset_past_end(blob):
    return _tensor(blob, lambda e: e.update(offset=e["offset"] + (1 << 40)), -1), "past the end"


def overlapping(blob):
    """A tensor starting where the previous non-empty one starts."""
    entries = list(table(blob).values())
    index = next((i for i in range(1, len(entries)) if entries[i - 1]["nbytes"]), None)
    if index is None:
        return None
    start = entries[index - 1]["offset"]
    return _tensor(blob, lambda e: e.update(offset=start), index), "overlaps"


def out_of_order(blob):
    names = list(table(blob))
    if len(names) < 2 or table(blob)[names[0]]["offset"] == table(blob)[names[1]]["offset"]:
        return None
    def change(h):
        t = h["tensors"]
        h["tensors"] = {n: t[n] for n in [names[1], names[0], *names[2:]]}
    return edit_header(blob, change), "offset order"


def gap(blob):
    """Move the last tensor 64 bytes later, inserting 64 zero bytes before it."""
    names, (_, text, data) = list(table(blob)), split(blob)
    if not names:
        return None
    last = table(blob)[names[-1]]
    header = json.loads(text)
    header["tensors"][names[-1]]["offset"] += ALIGN
    at = last["offset"]
    return reseal(blob, json.dumps(header), data=data[:at] + bytes(ALIGN) + data[at:]), "gap"


def unused_data(blob):
    return reseal(blob, data=split(blob)[2] + bytes(ALIGN)), "unused bytes"


def nonzero_padding(blob):
    _, _, data = split(blob)
    end = 0
    for entry in table(blob).values():
        if entry["offset"] > end:
            bad = data[:end] + b"\x01" + data[end + 1:]
            return reseal(blob, data=bad), "padding"
        end = entry["offset"] + entry["nbytes"]
    return None


def data_bit_flip(blob):
    """Caught by the data digest, i.e. only with verify_data=True."""
    index = _nonempty(blob)
    if index is None:
        return None
    entry = list(table(blob).values())[index]
    return flip_bit(blob, (header_end(blob) + entry["offset"]) * 8 + 3), "data checksum"


# ----------------------------------------------------------------- quantized tensors
SCALE = "#scale"  # spelled out here, as the FORMAT section spells it


def _quantized(blob):
    """(names, index of the first i8 tensor, index of its scale), or None."""
    names = list(table(blob))
    base = next((n for n in names if table(blob)[n]["dtype"] == "i8"
                 and n + SCALE in names), None)
    if base is None:
        return None
    return names, names.index(base), names.index(base + SCALE)


def _pair(bad, fragment):
    return None if bad is None else (bad, fragment)


def _scale_entry(blob, change):
    found = _quantized(blob)
    return None if found is None else _tensor(blob, change, found[2])


def _scale_value(blob, value):
    """Overwrite the first scale of the first i8 tensor (its data digest re-sealed)."""
    found = _quantized(blob)
    if found is None:
        return None
    entry = table(blob)[found[0][found[2]]]
    if not entry["nbytes"]:
        return None
    data = split(blob)[2]
    at = entry["offset"]
    return reseal(blob, data=data[:at] + struct.pack("<f", value) + data[at + 4:])


def scale_missing(blob):
    found = _quantized(blob)
    if found is None:
        return None
    names, _, index = found
    renamed = names[index][:-len(SCALE)] + "_scale"
    def change(h):
        h["tensors"] = {renamed if n == names[index] else n: e for n, e in h["tensors"].items()}
    return edit_header(blob, change), "no scale tensor"


def scale_not_f32(blob):
    return _pair(_scale_entry(blob, lambda e: e.update(dtype="i32")), "scales must be f32")


def scale_wrong_shape(blob):
    return _pair(_scale_entry(blob, lambda e: e.update(shape=[1] + e["shape"])), "scale shape")


def scale_nan(blob):
    return _pair(_scale_value(blob, float("nan")), "not finite")


def scale_infinite(blob):
    return _pair(_scale_value(blob, float("inf")), "not finite")


def scale_negative(blob):
    return _pair(_scale_value(blob, -0.5), "negative")


def i8_scalar(blob):
    found = _quantized(blob)
    if found is None:
        return None
    return _tensor(blob, lambda e: e.update(shape=[]), found[1]), "rank 1 or more"


def scale_of_non_i8(blob):
    """The scaled tensor's dtype turned to u8 (same size): its scale is an orphan."""
    found = _quantized(blob)
    if found is None:
        return None
    return _tensor(blob, lambda e: e.update(dtype="u8"), found[1]), "orphan scale"


def orphan_scale(blob):
    """A well-formed f32 tensor "ghost#scale" appended, with no "ghost" to scale."""
    _, text, data = split(blob)
    header = json.loads(text)
    offset = -(-len(data) // ALIGN) * ALIGN
    header["tensors"]["ghost" + SCALE] = {"dtype": "f32", "shape": [1], "offset": offset,
                                          "nbytes": 4}
    data = data + bytes(offset - len(data)) + struct.pack("<f", 1.0)
    return reseal(blob, json.dumps(header), data=data), "orphan scale"


CASES = {f.__name__: f for f in [
    empty, bad_magic, text_file, future_major, major_zero, unknown_flags, reserved_bytes,
    header_len_too_big, header_len_huge, header_len_unaligned, data_len_huge, truncated,
    truncated_in_prefix, trailing_bytes, header_checksum, not_utf8, utf8_bom, not_json,
    duplicate_key, duplicate_tensors_key, duplicate_tensor_name, nan_value, infinity_value,
    overflowing_float, long_integer, deep_nesting, very_deep_nesting, too_many_containers,
    lone_surrogate,
    top_level_array, no_tensor_table, tensor_table_is_list, too_many_tensors,
    entry_not_object, entry_missing_key, entry_unknown_key, empty_name, long_name,
    control_char_name, unknown_dtype, dtype_not_string, shape_not_list, rank_too_high,
    negative_dim, bool_dim, float_dim, huge_dim, enormous_dims, nbytes_mismatch,
    nbytes_negative, offset_not_int, offset_negative, offset_misaligned, offset_past_end,
    overlapping, out_of_order, gap, unused_data, nonzero_padding, data_bit_flip,
    scale_missing, scale_not_f32, scale_wrong_shape, scale_nan, scale_infinite,
    scale_negative, i8_scalar, scale_of_non_i8, orphan_scale]}
"""name -> builder; every result must be refused by loads(bad, verify_data=True)."""

"""`nn2c quantize`: smaller .nnb files.

    f16   every float32 tensor stored as IEEE binary16 (half the size)
    int8  every float32 matrix stored as i8 with a float32 scale per output row; vectors
          (biases) stay float32: they are a few hundred floats and every logit depends on
          them directly

A matrix is stored transposed, (inputs, outputs), so an output row of the equations'
matrix is a column of the stored tensor: its scale is s = max|w| / 127 over that column
and q = round(w / s) in [-127, 127], so |w - q·s| ≤ s/2 for every weight. Stacked
matrices (W_f|W_i|…) are scaled column by column, so each gate keeps its own scales.

Reading goes through nn2run's loader (the file is fully validated, data checksum too)
and writing through nn2run's writer, so checksums, alignment and the atomic write are
the container's own. NumPy only.
"""

from __future__ import annotations

import os

import numpy as np

from nn2run import format as fmt
from nn2run.model import Model, file_kind
from nn2run.seq2seq import Seq2SeqModel

DTYPES = ("f16", "int8")
F16_MAX = float(np.finfo(np.float16).max)


class QuantizeError(ValueError):
    """A model that cannot be quantized, or an output that cannot be written; one line."""


def int8_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8, s float32 per column) with |w - q·s| ≤ s/2; an all-zero column gets s = 0."""
    w64 = w.astype(np.float64)
    scale = (np.abs(w64).max(axis=0, initial=0.0) / 127.0).astype(np.float32)
    # q is computed with the float32 scale the file will hold, so the bound holds for it
    safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
    q = np.clip(np.rint(w64 / safe), -127, 127).astype(np.int8)
    return q, scale


def quantize_tensors(tensors: dict, dtype: str) -> dict:
    """Stored float32 tensors -> the tensors of the quantized file (others unchanged)."""
    out = {}
    for name, array in tensors.items():
        if array.dtype != np.float32:
            out[name] = array
            continue
        if not np.isfinite(array).all():
            raise QuantizeError(f"tensor {name!r} holds NaN or infinite values; nothing to quantize")
        if dtype == "f16":
            if array.size and float(np.abs(array).max()) > F16_MAX:
                raise QuantizeError(f"tensor {name!r} has values beyond ±{F16_MAX:g}, "
                                    "the float16 range; use --dtype int8")
            out[name] = array.astype(np.float16)
        elif array.ndim == 2:
            out[name], out[name + fmt.SCALE_SUFFIX] = int8_columns(array)
        else:
            out[name] = array
    return out


def quantize_file(source: str, output: str, dtype: str) -> str:
    """Write the quantized copy of the model at source to output; returns a summary line."""
    if dtype not in DTYPES:
        raise QuantizeError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if os.path.exists(output) and os.path.exists(source) and os.path.samefile(source, output):
        raise QuantizeError(f"-o {output} is the model itself; give another path (nothing was written)")
    nnb = _open(source)
    try:
        tensors = quantize_tensors(dict(nnb.tensors), dtype)
        header = dict(nnb.header)
        provenance = header.get("provenance") if isinstance(header.get("provenance"), dict) else {}
        header["provenance"] = {**provenance, "quantized": _note(dtype, source)}
        try:
            fmt.write(output, header, tensors)
        except OSError as e:
            raise QuantizeError(f"cannot write {output}: {(e.strerror or str(e)).lower()}") from None
        before = nnb.size
    finally:
        nnb.close()
    after = os.path.getsize(output)
    return f"wrote {output}: {dtype}, {before:,} → {after:,} bytes ({after / before:.0%})"


def _open(source: str) -> fmt.NNBFile:
    """The source file, validated as a float32 model (data checksum included)."""
    try:
        nnb = fmt.read(source, verify_data=True)
    except fmt.NNBFormatError as e:
        if os.path.isfile(source):
            raise QuantizeError(f"{source} is not an nn2 model: {e}") from None
        raise QuantizeError(f"cannot read {source}: {e}") from None
    try:
        kind = file_kind(nnb.header)
        if kind == "seq2seq-checkpoint":
            raise QuantizeError(f"{source} is a seq2seq training checkpoint; quantize the model file instead")
        # the whole model is checked: programs, parameters, codecs
        (Seq2SeqModel if kind == "seq2seq" else Model)(nnb)
        if "checkpoint" in nnb.header:
            raise QuantizeError(f"{source} is a training checkpoint; quantize the model file instead")
        stored = {e.dtype for name, e in nnb.table.items() if not name.endswith(fmt.SCALE_SUFFIX)}
        if stored & {"f16", "i8"}:
            raise QuantizeError(f"{source} is already quantized ({', '.join(sorted(stored & {'f16', 'i8'}))}); "
                                "quantize the float32 model instead")
    except fmt.NNBFormatError as e:
        nnb.close()
        raise QuantizeError(f"{source} is not an nn2 model: {e}") from None
    except QuantizeError:
        nnb.close()
        raise
    return nnb


def _note(dtype: str, source: str) -> dict:
    how = "float16" if dtype == "f16" else "int8 matrices, a float32 scale per output row; vectors float32"
    return {"dtype": dtype, "how": how, "from": os.path.basename(source)}

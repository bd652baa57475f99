"""The parameter layout of a .nnb file: where each kernel parameter lives in the stored tensors.

One rule, written here for both sides (nn2c writes files by it, nn2run reads them by it):

- a kernel parameter is known by its name in the equations and its layer (None for the
  readout, which runs once on the top layer); its key in the header's parameter map is
  `name@layer` (`W_f@0`), or `name` for the readout's (`W_y`);
- a stored tensor holds one or more parameters side by side: a matrix parameter of shape
  (rows, cols) is columns [start, stop) of a (cols, total) tensor, stored transposed (the
  product is x @ tensor, one matvec for every parameter stacked into it); a vector
  parameter is elements [start, stop) of a vector tensor;
- stored tensors are named `l{layer}.{names joined by |}` (`l0.W_f|W_i|W_o|W_c`) or
  `readout.{names}`: a name for people. Nothing reads structure back from it: each map
  entry records the parameter's `name` and `layer` as data.

A map entry: {"tensor": str, "kind": "matrix"|"vector", "start": int, "stop": int,
"name": str, "layer": int|null}. Files written before `name` and `layer` were recorded
have the first four fields only; for those the key is the record (`legacy_slot`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("matrix", "vector")


class LayoutError(ValueError):
    """A parameter map entry that does not describe a place in the stored tensors."""


def key(name: str, layer: int | None) -> str:
    """The parameter's key in the header's map: `W_f@0`, or `W_y` for the readout."""
    return name if layer is None else f"{name}@{layer}"


def tensor_name(layer: int | None, names: list[str] | tuple[str, ...]) -> str:
    """The stored tensor holding parameters `names` of `layer`, in column order."""
    return ("readout." if layer is None else f"l{layer}.") + "|".join(names)


@dataclass(frozen=True)
class Slot:
    """Where one kernel parameter lives: columns (matrix) or elements (vector) [start, stop)
    of stored tensor `tensor`."""
    name: str
    layer: int | None
    tensor: str
    kind: str
    start: int
    stop: int

    @property
    def key(self) -> str:
        return key(self.name, self.layer)

    def shape(self, stored: tuple) -> tuple:
        """The parameter's shape as the equations use it, given its tensor's stored shape."""
        n = self.stop - self.start
        return (n, stored[0]) if self.kind == "matrix" else (n,)

    def view(self, stored: np.ndarray) -> np.ndarray:
        """The parameter as the equations use it: a view into `stored` (transposed for a matrix)."""
        if self.kind == "matrix":
            return stored[:, self.start:self.stop].T
        return stored[self.start:self.stop]

    def put(self, stored: np.ndarray, value) -> None:
        """Write the parameter's logical `value` into its place in `stored` (inverse of `view`)."""
        value = np.asarray(value, dtype=stored.dtype)
        if value.shape != self.shape(stored.shape):
            raise LayoutError(f"parameter {self.key!r}: shape {value.shape}, "
                              f"the layout needs {self.shape(stored.shape)}")
        if self.kind == "matrix":
            stored[:, self.start:self.stop] = value.T
        else:
            stored[self.start:self.stop] = value

    def entry(self) -> dict:
        """The slot as a header map entry (JSON)."""
        return {"tensor": self.tensor, "kind": self.kind, "start": self.start, "stop": self.stop,
                "name": self.name, "layer": self.layer}


def legacy_slot(map_key: str) -> tuple[str, int | None]:
    """(name, layer) of an entry from a file that recorded neither: the key holds them."""
    name, at, layer = map_key.partition("@")
    if not at:
        return name, None
    if not layer.isdigit():
        raise LayoutError(f"parameter {map_key!r}: the key names no layer")
    return name, int(layer)


def read_map(params, shapes: dict[str, tuple]) -> dict[str, Slot]:
    """The header's parameter map, checked against the stored tensors' shapes, as slots by key."""
    if not isinstance(params, dict):
        raise LayoutError("missing parameter map")
    out = {}
    for map_key, p in params.items():
        out[map_key] = _slot(map_key, p, shapes)
    return out


def _slot(map_key: str, p, shapes: dict[str, tuple]) -> Slot:
    if not isinstance(p, dict) or not isinstance(p.get("tensor"), str) or p["tensor"] not in shapes \
            or p.get("kind") not in KINDS:
        raise LayoutError(f"parameter {map_key!r}: bad entry")
    if "name" in p or "layer" in p:
        name, layer = p.get("name"), p.get("layer")
        if not isinstance(name, str) or not (layer is None or type(layer) is int and layer >= 0):
            raise LayoutError(f"parameter {map_key!r}: bad name or layer")
    else:
        name, layer = legacy_slot(map_key)
    shape = shapes[p["tensor"]]
    start, stop = p.get("start"), p.get("stop")
    if len(shape) != (2 if p["kind"] == "matrix" else 1) or type(start) is not int \
            or type(stop) is not int or not 0 <= start < stop <= shape[-1]:
        raise LayoutError(f"parameter {map_key!r}: range outside tensor {p['tensor']!r}")
    slot = Slot(name, layer, p["tensor"], p["kind"], start, stop)
    if slot.key != map_key:
        raise LayoutError(f"parameter {map_key!r}: its entry says {slot.key!r}")
    return slot


def write_map(slots) -> dict:
    """Slots -> the header's parameter map."""
    return {s.key: s.entry() for s in slots}


def find(slots: dict[str, Slot], name: str, layer: int = 0) -> Slot | None:
    """The slot of parameter `name` of `layer`, or the readout's `name` (which has no layer)."""
    return slots.get(key(name, layer)) or slots.get(key(name, None))


def stored_tensors(slots: dict[str, Slot]) -> list[str]:
    """The names of the tensors that hold the parameters (sorted)."""
    return sorted({s.tensor for s in slots.values()})

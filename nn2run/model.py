"""A loaded model: the public Python API of the runtime.

    m = nn2run.load("model.nnb")
    m.vocab, m.layers, m.hidden
    m.param("W_f", layer=0)      # a parameter by its kernel name, shaped as the equations use it
    state = m.initial_state(batch=4)
    logits, state = m.step(ids, state)

The model header (the JSON the container carries) holds, besides the tensor table:
`model` (layers, hidden, kernel name), `program` (see `nn2run.isa`), `params` (where
each kernel parameter lives: a column range of a stored tensor, see `param`), `codec`,
`sampling` defaults, `source` (the kernel text) and `provenance`. All of it is validated
here before anything runs; every failure is an `NNBFormatError`.

A float32 file runs on its memory map as it is (zero-copy). A quantized one (f16, or i8
with per-row scales, see `nn2run.format`) is converted to float32 once, here at load, so
the VM runs exactly the float32 code: opening costs one pass over the weights and the
weights then take float32 memory (the file's pages are only read once).
"""

from __future__ import annotations

import numpy as np

from . import codec as codecs
from . import format as fmt
from . import params, rewrite
from .format import NNBFormatError
from .isa import ProgramError, program_shapes, validate
from .vm import VM

MAX_LAYERS = 1024


def check_ids(ids, vocab_size: int, shape: tuple | None = None) -> np.ndarray:
    """Token ids as the VM takes them (an intp array), or a ValueError naming the first bad
    one: every id must be an integer in [0, vocab_size). The VM itself does not check (its
    gather would clip), so every public entry point calls this."""
    try:
        a = np.asarray(ids)
    except ValueError:
        raise ValueError("token ids must be a flat sequence of integers") from None
    if shape is not None and a.shape != shape:
        raise ValueError(f"token ids must have shape {shape}, got {a.shape}")
    if a.dtype.kind == "O":           # Python ints too large for int64, or mixed objects
        ints = all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in a.flat)
    else:
        ints = a.dtype.kind in "iu" or a.size == 0      # np.asarray([]) is float64
    if not ints:
        bad = next(x for x in a.flat if not isinstance(x, (int, np.integer)) or isinstance(x, (bool, np.bool_)))
        raise ValueError(f"token ids must be integers: {bad.item() if isinstance(bad, np.generic) else bad!r} is not")
    if a.size:
        outside = (a < 0) | (a >= vocab_size)
        if outside.any():
            bad = a[outside.astype(bool)].flat[0]
            raise ValueError(f"token id {int(bad)} is outside the model's vocabulary [0, {vocab_size})")
    return a.astype(np.intp)


def check_finite(tensors: dict) -> None:
    """Every float32 value finite, or NNBFormatError naming the tensor (max and min: NaN and
    ±inf reach them, and they allocate nothing)."""
    for name, t in tensors.items():
        if t.dtype == np.float32 and t.size and not (np.isfinite(t.max()) and np.isfinite(t.min())):
            raise NNBFormatError(f"tensor {name!r} holds NaN or infinite values")


def check_sizes(header: dict):
    """(layers, hidden, source codec) of a file's header, checked: what every model kind has."""
    meta = header.get("model")
    if not isinstance(meta, dict):
        raise NNBFormatError("missing model description")
    for key, cap in (("layers", MAX_LAYERS), ("hidden", 1 << 20)):
        if type(meta.get(key)) is not int or not 1 <= meta[key] <= cap:
            raise NNBFormatError(f"model {key} must be a positive integer")
    return meta["layers"], meta["hidden"], codecs.from_header(header.get("codec"))


class ClosedModelError(ValueError):
    """The model was closed (Model.close()): its tensors are gone."""


class State:
    """The recurrent state of a batch of streams: one (batch, width) array per state variable.

    A state that `Model.step` returns lives in the VM's own buffers, so a step copies
    nothing in or out. It owns copies of them (is detached) as soon as anything else could
    see them change: when `arrays` or `state[name, layer]` is read, or when the VM is about
    to overwrite the buffers (another step, `generate` or the server on the same VM).
    """

    def __init__(self, names: list[tuple[str, int]], arrays: list[np.ndarray], batch: int = 0):
        self.names = list(names)
        self._arrays = list(arrays)
        self._vm = None             # the VM whose buffers `_arrays` are, while attached
        self._batch = batch         # the batch of a model without states (no arrays to tell)

    @property
    def arrays(self) -> list[np.ndarray]:
        if self._vm is not None:
            self._detach()
        return self._arrays

    @arrays.setter
    def arrays(self, arrays: list[np.ndarray]) -> None:
        self._vm = None
        self._arrays = list(arrays)

    def _detach(self) -> None:
        """Own copies of the VM's buffers from now on."""
        self._vm = None
        self._arrays = [a.copy() for a in self._arrays]

    def __getstate__(self):
        if self._vm is not None:    # a copy or a pickle must not share the VM's buffers
            self._detach()
        return self.__dict__

    @property
    def batch(self) -> int:
        return self._arrays[0].shape[0] if self._arrays else self._batch

    def __getitem__(self, key: tuple[str, int]) -> np.ndarray:
        """state["h", 0]: the value of state h of layer 0."""
        return self.arrays[self.names.index(tuple(key))]

    def __repr__(self) -> str:
        return f"State(batch={self.batch}, {', '.join(f'{n}@{l}' for n, l in self.names)})"


class Opened:
    """What every model kind does with its file: close it (the map closes unless the caller
    still holds arrays from it), refuse work once closed, and work as a context manager.
    A subclass sets `_file` and `tensors` and drops its machines in `_release`."""

    def _check_open(self) -> None:
        if self._file is None:
            raise ClosedModelError("the model is closed (close() was called); load it again")

    def close(self) -> None:
        """Release the file."""
        self._release()
        self.tensors = {}
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Model(Opened):
    """A validated .nnb file, ready to run."""

    def __init__(self, nnb: fmt.NNBFile):
        self._file = nnb
        self.header = nnb.header
        self.tensors = fmt.logical(nnb)     # float32 values; the f32 ones stay views of the map
        if nnb.data_sha256_ok:              # the data was read to verify it: its values too
            check_finite(self.tensors)
        try:
            self._check()
        except (ProgramError, codecs.CodecError) as e:
            raise NNBFormatError(str(e)) from None
        self._vms: dict[int, VM] = {}
        self._bound = None          # (program, tensors) as the VMs run them, made on first use

    def _check(self) -> None:
        h = self.header
        self.layers, self.hidden, self.codec = check_sizes(h)
        self.vocab = self.codec.vocab
        self._vocab_size = len(self.vocab)
        shapes = program_shapes(self.tensors)
        validate(h.get("program"), shapes, len(self.vocab))
        self.program = h["program"]
        self._state_names = tuple((st["name"], st["layer"]) for st in self.program["states"])
        self._names_list = list(self._state_names)
        self._shapes: dict[int, list] = {}      # batch -> [(np.ndarray, shape)] of a valid state
        try:
            self._slots = params.read_map(h.get("params"), {n: s for n, s in shapes.items() if s is not None})
        except params.LayoutError as e:
            raise NNBFormatError(str(e)) from None
        self.sampling = self._check_sampling(h.get("sampling", {}))

    @staticmethod
    def _check_sampling(sampling) -> dict:
        """Sampling defaults a file may carry: {"temperature": a positive number}."""
        if not isinstance(sampling, dict) or set(sampling) - {"temperature"}:
            raise NNBFormatError("sampling defaults: only {\"temperature\": number} is allowed")
        t = sampling.get("temperature", 1.0)
        if type(t) not in (int, float) or not 0 < t < float("inf"):
            raise NNBFormatError("sampling defaults: temperature must be a positive number")
        return {"temperature": float(t)}

    # --- parameters -------------------------------------------------------------
    def param_names(self) -> list[str]:
        """Parameter keys: `name@layer` for cell parameters, `name` for the readout's."""
        return list(self._slots)

    def param_slots(self) -> list[params.Slot]:
        """Where each parameter lives (name, layer, tensor, kind, column or element range),
        in the order of `param_names`; the layout's rule is `nn2run.params`."""
        return list(self._slots.values())

    def param(self, name: str, layer: int = 0) -> np.ndarray:
        """A parameter as the equations use it: (rows, cols) for a matrix, (n,) for a vector.

        Matrices are stored transposed and possibly stacked with others (the file's
        layout is the optimizer's choice); this returns a read-only view either way.
        """
        self._check_open()
        slot = params.find(self._slots, name, layer)
        if slot is None:
            raise KeyError(f"no parameter {name!r} (layer {layer}); have {', '.join(self._slots)}")
        return slot.view(self.tensors[slot.tensor])

    def storage(self) -> str:
        """How the file stores the tensors, and its size (`nn2run --info` shows it)."""
        self._check_open()
        table = self._file.table
        counts: dict[str, int] = {}
        for name, entry in table.items():
            if not name.endswith(fmt.SCALE_SUFFIX):
                counts[entry.dtype] = counts.get(entry.dtype, 0) + 1
        kinds = ", ".join(f"{n} {dtype}" + (" (a float32 scale per output row)" if dtype == "i8" else "")
                          for dtype, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        return f"{self._file.size:,} bytes; tensors: {kinds or 'none'}"

    # --- running ------------------------------------------------------------------

    def check_ids(self, ids, shape: tuple | None = None) -> np.ndarray:
        """`ids` as an intp array after checking each is a token id of this model."""
        return check_ids(ids, len(self.vocab), shape)

    def vm(self, batch: int) -> VM:
        """The VM bound for `batch` streams (built once per batch size)."""
        self._check_open()
        _check_batch(batch)
        if batch not in self._vms:
            self._vms[batch] = VM(*self.bound_program(), batch)
        return self._vms[batch]

    def bound_program(self) -> tuple[dict, dict]:
        """(program, tensors) as the VMs run them: the file's after the load-time rewrites
        of `nn2run.rewrite` (made once; `nn2run --dis` lists this program)."""
        self._check_open()
        if self._bound is None:
            self._bound = rewrite.bind(self.program, self.tensors)
        return self._bound

    @property
    def state_names(self) -> list[tuple[str, int]]:
        return list(self._state_names)

    def initial_state(self, batch: int = 1) -> State:
        """The zero state for `batch` streams (batch a positive integer)."""
        self._check_open()
        _check_batch(batch)
        widths = self.program["registers"]
        return State(self.state_names,
                     [np.zeros((batch, widths[s["prev"]]), np.float32) for s in self.program["states"]],
                     int(batch))

    def _check_state(self, state) -> None:
        if type(state) is State and state.names == self._names_list:
            # the common case in one comparison: this model's state, as step() made it
            shapes = [(type(a), getattr(a, "shape", None)) for a in state._arrays]
            if shapes and shapes[0][1] and shapes == self._state_shapes(shapes[0][1][0]):
                return
        self._explain_state(state)

    def _state_shapes(self, batch: int) -> list:
        if batch not in self._shapes:
            widths = self.program["registers"]
            self._shapes[batch] = [(np.ndarray, (batch, widths[s["prev"]])) for s in self.program["states"]]
        return self._shapes[batch]

    def _explain_state(self, state) -> None:
        """ValueError naming what is wrong with a state that failed the quick check."""
        if not isinstance(state, State):
            raise ValueError(f"state must be a State (from initial_state() or step()), got {type(state).__name__}")
        if state.names != list(self._state_names):
            raise ValueError(f"state is not this model's: it holds {_names(state.names)}, "
                             f"this model's is {_names(self._state_names)}")
        widths = self.program["registers"]
        first = state.arrays[0] if state.arrays else None
        batch = first.shape[0] if isinstance(first, np.ndarray) and first.ndim else "batch"
        for (name, layer), a, st in zip(state.names, state.arrays, self.program["states"]):
            want = (batch, widths[st["prev"]])
            if not isinstance(a, np.ndarray) or a.shape != want:
                got = a.shape if isinstance(a, np.ndarray) else type(a).__name__
                raise ValueError(f"state is not this model's: {name}@{layer} is {got}, this model's is {want}")

    def step(self, ids, state: State):
        """Advance every stream one token: ids (batch,) ints -> (logits (batch, vocab), new state).

        The new state is the VM's buffers (see `State`): stepping the state the last step
        returned copies nothing; any other state is copied into the VM first."""
        self._check_open()
        vm = state._vm if type(state) is State else None
        if vm is None or vm.holder() is not state or self._vms.get(vm.batch) is not vm:
            self._check_state(state)
            vm = self._vms.get(state.batch) or self.vm(state.batch)
            for buf, a in zip(vm.state_arrays(), state._arrays):
                buf[...] = a
        logits = vm.advance(self._step_ids(ids, vm.batch))
        state = State.__new__(State)        # its arrays are the VM's buffers: no __init__ copies
        state.names, state._batch = list(self._names_list), vm.batch
        return logits.copy(), vm.hand_out(state)

    def _step_ids(self, ids, batch: int) -> np.ndarray:
        """check_ids, with a quick path for an intp array of the right shape (what step()'s
        callers usually pass): its values as Python ints are cheaper to bound than a reduction."""
        if type(ids) is np.ndarray and ids.dtype is _INTP and ids.shape == (batch,):
            vals = ids.tolist()
            if vals and 0 <= min(vals) and max(vals) < self._vocab_size:
                return ids
        return self.check_ids(ids, (batch,))

    def _release(self) -> None:
        self._vms.clear()
        self._bound = None


_INTP = np.dtype(np.intp)     # NumPy's built-in dtypes are singletons: `is` is the quick test


def _check_batch(batch) -> None:
    if type(batch) is not int and not isinstance(batch, np.integer) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")


def _names(names) -> str:
    return ", ".join(f"{n}@{layer}" for n, layer in names) or "no states"


def load(path, verify: bool = False) -> Model:
    """Open and validate a .nnb file (memory-mapped). Raises NNBFormatError if it is not valid.

    The header is always checked against its SHA-256. verify=False (the default) leaves the
    tensor data's SHA-256 unchecked, so that opening does not read the whole file (the
    command line verifies by default); verify=True reads and checks it, and that every
    weight is finite.

    A file of kind "seq2seq" gives an `nn2run.seq2seq.Seq2SeqModel`."""
    return _model(fmt.read(path, verify_data=verify))


def loads_model(data: bytes) -> Model:
    """Validate a model from bytes (used by the fuzzer)."""
    return _model(fmt.loads(data))


def file_kind(header: dict) -> str | None:
    """The kind a header names ("seq2seq", "seq2seq-checkpoint"), None for a language model."""
    nn2 = header.get("nn2")
    return nn2.get("kind") if isinstance(nn2, dict) else None


def _model(nnb: fmt.NNBFile):
    kind = file_kind(nnb.header)
    if kind == "seq2seq":
        from .seq2seq import Seq2SeqModel  # imported only for such a file: a start costs less
        return Seq2SeqModel(nnb)
    if kind == "seq2seq-checkpoint":            # it holds no program to run
        raise NNBFormatError("a seq2seq training checkpoint (for nn2c train --resume), not a model")
    return Model(nnb)

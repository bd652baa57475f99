"""`nn2c export`: one step of a .nnb program as an ONNX graph.

The graph takes the step's token ids and the states, and returns the logits and the new
states, so any ONNX runtime can carry the state from call to call as nn2run does:

    inputs:  ids (batch,) int64, then one (batch, width) float32 per state, named
             `NAME@LAYER` in the order `Model.initial_state` gives them
    outputs: logits (batch, vocab) float32, then the new states, `NAME@LAYER.next`,
             in the same order

The batch axis is the symbolic dimension `batch`. The program is translated one
instruction at a time (the opcodes of `nn2run.isa`), so the graph computes what the file
holds; the tensors the program reads become float32 initializers. A model whose
initializers exceed what one protobuf can hold keeps them in `OUT.data` beside the graph.

`onnx` is needed only here; nothing else in nn2 imports it.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

OPSET = 17
IR_VERSION = 8                  # the IR that opset 17 came with: older runtimes read it
# protobuf refuses a message of 2 GiB; weights beyond this go to OUT.data (graph and margin kept)
INLINE_LIMIT = (1 << 31) - (1 << 26)
ALIGN = 64                      # offsets of the external tensors, so a runtime can map them
INSTALL_HINT = "export needs the onnx package: pip install onnx"


class ExportError(Exception):
    """An export that cannot be done; str() is one line for the user."""


# opcode -> ONNX operator for the element-wise instructions, operands in program order
ELEMENTWISE = {"add": "Add", "sub": "Sub", "mul": "Mul", "neg": "Neg", "sigmoid": "Sigmoid",
               "tanh": "Tanh", "relu": "Relu", "exp": "Exp", "log": "Log", "copy": "Identity",
               "div": "Div", "sqrt": "Sqrt"}


class _Graph:
    """The nodes and initializers built so far, and the name of each register's value."""

    def __init__(self, onnx, program: dict, tensors: dict, vocab_size: int, external: str | None):
        self.onnx, self.helper, self.numpy_helper = onnx, onnx.helper, onnx.numpy_helper
        self.external, self.blobs, self.data_size = external, [], 0   # blobs: (offset, array)
        self.program, self.tensors, self.vocab_size = program, tensors, vocab_size
        self.nodes, self.initializers = [], {}   # key -> TensorProto
        self.used: set[str] = set()              # every value name in the graph
        self.values: dict[int, str] = {}         # register -> value name
        self.out_names: dict[int, str] = {}      # register -> graph output it is written as

    def fresh(self, want: str) -> str:
        """`want`, or `want~2`, … : names in a file may be anything, graph names are unique."""
        name, k = want, 1
        while name in self.used:
            k += 1
            name = f"{want}~{k}"
        self.used.add(name)
        return name

    def constant(self, key: str, array: np.ndarray) -> str:
        if key not in self.initializers:
            self.initializers[key] = self.numpy_helper.from_array(array, self.fresh(key))
        return self.initializers[key].name

    def tensor(self, name: str) -> str:
        key = "tensor:" + name
        if key not in self.initializers:
            t = self.tensors[name]
            if t.dtype.kind != "f":
                raise ExportError(f"cannot export tensor {name!r} of dtype {t.dtype} (float tensors only)")
            array = np.ascontiguousarray(t, dtype=np.float32)
            if self.external is None:
                self.initializers[key] = self.numpy_helper.from_array(array, self.fresh(name))
            else:
                self.initializers[key] = self._external(self.fresh(name), array)
        return self.initializers[key].name

    def _external(self, name: str, array: np.ndarray):
        """A TensorProto whose data will be at the next aligned offset of the external file."""
        proto = self.onnx.TensorProto(name=name, data_type=self.onnx.TensorProto.FLOAT, dims=array.shape)
        offset = -self.data_size // ALIGN * -ALIGN
        for field, value in (("location", self.external), ("offset", offset), ("length", array.nbytes)):
            proto.external_data.add(key=field, value=str(value))
        proto.data_location = self.onnx.TensorProto.EXTERNAL
        self.blobs.append((offset, array))
        self.data_size = offset + array.nbytes
        return proto

    def operand(self, op, pc: int) -> str:
        tag, val = op
        if tag == "r":
            return self.values[val]
        if tag == "t":
            return self.tensor(val)
        if tag == "k":
            return self.constant(f"k:{float(val)!r}", np.array(val, dtype=np.float32))
        raise ExportError(f"cannot export instruction {pc}: operand tag {tag!r}")

    def node(self, op_type: str, inputs: list[str], dst: int, pc: int, opcode: str, **attrs) -> None:
        out = self.out_names.get(dst) or self.fresh(f"r{dst}")
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=f"{pc}:{opcode}", **attrs))
        self.values[dst] = out


def _onehot(g: _Graph, pc, dst, args):
    depth = g.constant("vocab_size", np.array([g.vocab_size], np.int64))
    values = g.constant("onehot_values", np.array([0.0, 1.0], np.float32))
    g.node("OneHot", ["ids", depth, values], dst, pc, "onehot", axis=-1)


def _gather(g: _Graph, pc, dst, args):
    g.node("Gather", [g.operand(args[0], pc), "ids"], dst, pc, "gather", axis=0)


def _matmul(g: _Graph, pc, dst, args):
    g.node("MatMul", [g.operand(a, pc) for a in args], dst, pc, "matmul")


def _slice(g: _Graph, pc, dst, args):
    start = args[1]
    stop = start + g.program["registers"][dst]
    ends = [g.constant(f"slice:{n}", np.array([n], np.int64)) for n in (start, stop)]
    axes = g.constant("axis:1", np.array([1], np.int64))
    g.node("Slice", [g.operand(args[0], pc), *ends, axes], dst, pc, "slice")


def _concat(g: _Graph, pc, dst, args):
    g.node("Concat", [g.operand(a, pc) for a in args], dst, pc, "concat", axis=1)


def _softmax(g: _Graph, pc, dst, args):
    g.node("Softmax", [g.operand(args[0], pc)], dst, pc, "softmax", axis=1)


def _log_softmax(g: _Graph, pc, dst, args):
    g.node("LogSoftmax", [g.operand(args[0], pc)], dst, pc, "logsoftmax", axis=1)


def _reduce(opcode, op_type):
    """A row's reduction into one column (keepdims). At opset 17 ReduceSum reads its axes
    as an input, ReduceMean and ReduceMax as an attribute."""
    def emit(g: _Graph, pc, dst, args):
        x = g.operand(args[0], pc)
        if op_type == "ReduceSum":
            g.node(op_type, [x, g.constant("axis:1", np.array([1], np.int64))], dst, pc, opcode, keepdims=1)
        else:
            g.node(op_type, [x], dst, pc, opcode, axes=[1], keepdims=1)
    return emit


def _elementwise(opcode):
    def emit(g: _Graph, pc, dst, args):
        g.node(ELEMENTWISE[opcode], [g.operand(a, pc) for a in args], dst, pc, opcode)
    return emit


# opcode -> emitter; an opcode missing here is refused by name
EMITTERS = {"onehot": _onehot, "gather": _gather, "matmul": _matmul, "slice": _slice,
            "concat": _concat, "softmax": _softmax, "logsoftmax": _log_softmax,
            "mean": _reduce("mean", "ReduceMean"), "sum": _reduce("sum", "ReduceSum"),
            "max": _reduce("max", "ReduceMax"), **{op: _elementwise(op) for op in ELEMENTWISE}}


def _import_onnx():
    try:
        import onnx
        import onnx.helper
        import onnx.numpy_helper
    except ImportError:
        raise ExportError(INSTALL_HINT) from None
    return onnx


def state_names(program: dict) -> list[str]:
    """The graph's state input names, in the program's (and `initial_state`'s) order."""
    return [f"{s['name']}@{s['layer']}" for s in program["states"]]


def to_onnx(program: dict, tensors: dict, vocab_size: int, doc: str = "", external: str | None = None):
    """(onnx.ModelProto of one step of a validated program, external blobs).

    With `external` (a file name), the program's tensors are not in the graph but in that
    file, at the offsets of the returned (offset, array) pairs; otherwise the list is empty.
    """
    onnx = _import_onnx()
    helper = onnx.helper
    g = _Graph(onnx, program, tensors, vocab_size, external)
    widths, states, names = program["registers"], program["states"], state_names(program)
    f32, batch = onnx.TensorProto.FLOAT, "batch"
    outputs = [("logits", program["logits"])] + [(n + ".next", s["next"]) for s, n in zip(states, names)]
    for name in ["ids", *names, *(n for n, _ in outputs)]:
        if name in g.used:
            raise ExportError(f"cannot export: two inputs or outputs would be named {name!r}")
        g.used.add(name)
    inputs = [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [batch])]
    for s, name in zip(states, names):
        g.values[s["prev"]] = name
        inputs.append(helper.make_tensor_value_info(name, f32, [batch, widths[s["prev"]]]))
    for name, reg in outputs:
        if reg not in g.out_names and reg not in g.values:   # written by code, not yet an output
            g.out_names[reg] = name
    for pc, ins in enumerate(program["code"]):
        emit = EMITTERS.get(ins[0])
        if emit is None:
            raise ExportError(f"cannot export opcode {ins[0]!r} (instruction {pc})")
        emit(g, pc, ins[1], ins[2:])
    for name, reg in outputs:                # an output that is another's value, or an input
        if g.values[reg] != name:
            g.nodes.append(helper.make_node("Identity", [g.values[reg]], [name], name=f"out:{name}"))
    value_infos = [helper.make_tensor_value_info(name, f32, [batch, widths[reg]]) for name, reg in outputs]
    graph = helper.make_graph(g.nodes, "nn2_step", inputs, value_infos,
                              initializer=list(g.initializers.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="nn2c", doc_string=doc)
    model.ir_version = IR_VERSION
    if external is None:
        _check(onnx, model)
    return model, g.blobs


def _check(onnx, model) -> None:
    """onnx's own checker (a model or a path); what it finds is a one-line ExportError."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the graph does not pass onnx's checker: {str(e).strip().splitlines()[0]}") from None


def _program_bytes(program: dict, tensors: dict) -> int:
    names = {a[1] for ins in program["code"] for a in ins[2:] if isinstance(a, list) and a[0] == "t"}
    return sum(tensors[n].size * 4 for n in names)


def _write_atomic(path: str, chunks) -> None:
    """Write `chunks` (bytes-like, in order) to a temp file beside `path`, fsync, rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path)[:64] + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _blob_chunks(blobs):
    at = 0
    for offset, array in blobs:
        yield bytes(offset - at)
        yield memoryview(array).cast("B")
        at = offset + array.nbytes


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def export_onnx(model_path: str, out_path: str) -> str:
    """Write the ONNX graph of MODEL's step to OUT (atomically); returns a one-line summary.

    Raises ExportError with a one-line reason (no onnx, not a model, an opcode or tensor
    the graph cannot hold, a write that failed); an existing OUT is then left as it was.
    """
    onnx = _import_onnx()
    import nn2run
    if _same_file(model_path, out_path):
        raise ExportError(f"--onnx {out_path} is the model file; writing there would destroy it")
    try:
        m = nn2run.load(model_path)
    except nn2run.NNBFormatError as e:
        raise ExportError(f"cannot load {model_path}: {e}") from None
    if not isinstance(m, nn2run.Model):
        m.close()
        raise ExportError(f"{model_path} is a seq2seq model; --onnx exports the step of a "
                          "language model (nn2c train without --task seq2seq)")
    with m:
        external = None
        if _program_bytes(m.program, m.tensors) > INLINE_LIMIT:
            external = os.path.basename(out_path) + ".data"
        meta = m.header["model"]
        shape = f"{meta['layers']}×{meta['hidden']} {meta.get('kernel') or 'model'}"
        model, blobs = to_onnx(m.program, m.tensors, len(m.vocab), f"one step of an nn2 {shape}", external)
        try:
            if external:
                _write_atomic(os.path.join(os.path.dirname(out_path), external), _blob_chunks(blobs))
            _write_atomic(out_path, [model.SerializeToString()])
        except OSError as e:
            raise ExportError(f"cannot write {out_path}: {e.strerror or e}") from None
    if external:
        _check(onnx, out_path)
    inputs = ", ".join(["ids", *state_names(m.program)])
    where = f" (weights in {external})" if external else ""
    return (f"wrote {out_path}{where}: {shape}, opset {OPSET}, {len(model.graph.node)} nodes; "
            f"inputs {inputs}; outputs logits, then each state's NAME.next")

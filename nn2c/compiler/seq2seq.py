"""The seq2seq pipeline: an encoder kernel and a decoder kernel -> one .nnb of kind seq2seq.

    compiled = compile_seq2seq("gru", "seq2seq/bahdanau", hidden=64, layers=1,
                               source_vocab=30, target_vocab=32)
    tensors = init_seq2seq_tensors(compiled.network, seed=0)
    write_seq2seq("m.nnb", compiled, tensors, source_codec, target_codec,
                  {"source": 60, "target": 80}, provenance={})

The encoder is the layers of a cell kernel (layer 0 reads a one-hot over the source
vocabulary); its top layer's output at every position is the decoder's memory. The
decoder is one cell of layer L whose output is the logits (the readout is inside it);
the bridge gives states their value before the first step. The decoder's program splits
in two: "prepare" (once per input: what depends on memory, final and parameters only,
and the bridge) and "code" (one step). The file is described in nn2run's seq2seq reader.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np

import nn2run.format as fmt
from nn2c import __version__
from nn2c.compiler.emit import _Emitter, emit, init_logical, pack, param_map, param_roles
from nn2c.compiler.ir import Cell, Network, Node, Seq2SeqNetwork, positional
from nn2c.compiler.lower import _Lowerer, lower, readout_logits
from nn2c.compiler.optimize import PASSES, optimize, optimize_cell
from nn2c.lang.ast import Kernel
from nn2c.lang.check import CheckedKernel, check, check_layers
from nn2c.lang.decoder import CheckedDecoder, check_decoder
from nn2c.lang.errors import KernelError
from nn2c.lang.kernels import load_kernel

MAX_LIMIT = 65536


@dataclass
class CompiledSeq2Seq:
    encoder_kernel: Kernel
    decoder_kernel: Kernel
    encoder_checked: CheckedKernel
    decoder_checked: CheckedDecoder
    network: Seq2SeqNetwork        # optimized
    programs: dict                 # {"encoder": …, "decoder": …}
    params: dict                   # the parameter map of every tensor
    encoder_name: str
    decoder_name: str

    @property
    def header(self) -> dict:
        """The header pieces fixed at compile time (write_seq2seq adds codecs and limits)."""
        n = self.network
        return {"nn2": {"kind": "seq2seq", "nn2c": __version__},
                "model": {"layers": n.layers, "hidden": n.hidden, "encoder": self.encoder_name,
                          "decoder": self.decoder_name},
                "encoder": self.programs["encoder"], "decoder": self.programs["decoder"],
                "params": self.params,
                "source": {"encoder": {"name": self.encoder_name, "text": self.encoder_kernel.source},
                           "decoder": {"name": self.decoder_name, "text": self.decoder_kernel.source}}}


def _name(spec, kernel: Kernel) -> str:
    return spec if isinstance(spec, str) and not spec.endswith(".eq") else kernel.filename


def _kernel(spec) -> Kernel:
    return load_kernel(spec) if isinstance(spec, str) else spec


def compile_seq2seq(encoder="gru", decoder="seq2seq/bahdanau", hidden=128, layers=1,
                    source_vocab=None, target_vocab=None, passes=tuple(PASSES)) -> CompiledSeq2Seq:
    """Compile an encoder (a cell kernel) and a decoder kernel (sample names, paths or parsed
    Kernels) for the given sizes; target_vocab counts the begin and end tokens."""
    enc_kernel, dec_kernel = _kernel(encoder), _kernel(decoder)
    enc = check(enc_kernel)
    check_layers(enc, layers)
    dec = check_decoder(dec_kernel)
    try:
        enc_net = optimize(lower(enc, hidden, source_vocab, layers), passes)
    except KernelError as e:
        raise e.with_source(enc_kernel.filename, enc_kernel.source) from None
    try:
        network = lower_seq2seq(enc_net.cells, dec, hidden, layers, source_vocab, target_vocab, passes)
    except KernelError as e:
        raise e.with_source(dec_kernel.filename, dec_kernel.source) from None
    programs = {"encoder": emit_encoder(network), "decoder": emit_decoder(network)}
    return CompiledSeq2Seq(enc_kernel, dec_kernel, enc, dec, network, programs,
                           param_map(network.tensors()), str(_name(encoder, enc_kernel)),
                           str(_name(decoder, dec_kernel)))


# --- lowering -----------------------------------------------------------------------------

def lower_seq2seq(encoder: list[Cell], dec: CheckedDecoder, hidden: int, layers: int,
                  source_vocab: int, target_vocab: int, passes=tuple(PASSES)) -> Seq2SeqNetwork:
    """The decoder cell (layer `layers`, optimized) and the bridge over the encoder's cells."""
    sizes = {"H": hidden, "X": target_vocab, "V": target_vocab}
    memory = Node("memory", (), hidden, {"positional": True})
    final = Node("final", (), hidden)
    lw = _Lowerer(dec, dec.params, layers, sizes)
    lw.env.update({dec.memory: memory, dec.final: final})
    inp = lw.env[dec.input] = Node("onehot", (), target_vocab)
    prev = {s: Node("state", (), hidden, {"name": s}) for s in dec.states}
    lw.env.update({s + "ₜ₋₁": node for s, node in prev.items()})
    for eq in dec.order:
        lw.env[eq.target.name] = lw.expr(eq.expr)
    logits = readout_logits(lw, dec.readout.expr)
    cell = Cell(layers, inp, [(s, prev[s], lw.env[s]) for s in dec.states], logits, lw.tensors)
    bw = _Lowerer(dec, dec.bridge_params, layers, sizes)
    bw.env[dec.final] = final
    bridge = {name: bw.expr(eq.expr) for name, eq in dec.bridge.items()}
    return Seq2SeqNetwork(encoder, optimize_cell(cell, passes), bridge, source_vocab,
                          target_vocab, hidden, layers, bw.tensors)


# --- emitting -----------------------------------------------------------------------------

def emit_encoder(network: Seq2SeqNetwork) -> dict:
    """The encoder's program: a language model's, with "output" (the top layer's output,
    width H) in place of "logits"."""
    top = Node("input", (), network.hidden)
    layers = Network(network.encoder, Cell(None, top, [], top, {}), network.source_vocab, network.hidden)
    program, _ = emit(layers)
    program["output"] = program.pop("logits")
    return program


def _static(nodes) -> set[Node]:
    """The nodes computed from memory, final, parameters and constants alone."""
    out = set()
    for n in nodes:
        if n.op in ("memory", "final", "param", "const") or (
                n.args and n.op not in ("onehot", "gather") and all(a in out for a in n.args)):
            out.add(n)
    return out


def emit_decoder(network: Seq2SeqNetwork) -> dict:
    cell, e = network.decoder, _Emitter()
    nodes = cell.nodes()
    memory, final = e.new(network.hidden), e.new(network.hidden)
    for n in nodes:
        if n.op in ("memory", "final"):
            e.reg[n] = memory if n.op == "memory" else final
    for _, prev, _ in cell.states:
        e.reg[prev] = e.new(prev.width)
    static, prepare, code = _static(nodes), [], []
    for n in nodes:
        e.code = prepare if n in static else code
        e.node(n)
    e.code = prepare
    inits = {}
    bridge = Cell(cell.layer, cell.input, [(s, None, v) for s, v in network.bridge.items()], cell.input, {})
    for n in bridge.nodes():
        if n.op == "final":
            e.reg[n] = final
        elif n is not cell.input:
            e.node(n)
    taken = {final}
    for name, value in network.bridge.items():
        inits[name] = e.owned(value, taken)
    e.code, states, taken = code, [], set()
    for name, prev, nxt in cell.states:
        states.append({"name": name, "layer": cell.layer, "prev": e.reg[prev],
                       "next": e.owned(nxt, taken), "init": inits.get(name)})
    regs = sorted({memory} | {e.reg[n] for n in nodes if positional(n) and n in e.reg})
    return {"registers": e.widths, "positional": regs, "memory": memory, "final": final,
            "prepare": prepare, "states": states, "code": code, "logits": e.reg[cell.output]}


# --- files --------------------------------------------------------------------------------

def init_seq2seq_tensors(network: Seq2SeqNetwork, seed: int) -> dict[str, np.ndarray]:
    """The stored tensors of a new model, drawn per parameter as `emit.init_logical`."""
    specs = network.tensors()
    return pack(specs, init_logical(specs, network.hidden, seed, param_roles(network)))


def _limits(limits: dict) -> dict:
    out = {}
    for key in ("source", "target"):
        value = limits.get(key)
        if type(value) is not int or not 1 <= value <= MAX_LIMIT:
            raise ValueError(f"limits[{key!r}] must be an integer in 1..{MAX_LIMIT}, got {value!r}")
        out[key] = value
    return out


def seq2seq_header(compiled: CompiledSeq2Seq, source_codec, target_codec, limits: dict,
                   provenance: dict) -> dict:
    """The .nnb header of a seq2seq model (the container adds the tensor table)."""
    n = len(target_codec.vocab)
    if compiled.network.target_vocab != n + 2:
        raise ValueError(f"the decoder was compiled for {compiled.network.target_vocab} target "
                         f"tokens, but the target codec has {n} characters (+ begin and end)")
    if compiled.network.source_vocab != len(source_codec.vocab):
        raise ValueError(f"the encoder was compiled for {compiled.network.source_vocab} source "
                         f"tokens, but the source codec has {len(source_codec.vocab)}")
    header = compiled.header
    header.update({"codec": source_codec.to_header(),
                   "target": {"codec": target_codec.to_header(), "begin": n, "end": n + 1},
                   "limits": _limits(limits),
                   "provenance": {"nn2c": __version__,
                                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                  **provenance}})
    return header


def write_seq2seq(path, compiled: CompiledSeq2Seq, tensors: dict[str, np.ndarray], source_codec,
                  target_codec, limits: dict, provenance: dict, extra_tensors=None,
                  extra_header=None) -> None:
    """Write a seq2seq .nnb atomically. `extra_*` carry training state in checkpoints."""
    header = seq2seq_header(compiled, source_codec, target_codec, limits, provenance)
    header.update(extra_header or {})
    fmt.write(path, header, {**tensors, **(extra_tensors or {})})

"""A Seq2SeqNetwork built by hand, for the trainer's tests: the encoder is the compiler's own
lowering of a cell kernel (`compile_kernel(...).network.cells`), the decoder a GRU with
Bahdanau's additive attention written node by node as the equations say:

    eₜⱼ = v_a · tanh(W_a sₜ₋₁ + U_a hⱼ)          αₜⱼ = softmaxⱼ(eₜⱼ)       cₜ = Σⱼ(αₜⱼ ⊙ hⱼ)
    rₜ = σ(W_ir xₜ + C_r cₜ + b_ir + W_hr sₜ₋₁ + b_hr)
    zₜ = σ(W_iz xₜ + C_z cₜ + b_iz + W_hz sₜ₋₁ + b_hz)
    nₜ = tanh(W_in xₜ + C_n cₜ + b_in + rₜ ⊙ (W_hn sₜ₋₁ + b_hn))
    sₜ = (1 − zₜ) ⊙ nₜ + zₜ ⊙ sₜ₋₁               logits = W_y sₜ + b_y
    s₀ = tanh(W_0 hₙ + b_0)

The trainer's runs train the compiled kernels; this network checks the trainer's torch
rendering against references independently of the compiler's decoder lowering.
"""

from __future__ import annotations

from nn2c.compiler.ir import Cell, Node, Part, Seq2SeqNetwork, TensorSpec
from nn2c.compiler.pipeline import compile_kernel
from nn2run import params


class _Builder:
    def __init__(self, layer: int):
        self.layer, self.tensors, self.nodes = layer, {}, {}

    def p(self, name: str, *shape: int) -> Node:
        """Parameter `name` of shape (rows, cols) or (n,), stored as the compiler stores it."""
        if name not in self.nodes:
            tname = params.tensor_name(self.layer, [name])
            if len(shape) == 2:
                spec = TensorSpec(tname, (shape[1], shape[0]), [Part(name, self.layer, "matrix", 0, shape[0])])
            else:
                spec = TensorSpec(tname, shape, [Part(name, self.layer, "vector", 0, shape[0])])
            self.tensors[tname] = spec
            self.nodes[name] = Node("param", (), shape[0], {"tensor": tname})
        return self.nodes[name]


def _op(op, *args, width=None, **attrs):
    return Node(op, tuple(args), width if width is not None else max(a.width for a in args), attrs)


def bahdanau_decoder(hidden: int, target_vocab: int, layer: int):
    """(decoder cell, bridge, bridge tensors) for `hidden` and a target vocabulary of
    `target_vocab` tokens."""
    H, V, b, bb = hidden, target_vocab, _Builder(layer), _Builder(layer)
    x = Node("onehot", (), V)
    s = Node("state", (), H, {"name": "s"})
    memory = Node("memory", (), H, {"positional": True})
    final = Node("final", (), H)
    pos = {"positional": True}
    keys = _op("matmul", memory, b.p("U_a", H, H), **pos)
    score = _op("tanh", _op("add", _op("matmul", s, b.p("W_a", H, H)), keys, **pos), **pos)
    e = _op("sum", _op("mul", b.p("v_a", H), score, **pos), width=1, **pos)
    alpha = _op("softmaxj", e, width=1, **pos)
    c = _op("sumj", _op("mul", alpha, memory, width=H, **pos), width=H)

    def gate(g: str) -> Node:
        inputs = _op("add", _op("add", _op("matmul", x, b.p(f"W_i{g}", H, V)), _op("matmul", c, b.p(f"C_{g}", H, H))),
                     b.p(f"b_i{g}", H))
        return inputs

    hr = _op("add", _op("matmul", s, b.p("W_hr", H, H)), b.p("b_hr", H))
    hz = _op("add", _op("matmul", s, b.p("W_hz", H, H)), b.p("b_hz", H))
    hn = _op("add", _op("matmul", s, b.p("W_hn", H, H)), b.p("b_hn", H))
    r = _op("sigmoid", _op("add", gate("r"), hr))
    z = _op("sigmoid", _op("add", gate("z"), hz))
    n = _op("tanh", _op("add", gate("n"), _op("mul", r, hn)))
    one = Node("const", (), 0, {"value": 1.0})
    s_next = _op("add", _op("mul", _op("sub", one, z, width=H), n), _op("mul", z, s))
    logits = _op("add", _op("matmul", s_next, b.p("W_y", V, H), width=V), b.p("b_y", V))
    s0 = _op("tanh", _op("add", _op("matmul", final, bb.p("W_0", H, H)), bb.p("b_0", H)))
    cell = Cell(layer, x, [("s", s, s_next)], logits, b.tensors)
    return cell, {"s": s0}, bb.tensors


def seq2seq_network(source_vocab: int, target_vocab: int, hidden: int = 16, layers: int = 1,
                    encoder: str = "torchgru") -> Seq2SeqNetwork:
    enc = compile_kernel(encoder, hidden, layers, source_vocab).network.cells
    dec, bridge, bridge_tensors = bahdanau_decoder(hidden, target_vocab, layers)
    return Seq2SeqNetwork(enc, dec, bridge, source_vocab, target_vocab, hidden, layers, bridge_tensors)


def luong_decoder(hidden: int, target_vocab: int, layer: int):
    """(decoder cell, bridge) of an LSTM with Luong's general attention, input feeding:

        [iₜ; fₜ; gₜ; oₜ] = W [xₜ; h̃ₜ₋₁] + U hₜ₋₁ + b      (σ, σ, tanh, σ)
        cₜ = fₜ ⊙ cₜ₋₁ + iₜ ⊙ gₜ        hₜ = oₜ ⊙ tanh(cₜ)
        eₜⱼ = sum(hⱼ ⊙ (W_a hₜ))        αₜⱼ = softmaxⱼ(eₜⱼ)     ctxₜ = Σⱼ(αₜⱼ ⊙ hⱼ)
        h̃ₜ = tanh(W_c [ctxₜ; hₜ])       logits = W_y h̃ₜ + b_y
        h₀ = tanh(W_0 hₙ)               (c and h̃ start at zero)

    Returns (decoder cell, bridge, bridge tensors).
    """
    H, V, b, bb = hidden, target_vocab, _Builder(layer), _Builder(layer)
    pos = {"positional": True}
    x = Node("onehot", (), V)
    h, c, ht = (Node("state", (), H, {"name": n}) for n in ("h", "c", "ht"))
    memory = Node("memory", (), H, pos)
    final = Node("final", (), H)
    pre = _op("add", _op("add", _op("matmul", _op("concat", x, ht, width=V + H), b.p("W", 4 * H, V + H)),
                         _op("matmul", h, b.p("U", 4 * H, H))), b.p("b", 4 * H))
    gate = lambda k: _op("slice", pre, width=H, start=k * H)        # noqa: E731
    i, f, g, o = _op("sigmoid", gate(0)), _op("sigmoid", gate(1)), _op("tanh", gate(2)), _op("sigmoid", gate(3))
    c_next = _op("add", _op("mul", f, c), _op("mul", i, g))
    h_next = _op("mul", o, _op("tanh", c_next))
    e = _op("sum", _op("mul", memory, _op("matmul", h_next, b.p("W_a", H, H)), **pos), width=1, **pos)
    alpha = _op("softmaxj", e, width=1, **pos)
    ctx = _op("sumj", _op("mul", alpha, memory, width=H, **pos), width=H)
    ht_next = _op("tanh", _op("matmul", _op("concat", ctx, h_next, width=2 * H), b.p("W_c", H, 2 * H)))
    logits = _op("add", _op("matmul", ht_next, b.p("W_y", V, H), width=V), b.p("b_y", V))
    h0 = _op("tanh", _op("matmul", final, bb.p("W_0", H, H)))
    cell = Cell(layer, x, [("h", h, h_next), ("c", c, c_next), ("ht", ht, ht_next)], logits, b.tensors)
    return cell, {"h": h0}, bb.tensors

"""Compiled seq2seq models against independent torch references in float64: a torch.nn.GRU
or torch.nn.LSTM encoder (packed by length), Bahdanau attention with a GRUCell on [x; c],
Luong's general attention with an LSTMCell on [x; h̃ₜ₋₁], and the bridge-only GRU of Cho et
al. The weights are drawn, written with write_seq2seq, loaded with nn2run.load and mapped
into the torch modules by the kernels' parameter names (Seq2SeqModel.param).

Tolerance: 1e-5 absolute (the runtime computes in float32; values are of order 1).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import nn2run
from nn2c.compiler.emit import logical_shapes, pack
from nn2c.compiler.seq2seq import compile_seq2seq, write_seq2seq
from nn2run import beam as beams
from nn2run.codec import CharCodec

H, L = 16, 2
SOURCE, TARGET = CharCodec(list("abcdefghij")), CharCodec(list("klmnopq"))
VS, VT = len(SOURCE.vocab), len(TARGET.vocab) + 2
BEGIN, END = VT - 2, VT - 1
LIMITS = {"source": 20, "target": 12}
TOL = 1e-5
CASES = {"bahdanau": ("torchgru", "seq2seq/bahdanau"), "luong": ("lstm", "seq2seq/luong"),
         "bridge": ("torchgru", "seq2seq/bridge")}


# ------------------------------------------------------------------ torch references (float64)
def _set(module, **values):
    with torch.no_grad():
        for name, value in values.items():
            getattr(module, name).copy_(value)
    return module


def _linear(w, b=None):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None).double()
    return _set(lin, weight=w, **({} if b is None else {"bias": b}))


def torch_encoder(p, kind):
    """nn.GRU (gates r, z, n) or nn.LSTM (gates i, f, g, o; lstm.eq's c̃ is torch's g) of L
    layers over one-hot sources, from the file's encoder parameters p(name, layer)."""
    gates = {"torchgru": [("W_ir", "W_iz", "W_in"), ("W_hr", "W_hz", "W_hn"),
                          ("b_ir", "b_iz", "b_in"), ("b_hr", "b_hz", "b_hn")],
             "lstm": [("W_i", "W_f", "W_c", "W_o"), ("U_i", "U_f", "U_c", "U_o"),
                      ("b_i", "b_f", "b_c", "b_o"), None]}[kind]
    rnn = (nn.GRU if kind == "torchgru" else nn.LSTM)(VS, H, L, batch_first=True).double()
    for k in range(L):
        ih, hh, bih, bhh = (None if g is None else torch.cat([p(n, k) for n in g]) for g in gates)
        _set(rnn, **{f"weight_ih_l{k}": ih, f"weight_hh_l{k}": hh, f"bias_ih_l{k}": bih,
                     f"bias_hh_l{k}": torch.zeros_like(bih) if bhh is None else bhh})
    return rnn


def torch_encode(rnn, sources):
    """(memory (B, T, H), zero beyond each length; final (B, H): torch's last state of the
    packed sequence, the output at each row's last true position)."""
    lengths = torch.tensor([len(s) for s in sources])
    ids = torch.zeros(len(sources), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(sources):
        ids[i, :len(s)] = torch.tensor(s)
    x = nn.functional.one_hot(ids, VS).double()
    with torch.no_grad():
        out, last = rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        memory, _ = pad_packed_sequence(out, batch_first=True)
    last = last[0] if isinstance(last, tuple) else last
    return memory, last[-1], lengths


def masked_softmax(scores, lengths):
    valid = torch.arange(scores.shape[1])[None, :] < lengths[:, None]
    return scores.masked_fill(~valid, float("-inf")).softmax(1)


class Bahdanau:
    """A GRUCell on [x; c] (weight_ih = [W_i· C_·] per gate r, z, n), additive attention."""

    def __init__(self, p):
        cat = torch.cat
        self.cell = _set(nn.GRUCell(VT + H, H).double(),
                         weight_ih=cat([cat([p("W_i" + g), p("C_" + g)], 1) for g in "rzn"]),
                         weight_hh=cat([p("W_h" + g) for g in "rzn"]),
                         bias_ih=cat([p("b_i" + g) for g in "rzn"]),
                         bias_hh=cat([p("b_h" + g) for g in "rzn"]))
        self.W_a, self.U_a, self.v_a = _linear(p("W_a")), _linear(p("U_a")), _linear(p("v_a"))
        self.bridge, self.readout = _linear(p("W_0"), p("b_0")), _linear(p("W_y"), p("b_y"))

    def start(self, memory, final, lengths):
        self.memory, self.lengths, self.keys = memory, lengths, self.U_a(memory)
        return torch.tanh(self.bridge(final))

    def step(self, s, ids):
        e = self.v_a(torch.tanh(self.W_a(s)[:, None, :] + self.keys))[..., 0]
        alpha = masked_softmax(e, self.lengths)
        c = (alpha[:, :, None] * self.memory).sum(1)
        x = nn.functional.one_hot(ids, VT).double()
        s = self.cell(torch.cat([x, c], 1), s)
        return self.readout(s), s, alpha

    def reorder(self, state, rows):
        return state[rows]


class Luong:
    """An LSTMCell on [x; h̃ₜ₋₁] (gates i, f, g, o), general attention, h̃ = tanh(W_c [c; h])."""

    def __init__(self, p):
        cat = torch.cat
        self.cell = _set(nn.LSTMCell(VT + H, H).double(),
                         weight_ih=cat([p("W_" + g) for g in "ifgo"]),
                         weight_hh=cat([p("U_" + g) for g in "ifgo"]),
                         bias_ih=cat([p("b_" + g) for g in "ifgo"]),
                         bias_hh=torch.zeros(4 * H, dtype=torch.float64))
        self.W_a, self.W_c, self.readout = _linear(p("W_a")), _linear(p("W_c")), _linear(p("W_y"), p("b_y"))

    def start(self, memory, final, lengths):
        self.memory, self.lengths = memory, lengths
        zero = torch.zeros(len(final), H, dtype=torch.float64)
        return zero, zero, zero                    # h, the cell m, h̃: no bridge, zeros

    def step(self, state, ids):
        h, m, ht = state
        x = nn.functional.one_hot(ids, VT).double()
        h, m = self.cell(torch.cat([x, ht], 1), (h, m))
        alpha = masked_softmax((self.memory * self.W_a(h)[:, None, :]).sum(-1), self.lengths)
        c = (alpha[:, :, None] * self.memory).sum(1)
        ht = torch.tanh(self.W_c(torch.cat([c, h], 1)))
        return self.readout(ht), (h, m, ht), alpha

    def reorder(self, state, rows):
        return tuple(v[rows] for v in state)


class Bridge:
    """Cho et al.'s GRU (reset before U_s, sₜ = (1 − z) sₜ₋₁ + z ŝₜ), hₙ read at every step."""

    def __init__(self, p):
        self.W = {g: _linear(p("W_" + g), p("b_" + g)) for g in "zrs"}
        self.U = {g: _linear(p("U_" + g)) for g in "zrs"}
        self.C = {g: _linear(p("C_" + g)) for g in "zrs"}
        self.bridge, self.readout = _linear(p("W_0"), p("b_0")), _linear(p("W_y"), p("b_y"))

    def start(self, memory, final, lengths):
        self.context = {g: self.C[g](final) for g in "zrs"}
        return torch.tanh(self.bridge(final))

    def step(self, s, ids):
        x = nn.functional.one_hot(ids, VT).double()
        z = torch.sigmoid(self.W["z"](x) + self.U["z"](s) + self.context["z"])
        r = torch.sigmoid(self.W["r"](x) + self.U["r"](s) + self.context["r"])
        sh = torch.tanh(self.W["s"](x) + self.U["s"](r * s) + self.context["s"])
        s = (1 - z) * s + z * sh
        return self.readout(s), s, None

    def reorder(self, state, rows):
        return state[rows]


DECODERS = {"bahdanau": Bahdanau, "luong": Luong, "bridge": Bridge}


class Reference:
    """The torch encoder and decoder of a loaded model, its weights read by kernel parameter
    name and layer (the decoder's are layer L); decoding as nn2run.beam describes it."""

    def __init__(self, model, name):
        def p(param, layer=L):
            return torch.from_numpy(np.asarray(model.param(param, layer), np.float64).copy())
        self.encoder = torch_encoder(p, CASES[name][0])
        self.decoder = DECODERS[name](p)

    def start(self, sources):
        memory, final, lengths = torch_encode(self.encoder, sources)
        return self.decoder.start(memory, final, lengths)

    def force(self, sources, steps_ids):
        """Logits (B, T, Vt) and attention weights (B, T, J) reading steps_ids (B, T)."""
        state, logits, alphas = self.start(sources), [], []
        with torch.no_grad():
            for t in range(steps_ids.shape[1]):
                out, state, alpha = self.decoder.step(state, torch.from_numpy(steps_ids[:, t]))
                logits.append(out)
                alphas.append(alpha)
        return torch.stack(logits, 1).numpy(), None if alphas[0] is None else torch.stack(alphas, 1).numpy()

    def greedy(self, sources, limit):
        state, n = self.start(sources), len(sources)
        ids, done, out = torch.full((n,), BEGIN), torch.zeros(n, dtype=torch.bool), [[] for _ in sources]
        with torch.no_grad():
            for _ in range(limit):
                logits, state, _ = self.decoder.step(state, ids)
                logits[:, BEGIN] = float("-inf")          # BEGIN is never chosen
                ids = logits.argmax(1)
                for i in torch.nonzero(~done & (ids != END))[:, 0].tolist():
                    out[i].append(int(ids[i]))
                done |= ids == END
                if done.all():
                    break
        return out

    def beam(self, source, k, limit, alpha=1.0):
        """Plain beam search over one source: the best k - finished candidates each step
        (ties: lower beam, then lower token); ranked by logp / length ** alpha."""
        state = self.start([source])
        live, finished = [((), 0.0)], []
        with torch.no_grad():
            for _ in range(limit):
                ids = torch.tensor([toks[-1] if toks else BEGIN for toks, _ in live])
                logits, state, _ = self.decoder.step(state, ids)     # a row per live beam
                logp = logits.log_softmax(1)
                cands = [(lp + float(logp[row, v]), row, v) for row, (_, lp) in enumerate(live)
                         for v in range(VT) if v != BEGIN]
                cands.sort(key=lambda c: (-c[0], c[1], c[2]))
                new, rows = [], []
                for score, row, v in cands[:k - len(finished)]:
                    if v == END:
                        finished.append((live[row][0], score, len(live[row][0]) + 1))
                    else:
                        new.append((live[row][0] + (v,), score))
                        rows.append(row)
                live = new
                if not live:
                    break
                state = self.decoder.reorder(state, rows)
        finished += [(toks, lp, len(toks)) for toks, lp in live]
        return sorted(finished, key=lambda h: -h[1] / h[2] ** alpha)


# ------------------------------------------------------------------ the models under test
def draw(specs, seed, scale):
    """Every kernel parameter uniform in ±scale (biases and gains generic), END likelier so
    that outputs end at mixed lengths."""
    rng = np.random.default_rng(seed)
    logical = {k: rng.uniform(-scale, scale, s).astype(np.float32) for k, s in logical_shapes(specs).items()}
    logical[f"b_y@{L}"][END] += 1.0
    return pack(specs, logical)


# Values are compared on weights in ±0.5; decisions (greedy, beams) on weights in ±1.5, large
# enough that the outputs depend on the input (with ±0.5, 500 inputs give a handful of
# outputs), where float32 rounding grows past 1e-5 over the steps but not past a decision.
SCALES = {"values": 0.5, "decisions": 1.5}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The references' tensors are small: one thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(name, {"values": (model, reference), "decisions": (model, reference)}, folder holding
    values.nnb and decisions.nnb)."""
    encoder, decoder = CASES[request.param]
    compiled = compile_seq2seq(encoder, decoder, hidden=H, layers=L, source_vocab=VS, target_vocab=VT)
    folder, out = tmp_path_factory.mktemp(request.param), {}
    for use, scale in SCALES.items():
        path = folder / f"{use}.nnb"
        write_seq2seq(path, compiled, draw(compiled.network.tensors(), len(request.param), scale),
                      SOURCE, TARGET, LIMITS, {"test": True})
        model = nn2run.load(path)
        out[use] = model, Reference(model, request.param)
    yield request.param, out, folder
    for model, _ in out.values():
        model.close()


def random_sources(n, seed, lo=1, hi=LIMITS["source"]):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VS, size=rng.integers(lo, hi + 1)).tolist() for _ in range(n)]


def text(ids, codec=SOURCE):
    return "".join(codec.vocab[i] for i in ids)


def attention_register(model) -> int:
    (reg,) = [ins[1] for ins in model.decoder["code"] if ins[0] == "softmaxj"]
    return reg


# ------------------------------------------------------------------ the tests
def test_memory_and_final_match_torch_packed_encoder(case):
    name, models, _ = case
    model, ref = models["values"]
    sources = random_sources(24, seed=1)
    memory, final = model.encode(sources)
    want, want_final, lengths = torch_encode(ref.encoder, sources)
    longest = int(lengths.max())
    assert memory.shape[:2] == (len(sources), LIMITS["source"]) and longest == LIMITS["source"]
    np.testing.assert_allclose(memory[:, :longest], want.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(final, want_final.numpy(), atol=TOL, rtol=0)
    assert all((memory[i, len(s):] == 0).all() for i, s in enumerate(sources))


def test_attention_and_every_teacher_forced_logit_match(case):
    name, models, _ = case
    model, ref = models["values"]
    sources = random_sources(16, seed=2)
    rng = np.random.default_rng(3)
    targets = [rng.integers(0, VT - 2, size=rng.integers(0, 9)).tolist() for _ in sources]
    watch = () if name == "bridge" else (attention_register(model),)
    logits, seen = model.force(sources, targets, watch=watch)
    steps = np.full((len(targets), logits.shape[1]), END)      # BEGIN, the target, then END
    steps[:, 0] = BEGIN
    for i, t in enumerate(targets):
        steps[i, 1:len(t) + 1] = t
    want_logits, want_alpha = ref.force(sources, steps)
    assert logits.shape == want_logits.shape == (16, 9, VT)
    np.testing.assert_allclose(logits, want_logits, atol=TOL, rtol=0)
    if watch:
        alpha = seen[watch[0]][..., 0]                          # (B, T, J, 1) -> (B, T, J)
        np.testing.assert_allclose(alpha[:, :, :want_alpha.shape[2]], want_alpha, atol=TOL, rtol=0)
        assert all((alpha[i, :, len(s):] == 0).all() for i, s in enumerate(sources))
        assert np.abs(alpha.sum(2) - 1).max() < 1e-5


def test_greedy_is_identical_on_500_inputs_of_mixed_lengths(case):
    name, models, _ = case
    model, ref = models["decisions"]
    sources = random_sources(500, seed=4)
    got = model.translate([text(s) for s in sources], beam=1)
    want = [text(t, TARGET) for t in ref.greedy(sources, LIMITS["target"])]
    lengths = {len(w) for w in want}                   # outputs vary and end at mixed lengths
    assert len(set(want)) > 150 and len(lengths) > 3 and max(lengths) == LIMITS["target"]
    assert got == want


def test_beam_one_is_greedy(case):
    name, models, _ = case
    model, ref = models["decisions"]
    sources = random_sources(40, seed=5)
    greedy = beams.greedy(model.machine(sources), len(sources), BEGIN, END, LIMITS["target"])
    by_search = beams.search(model.machine(sources), len(sources), 1, BEGIN, END, LIMITS["target"])
    assert [h[0].tokens for h in by_search] == [h.tokens for h in greedy]
    np.testing.assert_allclose([h[0].logp for h in by_search], [h.logp for h in greedy], atol=1e-9)
    assert model.translate([text(s) for s in sources], beam=1) == [text(h.tokens, TARGET) for h in greedy]


@pytest.mark.parametrize("k, alpha, max_len", [(3, 1.0, None), (4, 0.0, None), (10, 1.0, 3)])
def test_beam_k_matches_a_plain_beam_search_on_the_reference(case, k, alpha, max_len):
    name, models, _ = case                     # k = 10: more beams than tokens at step 0
    model, ref = models["decisions"]
    sources = random_sources(12, seed=6)
    got = model.translate([text(s) for s in sources], beam=k, n_best=k, length_penalty=alpha, max_len=max_len)
    for source, hyps in zip(sources, got):
        want = ref.beam(source, k, max_len or LIMITS["target"], alpha)
        assert [h[0] for h in hyps] == [text(toks, TARGET) for toks, _, _ in want]
        np.testing.assert_allclose([h[1] for h in hyps], [lp / n for _, lp, n in want], atol=TOL)


def test_the_load_time_rewrites_change_plain_registers_only(case):
    """The step the machines run is the file's after `nn2run.rewrite.bind_decoder` (the
    logits above are compared through it); a per-position register keeps its instruction."""
    name, models, _ = case
    model, _ = models["values"]
    program, tensors = model.bound_decoder()
    positional = set(model.decoder["positional"])
    written = {ins[1]: ins for ins in model.decoder["code"]}
    for ins in program["code"]:
        if ins[1] in positional:
            assert ins == written[ins[1]]
        if ins[0] == "matmul1":                # its source gets a column of ones: plain only
            assert ins[2][1] not in positional
    ops = [ins[0] for ins in program["code"]]
    assert "matmul1" in ops and len(ops) < len(model.decoder["code"])
    # the bridge decoder's gates read C·hₙ, computed once by prepare: not the step's weights
    assert ("sigmoid½" in ops) == (name != "bridge")
    for ins in model.decoder["prepare"]:       # prepare's tensors are the file's, unchanged
        for a in ins[2:]:
            if a[0] == "t":
                assert np.array_equal(tensors[a[1]], model.tensors[a[1]])


def test_a_sentence_alone_equals_it_inside_a_padded_batch(case):
    name, models, _ = case
    model, ref = models["decisions"]
    batch = random_sources(9, seed=7, lo=1, hi=LIMITS["source"]) + [[3] * LIMITS["source"]]
    short = [i for i, s in enumerate(batch) if len(s) <= 8]      # alone: a smaller machine
    assert short
    targets = [[1, 2, 3]] * len(batch)
    logits, _ = model.force(batch, targets)
    texts = [text(s) for s in batch]
    for beam in (1, 3):
        together = model.translate(texts, beam=beam)
        assert together == [model.translate([t], beam=beam)[0] for t in texts]
    for i in short + [len(batch) - 1]:
        alone, _ = model.force([batch[i]], targets[:1])
        # float32 rounding only (BLAS blocks a product of 1 row and one of 10 rows differently):
        # the parity tests' 1e-5; a padded position that leaked in would move them by far more
        np.testing.assert_allclose(alone[0], logits[i], atol=1e-5, rtol=0)


def test_nn2run_translate_prints_the_reference_beam_search_in_order(case):
    name, models, folder = case
    model, ref = models["decisions"]
    sources = random_sources(60, seed=8)
    exe = Path(sys.executable).with_name("nn2run")
    run = subprocess.run([str(exe), "translate", str(folder / "decisions.nnb"), "--beam", "3", "--batch", "16"],
                         input="".join(text(s) + "\n" for s in sources), capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr == ""
    want = [text(ref.beam(s, 3, LIMITS["target"])[0][0], TARGET) for s in sources]
    assert run.stdout == "".join(w + "\n" for w in want)

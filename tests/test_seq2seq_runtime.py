"""The seq2seq runtime against a float64 NumPy reference written here: memory, attention
weights, teacher-forced logits, greedy and beam search (tests/support/seq2seq.py builds the
file by hand)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import nn2run
from nn2run import beam as beams
from support import seq2seq as s2s

H = 8
VT = len(s2s.TARGET) + 2
BEGIN, END = VT - 2, VT - 1


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path, w = s2s.build(tmp_path_factory.mktemp("s2s") / "m.nnb", hidden=H, seed=3)
    model = nn2run.load(path)
    yield model, {k: v.astype(np.float64) for k, v in w.items()}
    model.close()


def sources(n, seed=0, lo=1, hi=12):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(s2s.SOURCE), rng.integers(lo, hi + 1))) for _ in range(n)]


# ------------------------------------------------------------------ the reference (float64)
def ref_encode(w, text):
    h1, h2, out = np.zeros(H), np.zeros(H), []
    for ch in text:
        tok = s2s.SOURCE.index(ch)
        h1 = np.tanh(w["l0.W_x"][tok] + h1 @ w["l0.U"] + w["l0.b"])
        h2 = np.tanh(h1 @ w["l1.W_x"] + h2 @ w["l1.U"] + w["l1.b"])
        out.append(h2)
    return np.array(out)


def ref_init(w, mem):
    return np.tanh(mem[-1] @ w["l2.W_0"] + w["l2.b_0"])


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def ref_step(w, mem, s, tok):
    """One step of the Bahdanau GRU decoder: (logits, next s, attention weights)."""
    e = np.tanh(mem @ w["l2.U_a"] + s @ w["l2.W_a"]) @ w["l2.v_a"]
    alpha = np.exp(e - e.max())
    alpha /= alpha.sum()
    c = alpha @ mem
    gi = np.concatenate([np.eye(VT)[tok], c]) @ w["l2.W_i"] + w["l2.b_i"]
    gh = s @ w["l2.W_h"] + w["l2.b_h"]
    r = sigmoid(gi[:H] + gh[:H])
    z = sigmoid(gi[H:2 * H] + gh[H:2 * H])
    n = np.tanh(gi[2 * H:] + r * gh[2 * H:])
    s = (1 - z) * n + z * s
    return np.concatenate([s, c]) @ w["l2.W_y"] + w["l2.b_y"], s, alpha


def ref_logp(logits):
    return logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())


def ref_greedy(w, text, max_len):
    mem = ref_encode(w, text)
    s, tok, out = ref_init(w, mem), BEGIN, []
    for _ in range(max_len):
        logits, s, _ = ref_step(w, mem, s, tok)
        logits[BEGIN] = -np.inf                 # never chosen
        tok = int(np.argmax(logits))
        if tok == END:
            break
        out.append(tok)
    return "".join(s2s.TARGET[t] for t in out)


def ref_beam(w, text, k, max_len, alpha):
    """Plain beam search: each step the best k - finished candidates (ties: lower beam, then
    lower token); END finishes; ranked by logp / length ** alpha."""
    mem = ref_encode(w, text)
    live, finished = [((), 0.0, ref_init(w, mem))], []
    for _ in range(max_len):
        cands = []
        for row, (toks, lp, s) in enumerate(live):
            logits, s2, _ = ref_step(w, mem, s, toks[-1] if toks else BEGIN)
            cands += [(lp + x, row, v, s2) for v, x in enumerate(ref_logp(logits)) if v != BEGIN]
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        new = []
        for score, row, v, s2 in cands[:k - len(finished)]:
            if v == END:
                finished.append((live[row][0], score, len(live[row][0]) + 1))
            else:
                new.append((live[row][0] + (v,), score, s2))
        live = new
        if not live:
            break
    finished += [(toks, lp, len(toks)) for toks, lp, _ in live]
    return sorted(finished, key=lambda h: -h[1] / h[2] ** alpha)


# ------------------------------------------------------------------ the tests
def test_memory_and_final_match_the_reference_and_are_zero_beyond_each_length(built):
    model, w = built
    texts = sources(6, seed=1, hi=7)
    model.encode(model.encode_texts(["h" * 8] * 6))       # the same machine, longer sources first
    memory, final = model.encode(model.encode_texts(texts))
    assert memory.dtype == np.float32 and memory.shape[0] == 6 and memory.shape[2] == H
    assert memory.shape[1] >= max(map(len, texts))
    for b, text in enumerate(texts):
        ref = ref_encode(w, text)
        np.testing.assert_allclose(memory[b, :len(text)], ref, atol=1e-5)
        assert not memory[b, len(text):].any()
        np.testing.assert_allclose(final[b], ref[-1], atol=1e-5)


def test_teacher_forced_logits_and_attention_weights_match_the_reference(built):
    model, w = built
    texts = sources(5, seed=2)
    rng = np.random.default_rng(2)
    targets = [list(rng.integers(0, len(s2s.TARGET), rng.integers(0, 7))) for _ in texts]
    logits, seen = model.force(model.encode_texts(texts), targets, watch=[s2s.ALPHA])
    alphas = seen[s2s.ALPHA][..., 0]
    for b, (text, target) in enumerate(zip(texts, targets)):
        mem = ref_encode(w, text)
        s = ref_init(w, mem)
        for t, tok in enumerate([BEGIN, *target]):
            ref_logits, s, ref_alpha = ref_step(w, mem, s, tok)
            np.testing.assert_allclose(logits[b, t], ref_logits, atol=1e-5)
            np.testing.assert_allclose(alphas[b, t, :len(text)], ref_alpha, atol=1e-5)
            assert (alphas[b, t, len(text):] == 0.0).all()


def test_a_sentence_alone_equals_the_same_sentence_inside_a_padded_batch(built):
    model, _ = built
    texts = sources(7, seed=3)
    short = min(texts, key=len)
    alone = model.force(model.encode_texts([short]), [[0, 1, 2]])[0]
    batch = model.encode_texts(texts)
    together = model.force(batch, [[0, 1, 2]] * len(texts))[0]
    np.testing.assert_allclose(together[texts.index(short)], alone[0], atol=1e-6)
    assert model.translate(texts) == [model.translate([t])[0] for t in texts]
    assert model.translate(texts, beam=3) == [model.translate([t], beam=3)[0] for t in texts]


def test_greedy_matches_the_reference_on_many_inputs(built):
    model, w = built
    texts = sources(60, seed=4)
    assert model.translate(texts) == [ref_greedy(w, t, model.limits["target"]) for t in texts]


def test_beam_one_is_greedy(built):
    model, w = built
    texts = sources(20, seed=5)
    greedy = [ref_greedy(w, t, model.limits["target"]) for t in texts]
    ids = model.encode_texts(texts)
    by_search = beams.search(model.machine(ids), len(ids), 1, BEGIN, END, model.limits["target"])
    assert [model.detokenize(h[0].tokens) for h in by_search] == greedy
    assert model.translate(texts, beam=1) == greedy


@pytest.mark.parametrize("k, alpha", [(2, 1.0), (3, 0.0), (4, 0.6)])
def test_beam_k_matches_a_plain_beam_search(built, k, alpha):
    model, w = built
    texts = sources(12, seed=6 + k)
    got = model.translate(texts, beam=k, n_best=k, length_penalty=alpha)
    for text, hyps in zip(texts, got):
        ref = ref_beam(w, text, k, model.limits["target"], alpha)
        assert [h for h, _ in hyps] == ["".join(s2s.TARGET[t] for t in toks) for toks, _, _ in ref]
        np.testing.assert_allclose([sc for _, sc in hyps], [lp / n for _, lp, n in ref], atol=1e-5)


def test_max_len_caps_every_output(built):
    model, _ = built
    texts = sources(20, seed=7)
    for beam in (1, 3):
        assert all(len(t) <= 2 for t in model.translate(texts, beam=beam, max_len=2))
    assert all(len(t) <= model.limits["target"] for t in model.translate(texts, max_len=10_000))


def test_empty_text_gives_empty_translation_and_bad_input_raises_value_error(built):
    model, _ = built
    assert model.translate(["", "abc", ""])[::2] == ["", ""]
    with pytest.raises(ValueError, match=r"source 1: .*'Q'"):
        model.translate(["ab", "aQ"])
    with pytest.raises(ValueError, match="longer than the model's limit of 12"):
        model.translate(["a" * 13])
    with pytest.raises(ValueError, match="n_best"):
        model.translate(["ab"], beam=2, n_best=3)
    with pytest.raises(ValueError, match="list of texts"):
        model.translate("abc")
    # length ** 1e308 overflows a float: refused, not an OverflowError in the search
    with pytest.raises(ValueError, match="length_penalty must be a number from 0 to 10"):
        model.translate(["abc", "a"], beam=3, length_penalty=1e308)


def test_a_decoder_step_allocates_no_array_and_keeps_nothing(built):
    """NumPy's ufuncs take small transient buffers (bounded by its buffer size); a step must
    not allocate a register-sized array, nor keep anything."""
    model, _ = built
    batch, positions = 256, 12
    dec = model.machine(model.encode_texts(sources(batch, seed=8, lo=positions, hi=positions)))
    ids = np.zeros(batch, dtype=np.intp)
    parents = np.arange(batch)[::-1].copy()
    for _ in range(3):
        dec.advance(ids)
        dec.reorder(parents)
    tracemalloc.start()
    for _ in range(5):              # what Python and NumPy cache once, under tracing, is not the step's
        dec.advance(ids)
        dec.reorder(parents)
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    for _ in range(20):
        dec.advance(ids)
        dec.reorder(parents)
    now, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    register = batch * positions * H * 4
    assert now - before < 1024 and peak - before < register / 2, (now - before, peak - before, register)


def test_a_state_without_init_starts_at_zero(tmp_path):
    path, w = s2s.build(tmp_path / "zero.nnb", hidden=H, seed=9,
                        change=lambda h: h["decoder"]["states"][0].update(init=None))
    w = {k: v.astype(np.float64) for k, v in w.items()}
    with nn2run.load(path) as model:
        texts, target = sources(3, seed=9), [2, 0, 1]
        logits, _ = model.force(model.encode_texts(texts), [target] * 3)
        for b, text in enumerate(texts):
            mem, s = ref_encode(w, text), np.zeros(H)
            for t, tok in enumerate([BEGIN, *target]):
                ref_logits, s, _ = ref_step(w, mem, s, tok)
                np.testing.assert_allclose(logits[b, t], ref_logits, atol=1e-5)


# ------------------------------------------------------------------ the context as one product
def test_the_attention_context_is_bound_as_one_batched_product_only_where_exact():
    from nn2run.decoder import weighted_sums
    program = s2s.decoder_program(H, VT)
    sumj = next(pc for pc, ins in enumerate(program["code"]) if ins[0] == "sumj")
    assert weighted_sums(program) == {sumj: (s2s.ALPHA, 0)}
    # the product read by something else, or weights that are not a softmax over positions:
    # the masked sum is needed, nothing is fused
    shared = s2s.decoder_program(H, VT)
    shared["code"].append(["sum", 40, s2s.r(27)])
    other = s2s.decoder_program(H, VT)
    other["code"] = [["sigmoid", s2s.ALPHA, ins[2]] if ins[0] == "softmaxj" else ins for ins in other["code"]]
    not_memory = s2s.decoder_program(H, VT)
    not_memory["code"] = [["mul", 27, s2s.r(s2s.ALPHA), s2s.r(2)] if ins[:2] == ["mul", 27] else ins
                          for ins in not_memory["code"]]
    assert weighted_sums(shared) == weighted_sums(other) == weighted_sums(not_memory) == {}


def test_the_fused_context_equals_the_masked_sum(built, monkeypatch):
    import nn2run.decoder as decoder
    model, _ = built
    texts = sources(24, seed=11)
    fused = model.translate(texts, beam=3, n_best=3)
    model._decoders.clear()
    monkeypatch.setattr(decoder, "weighted_sums", lambda program: {})
    masked = model.translate(texts, beam=3, n_best=3)
    model._decoders.clear()
    assert [[t for t, _ in row] for row in masked] == [[t for t, _ in row] for row in fused]
    np.testing.assert_allclose([[p for _, p in row] for row in masked], [[p for _, p in row] for row in fused],
                               atol=1e-6, rtol=0)       # the same sums in another order


def test_a_per_position_activation_runs_in_place_only_when_nothing_else_reads_its_operand(built):
    from nn2run.decoder import in_place
    model, _ = built
    program = model.bound_decoder()[0]
    (tanh,) = [ins for ins in program["code"] if ins[0] == "tanh" and ins[1] in program["positional"]]
    assert in_place(program) == {tanh[1]: tanh[2][1]}
    fresh = len(program["registers"])
    reader = ["copy", fresh, ["r", tanh[2][1]]]            # a second reader of the operand
    code = program["code"][:-1] + [reader, program["code"][-1]]
    assert in_place({**program, "code": code, "positional": [*program["positional"], fresh]}) == {}


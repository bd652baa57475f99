"""Decoder kernels: the memory, the position subscripts, the bridge, and their checks."""

import pytest

from nn2c.lang.check import check
from nn2c.lang.decoder import check_decoder
from nn2c.lang.errors import KernelError
from nn2c.lang.kernels import load_kernel
from nn2c.lang.parse import parse
from nn2c.lang.shapes import shape_text

UNICODE = """memory hⱼ
eₜⱼ = v_a · tanh(W_a sₜ₋₁ + U_a hⱼ)
αₜⱼ = softmaxⱼ(eₜⱼ)
cₜ = Σⱼ(αₜⱼ ⊙ hⱼ)
sₜ = tanh(W xₜ + C cₜ + U sₜ₋₁)
s₀ = tanh(W_0 hₙ + b_0)
"""
ASCII = """memory h_j
e_tj = v_a * tanh(W_a s_{t-1} + U_a h_j)
alpha_tj = softmax_j(e_tj)
c_t = sum_j(alpha_tj * h_j)
s_t = tanh(W x_t + C c_t + U s_{t-1})
s_0 = tanh(W_0 h_n + b_0)
"""


def shapes(text):
    c = check_decoder(parse(text, "dec.eq"))
    return {k: shape_text(p.shape) for k, p in {**c.params, **c.bridge_params}.items()}


def error(text, checker=check_decoder):
    with pytest.raises(KernelError) as e:
        checker(parse(text, "dec.eq"))
    return str(e.value)


def test_unicode_and_ascii_spell_the_same_kernel():
    u, a = parse(UNICODE), parse(ASCII.replace("v_a *", "v_a ·").replace("alpha", "α"))
    assert [str(eq.target) for eq in u.equations] == ["eₜⱼ", "αₜⱼ", "cₜ", "sₜ", "s₀"]
    assert u.equations == a.equations
    assert u.memory.name == a.memory.name == "h"


def test_position_subscripts_split_only_in_a_decoder():
    lm = parse("hₜ = tanh(W_j xₜ + U hₜ₋₁ + b_n + W_0 hₜ₋₁)")
    names = {v.name for v in __import__("nn2c.lang.ast", fromlist=["x"]).variables(lm.equations)}
    assert {"W_j", "b_n", "W_0"} <= names
    check(lm)                                   # a language model kernel as before


def test_shapes_inferred():
    s = shapes(UNICODE)
    assert s["v_a"] == "1×H" and s["W_a"] == "H×H" and s["U_a"] == "H×H"
    assert s["W"] == "H×X" and s["C"] == "H×H" and s["W_0"] == "H×H" and s["b_0"] == "H"
    assert s["W_y"] == "V×H"


def test_samples_check():
    for name in ("bahdanau", "luong", "bridge"):
        c = check_decoder(load_kernel(f"samples/kernels/seq2seq/{name}.eq"))
        assert c.memory == "hⱼ" and c.final == "hₙ"
    c = check_decoder(load_kernel("samples/kernels/seq2seq/luong.eq"))
    assert c.states == ("m", "h", "h̃") and c.output == "h̃" and c.positional == {"e", "α"}
    assert shape_text(c.params["W_c"].shape) == "H×2H"


def test_per_position_value_must_be_reduced_before_a_state():
    msg = error(UNICODE.replace("C cₜ", "C αₜⱼ"))
    assert msg.startswith("dec.eq:5:")
    assert "αₜⱼ is per position: reduce it over the positions (Σⱼ(…)) before it reaches the state sₜ" in msg
    assert msg.splitlines()[2].strip().startswith("^")


def test_per_position_value_must_be_reduced_before_the_logits():
    msg = error(UNICODE + "yₜ = W_y αₜⱼ\n")
    assert "before it reaches the logits" in msg and "dec.eq:7:" in msg


def test_subscript_must_say_per_position():
    assert "eₜ is per position (it reads hⱼ): write eₜⱼ" in error(
        UNICODE.replace("eₜⱼ = ", "eₜ = ").replace("softmaxⱼ(eₜⱼ)", "softmaxⱼ(eₜ)"))
    assert "cₜⱼ is marked per position" in error(UNICODE.replace("cₜ = ", "cₜⱼ = "))


def test_softmax_and_sum_need_positional_operands():
    assert "softmaxⱼ(…) normalizes over the positions j, but sₜ₋₁ is not per position" in error(
        UNICODE.replace("softmaxⱼ(eₜⱼ)", "softmaxⱼ(sₜ₋₁)").replace("αₜⱼ = ", "αₜ = ")
        .replace("Σⱼ(αₜⱼ ⊙ hⱼ)", "Σⱼ(αₜ ⊙ hⱼ)"))
    assert "Σⱼ(…) sums over the positions j, but cₜ₋₁" not in error(UNICODE.replace("Σⱼ(αₜⱼ ⊙ hⱼ)", "Σⱼ(sₜ₋₁)"))
    assert "Σⱼ(…) sums over the positions j, but sₜ₋₁ is not per position" in error(
        UNICODE.replace("Σⱼ(αₜⱼ ⊙ hⱼ)", "Σⱼ(sₜ₋₁)"))


def test_bridge_reads_only_final_and_parameters():
    assert "the bridge s₀ may read only hₙ, numbers and parameters, not hⱼ" in error(
        UNICODE.replace("W_0 hₙ", "W_0 hⱼ"))
    assert "not sₜ₋₁" in error(UNICODE.replace("W_0 hₙ", "W_0 sₜ₋₁"))
    assert "q₀ sets the initial value of a state, but no qₜ₋₁ is read" in error(UNICODE + "q₀ = hₙ\n")


def test_widths_agree():
    msg = error(UNICODE.replace("cₜ = Σⱼ(αₜⱼ ⊙ hⱼ)", "cₜ = Σⱼ(αₜⱼ ⊙ hⱼ) + [xₜ; sₜ₋₁]"))
    assert "shapes do not agree" in msg


def test_a_score_has_one_column():
    assert "is a score, one number per position" in error(
        UNICODE.replace("softmaxⱼ(eₜⱼ)", "softmaxⱼ(hⱼ)"))


def test_language_model_checker_refuses_a_decoder():
    assert "it is a seq2seq decoder" in error(UNICODE, check)
    assert "declares no memory" in error("hₜ = tanh(W xₜ + U hₜ₋₁ + C gⱼ)", check)


def test_memory_cannot_be_assigned():
    assert "cannot assign to hⱼ" in error(UNICODE + "hⱼ = hₙ\n")


def test_previous_step_per_position_is_refused_where_written():
    with pytest.raises(KernelError) as e:
        parse(UNICODE.replace("softmaxⱼ(eₜⱼ)", "softmaxⱼ(eₜ₋₁ⱼ)"), "dec.eq")
    text = str(e.value)
    assert text.startswith("dec.eq:3:16: 'eₜ₋₁ⱼ': a value per position is this step's")
    assert text.splitlines()[2] == " " * 19 + "^" * 5


def test_memory_declared_twice():
    with pytest.raises(KernelError, match=r"dec.eq:2:8: memory declared twice \(first at 1:8\)"):
        parse("memory hⱼ\n" + UNICODE, "dec.eq")


def test_bridge_and_step_parameters_are_apart():
    msg = error(UNICODE.replace("W_0 hₙ", "W_a hₙ"))
    assert "W_a is a parameter of the step" in msg and "the bridge needs its own" in msg


def test_a_decoder_that_never_reads_the_memory_is_reported_at_its_declaration():
    text = error("memory hⱼ\nsₜ = tanh(W xₜ + U sₜ₋₁)\n")
    assert text.startswith("dec.eq:1:8: no equation reads the memory hⱼ or its last value hₙ")
    # reading only the last position (a bridge) is reading the input
    check_decoder(parse("memory hⱼ\nsₜ = tanh(W xₜ + U sₜ₋₁)\ns₀ = tanh(W_0 hₙ)\n", "dec.eq"))

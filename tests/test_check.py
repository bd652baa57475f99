"""nn2c.lang.check: names, order, output, readout and shapes of kernels; every error's position."""

import pytest

from nn2c.compiler.report import describe_kernel
from nn2c.lang.check import check
from nn2c.lang.errors import KernelError
from nn2c.lang.kernels import load_kernel, sample_names
from nn2c.lang.parse import parse
from nn2c.lang.shapes import Dim, H, V, X, shape_text
from support.messages import assert_points_at

HX = H + X


def checked(source: str):
    return check(parse(source, "k.eq"))


def check_error(source: str) -> str:
    with pytest.raises(KernelError) as info:
        checked(source)
    return str(info.value)


def shapes(params) -> dict[str, str]:
    return {name: shape_text(p.shape) for name, p in params.items()}


EXPECTED_PARAMS = {
    "lstm": {f"{m}_{g}": s for g in "fioc" for m, s in (("W", "H×X"), ("U", "H×H"), ("b", "H"))},
    "gru": {f"{m}_{g}": s for g in "zrh" for m, s in (("W", "H×X"), ("U", "H×H"), ("b", "H"))},
    "rnn": {"W_h": "H×X", "U_h": "H×H", "b_h": "H"},
    "torchgru": {f"{m}_{s}{g}": shape for g in "rzn"
                 for m, s, shape in (("W", "i", "H×X"), ("b", "i", "H"), ("W", "h", "H×H"),
                                     ("b", "h", "H"))},
    "mgu": {"W_f": "H×(H+X)", "b_f": "H", "W_h": "H×(H+X)", "b_h": "H"},
}
EXPECTED_STATES = {"lstm": ("c", "h"), "gru": ("h",), "rnn": ("h",), "torchgru": ("h",),
                   "mgu": ("h",)}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_sample_kernel_checks_with_the_expected_parameters(name):
    kernel = check(load_kernel(name))
    assert shapes(kernel.params) == EXPECTED_PARAMS[name]
    assert (kernel.input, kernel.output, kernel.states) == ("x", "h", EXPECTED_STATES[name])


@pytest.mark.parametrize("name", sample_names())
def test_every_sample_gets_the_default_readout(name):
    kernel = check(load_kernel(name))
    assert shapes(kernel.readout_params) == {"W_y": "V×H", "b_y": "V"}
    assert str(kernel.readout.target) == "yₜ" and kernel.sizes["y"] == V


def test_lstm_sizes_and_order():
    kernel = check(load_kernel("lstm"))
    assert [eq.target.name for eq in kernel.order] == ["f", "i", "o", "c̃", "c", "h"]
    assert {n: str(d) for n, d in kernel.sizes.items()} == {
        "x": "X", "f": "H", "i": "H", "o": "H", "c̃": "H", "c": "H", "h": "H", "y": "V"}


def test_equations_are_sorted_by_dependency_whatever_their_order():
    lines = load_kernel("lstm").source.splitlines()
    shuffled = "\n".join(reversed([ln for ln in lines if "=" in ln and "where" not in ln]))
    kernel = checked(shuffled + "\nwhere σ_g = σ, σ_c = tanh, σ_h = tanh\n")
    order = [eq.target.name for eq in kernel.order]
    assert order.index("h") > order.index("c") > max(order.index(g) for g in ("f", "i", "c̃"))
    assert shapes(kernel.params) == EXPECTED_PARAMS["lstm"]


def test_ties_keep_source_order():
    kernel = checked("bₜ = tanh(W xₜ)\naₜ = tanh(U xₜ)\n"
                     "hₜ = aₜ ⊙ bₜ + V hₜ₋₁\n")
    assert [eq.target.name for eq in kernel.order] == ["b", "a", "h"]


def test_a_kernel_may_write_its_own_readout():
    kernel = checked("hₜ = tanh(W xₜ + U hₜ₋₁)\nyₜ = W_o hₜ + b_o\n")
    assert shapes(kernel.readout_params) == {"W_o": "V×H", "b_o": "V"}
    assert "W_o" not in kernel.params and [e.target.name for e in kernel.order] == ["h"]


def test_concatenation_sizes_add_up():
    kernel = checked("hₜ = tanh(W·[hₜ₋₁; xₜ] + b)\n")
    assert shapes(kernel.params) == {"W": "H×(H+X)", "b": "H"}


def test_numbers_broadcast_as_scalars():
    kernel = checked("hₜ = 0.5 ⊙ (1 − tanh(W xₜ)) + hₜ₋₁\n")
    assert shapes(kernel.params) == {"W": "H×X"}


def test_declarations_pick_input_and_output():
    kernel = checked("input uₜ\noutput sₜ\n"
                     "sₜ = tanh(W uₜ + U sₜ₋₁)\nmₜ = sₜ ⊙ mₜ₋₁\n")
    assert (kernel.input, kernel.output, kernel.states) == ("u", "s", ("s", "m"))


def test_the_only_state_is_the_output_when_there_is_no_h():
    assert checked("sₜ = tanh(W xₜ + U sₜ₋₁)\n").output == "s"


def test_a_step_value_without_time_index_is_allowed():
    kernel = checked("a = W xₜ\nhₜ = tanh(a + U hₜ₋₁)\n")
    assert kernel.sizes["a"] == H


@pytest.mark.parametrize("dim, text, value", [
    (H, "H", 32), (X, "X", 8), (V, "V", 100), (H + X, "H+X", 40), (H + H, "2H", 64)])
def test_dim_prints_and_evaluates(dim, text, value):
    assert str(dim) == text and dim.value(H=32, X=8, V=100) == value


@pytest.mark.parametrize("shape, text", [((H, X), "H×X"), ((H, H + X), "H×(H+X)"),
                                         ((H + H, V), "2H×V"), ((H,), "H"), ((None, X), "?×X")])
def test_a_sum_in_a_shape_is_parenthesised(shape, text):
    assert shape_text(shape) == text


def test_nn2c_check_output_counts_in_the_singular_and_parenthesises_sums():
    out = describe_kernel("mgu", 8, 5)
    assert "W_f      H×(H+X)  8×13" in out and "3 equations, OK" in out
    one = describe_kernel("rnn", 8, 5).splitlines()
    assert one[0].endswith(": 1 equation, OK")
    assert any(ln.startswith("program (optimized, 1 layer): ") for ln in one), one


def test_dim_terms_are_sorted():
    assert (X + H).terms == (("H", 1), ("X", 1)) and X + H == HX and Dim(()).terms == ()


# --- errors, each with its position --------------------------------------------------------

def test_undefined_state_is_reported_at_its_use():
    text = check_error("hₜ = tanh(W xₜ + U cₜ₋₁)\n")
    assert "undefined name: cₜ₋₁ is state, but no equation defines cₜ" in text
    assert_points_at(text, 1, 20, "cₜ₋₁", width=4)


def test_undefined_name_next_to_a_declared_input():
    text = check_error("input xₜ\nhₜ = tanh(W xₜ + U zₜ)\n")
    assert "undefined name: zₜ (the input is xₜ)" in text
    assert_points_at(text, 2, 20, "zₜ", width=2)


def test_two_undefined_names_without_a_declaration():
    text = check_error("hₜ = tanh(W xₜ + U uₜ + V hₜ₋₁)\n")
    assert "xₜ, uₜ are all undefined" in text and "`input xₜ`" in text
    assert_points_at(text, 1, 20, "uₜ")


def test_a_name_defined_twice_is_reported_at_the_second():
    text = check_error("hₜ = tanh(W xₜ)\nc̃ₜ = xₜ\nc̃ₜ = hₜ\n")
    assert "c̃ₜ is defined twice (first at 2:1)" in text
    assert_points_at(text, 3, 1, "c̃ₜ", width=2)


def test_a_cycle_within_one_step_names_its_members():
    text = check_error("hₜ = tanh(W xₜ + U hₜ₋₁)\naₜ = W_a bₜ\nbₜ = W_b aₜ\n")
    assert "cycle: aₜ → bₜ → aₜ" in text
    assert_points_at(text, 2, 1, "aₜ", width=2)


def test_shapes_that_cannot_agree_show_both_sides():
    text = check_error("hₜ = tanh(U hₜ₋₁ + b) + xₜ\n")
    assert "shapes do not agree: tanh(U·hₜ₋₁ + b) has H but xₜ has X" in text
    assert_points_at(text, 1, 23, "+ xₜ", width=1)


def test_a_product_whose_rows_follow_the_target_disagrees_with_the_input():
    text = check_error("hₜ = σ(W_f·hₜ₋₁ + xₜ)\n")
    assert "shapes do not agree: W_f·hₜ₋₁ has H but xₜ has X" in text


def test_matrix_columns_must_match_the_vector():
    text = check_error("hₜ = tanh(W xₜ + U hₜ₋₁)\naₜ = W hₜ\n")
    assert "shapes do not agree: W has X columns but hₜ has H" in text
    assert_points_at(text, 2, 8, "hₜ")


def test_a_shape_that_cannot_be_inferred_is_reported_at_first_use():
    text = check_error("aₜ = W xₜ\nhₜ = tanh(U hₜ₋₁)\n")
    assert "cannot infer the shape of W: it is ?×X" in text
    assert_points_at(text, 1, 6, "W", width=1)


def test_matmul_needs_a_parameter_on_the_left():
    text = check_error("rₜ = σ(W xₜ)\nhₜ = tanh(rₜ·hₜ₋₁)\n")
    assert "left operand of a matrix product must be a parameter" in text and "not rₜ" in text
    assert_points_at(text, 2, 11, "rₜ", width=2)


def test_a_matrix_cannot_be_assigned_by_an_equation():
    text = check_error("W = tanh(xₜ)\nhₜ = W·hₜ₋₁\n")
    assert "must be a parameter (a weight matrix), not W (W is defined at 1:1)" in text
    assert_points_at(text, 2, 6, "W", width=1)


def test_a_parameter_cannot_be_both_matrix_and_vector():
    text = check_error("hₜ = tanh(W xₜ + W)\n")
    assert "W is used as a matrix at 1:11 and as a vector here" in text
    assert_points_at(text, 1, 18, "W)")


def test_assigning_to_a_previous_value_is_an_error():
    text = check_error("hₜ₋₁ = W xₜ\n")
    assert "cannot assign to hₜ₋₁" in text
    assert_points_at(text, 1, 1, "hₜ₋₁", width=4)


def test_declared_input_cannot_be_defined():
    text = check_error("input hₜ\nhₜ = W xₜ\n")
    assert "hₜ is declared as the input but defined at 2:1" in text


def test_readout_may_only_use_the_output():
    text = check_error("hₜ = tanh(W xₜ + U hₜ₋₁)\nyₜ = W_y xₜ\n")
    assert "the readout may use only hₜ" in text
    assert_points_at(text, 2, 10, "xₜ")


def test_output_must_be_inferable():
    text = check_error("aₜ = tanh(W xₜ + U aₜ₋₁)\nbₜ = tanh(V bₜ₋₁ + aₜ)\n")
    assert "cannot infer the output; add `output hₜ`" in text


def test_a_state_name_without_time_index_is_an_error():
    text = check_error("hₜ = tanh(W xₜ + U hₜ₋₁ + x)\n")
    assert "x is used without a time index; write xₜ or xₜ₋₁" in text
    assert_points_at(text, 1, 27, "x)", width=1)


@pytest.mark.parametrize("text, name", [("hₜ = tanh(W xₜ + U cₜ₋₁)\ncₜ = b\noutput hₜ\n", "cₜ"),
                                        ("aₜ = tanh(W xₜ + U aₜ₋₁)\noₜ = b_o\noutput oₜ\n", "oₜ")])
def test_an_output_or_state_made_of_parameters_alone_is_an_error(text, name):
    text = check_error(text)
    assert f"{name} depends on neither the input nor a previous state" in text


# --- typos a new user makes, each reported where it is -----------------------------------

CELL = "hₜ = tanh(W xₜ + U {} + b)\n"


@pytest.mark.parametrize("written, col, width", [
    ("h_{t-}", 21, 5), ("h_{t_1}", 21, 6), ("h_t_1", 21, 4), ("h_{t1}", 21, 5),
    ("h_tm1", 21, 4), ("h_T", 21, 2), ("h_{T-1}", 21, 6), ("hₜ₁", 21, 2), ("h₋₁", 21, 2),
    ("h_{t–1}", 21, 6)])
def test_a_broken_time_index_on_a_value_is_reported_at_its_subscript(written, col, width):
    text = check_error(CELL.format(written))
    assert f"{written} is not a time index; the previous step's value is hₜ₋₁ or h_{{t-1}}, " \
           "this step's hₜ or h_t" in text
    assert_points_at(text, 1, col, written, width=width, skip=1)


def test_a_capital_t_and_a_dash_are_named():
    assert "lowercase t" in check_error(CELL.format("h_T"))
    assert "'–', U+2013, is a dash, not a minus sign" in check_error(CELL.format("h_{t–1}"))


def test_a_unicode_time_index_missing_its_one_is_reported():
    text = check_error(CELL.format("hₜ₋1"))
    assert "hₜ₋ is not a time index" in text
    assert_points_at(text, 1, 21, "ₜ₋", width=2)


@pytest.mark.parametrize("written", ["h'", "h′", "h''"])
def test_a_primed_state_name_is_reported_at_it(written):
    text = check_error(CELL.format(written))
    assert f"{written} would be a parameter, not the value h; the previous step's value is " \
           "hₜ₋₁ or h_{t-1}" in text
    assert_points_at(text, 1, 20, written, width=len(written))


def test_a_broken_time_index_on_the_input_explains_the_missing_input():
    text = check_error("hₜ = tanh(W x_T + U hₜ₋₁ + b)\n")
    assert "cannot infer the input: x_T is not a time index; the input is written xₜ or x_t" in text
    assert_points_at(text, 1, 14, "_T", width=2)


def test_a_kernel_without_any_time_index_says_how_one_is_written():
    text = check_error("h = tanh(W x + U h + b)\n")
    assert "no name has a time index: write this step's values as hₜ (or h_t), the previous " \
           "step's as hₜ₋₁ (or h_{t-1}) and the input as xₜ (or x_t)" in text
    assert_points_at(text, 1, 1, "h", width=1)


def test_an_input_without_its_index_is_reported_at_it():
    text = check_error("hₜ = tanh(W x + U hₜ₋₁ + b)\n")
    assert "cannot infer the input: no undefined name has a time index; if x is the input, " \
           "write xₜ (or x_t)" in text
    assert_points_at(text, 1, 13, "x ", width=1)


@pytest.mark.parametrize("written, tail", [("h_t-1", " (h_t-1 reads as h_t − 1)"), ("hₜ", ""),
                                           ("h", "")])
def test_a_value_that_uses_itself_is_reported_at_the_use(written, tail):
    text = check_error(CELL.format(written))
    assert "hₜ uses itself within the step; the previous step's value is hₜ₋₁ or h_{t-1}, " \
           f"this step's hₜ or h_t{tail}" in text
    assert_points_at(text, 1, 20, f"U {written}", width=len(written.removesuffix("-1")), skip=2)


@pytest.mark.parametrize("source, name, col", [("hₜ = tanh W xₜ + U hₜ₋₁\n", "tanh", 6),
                                               ("hₜ = σ_h W xₜ\nwhere σ_h = tanh\n", "σ_h", 6),
                                               ("hₜ = tanh(W xₜ) + σ hₜ₋₁\n", "σ", 19)])
def test_a_function_without_parentheses_is_reported_at_its_name(source, name, col):
    text = check_error(source)
    assert f"{name} is a function: write {name}(…), with its argument in parentheses" in text
    assert_points_at(text, 1, col, name, width=len(name))


@pytest.mark.parametrize("glued, product", [("Wxₜ", "W xₜ"), ("W_xₜ", "W_x xₜ"),
                                             ("Wx_t", "W xₜ")])
def test_a_name_glued_to_the_input_reads_as_a_product_hint(glued, product):
    text = check_error(f"hₜ = tanh({glued} + U hₜ₋₁ + b)\n")
    assert f"{glued} is read as one name, the input; for a product write {product}" in text
    assert_points_at(text, 1, 11, glued, width=len(glued))


def test_a_missing_operator_between_products_is_reported_where_it_is_missing():
    text = check_error("hₜ = tanh(W xₜ U hₜ₋₁ + b)\n")
    assert "an operator (+ − ⊙) is missing between xₜ and U" in text
    assert_points_at(text, 1, 16, "U", width=1)


def test_an_unsized_parameter_with_a_broken_time_index_is_reported_before_its_matrix():
    text = check_error("hₜ = tanh(W xₜ + U hₜ₋₁ + V z_{t-})\n")
    assert "z_{t-} is not a time index" in text
    assert_points_at(text, 1, 30, "_{t-}", width=5)


@pytest.mark.parametrize("source", [
    "hₜ = tanh(W_T xₜ + U_T hₜ₋₁ + b_T)\n",                 # T for "transform", not time
    "hₜ = tanh(W xₜ + U hₜ₋₁ + b′)\n",                       # a primed parameter
    "h′ₜ = tanh(W xₜ + U h′ₜ₋₁)\nhₜ = h′ₜ\n",                 # a primed step value
    "hₜ = tanh(W₁ xₜ + U₁ hₜ₋₁ + b_1)\n",
    "aₜ = tanh(W_t1 xₜ)\nhₜ = aₜ ⊙ hₜ₋₁\n",                   # a subscript starting with t
])
def test_names_like_typos_that_are_valid_still_check(source):
    assert checked(source).input == "x"


@pytest.mark.parametrize("source, col, spelled", [
    ("hₜ = softmaxⱼ(W xₜ + U hₜ₋₁)\n", 6, "softmaxⱼ"),
    ("hₜ = tanh(W xₜ + softmax_j(U hₜ₋₁))\n", 18, "softmax_j"),
    ("hₜ = tanh(Σⱼ(W xₜ) + U hₜ₋₁)\n", 11, "Σⱼ"),
    ("hₜ = tanh(W xₜ + sum_j(U hₜ₋₁))\n", 18, "sum_j"),
    ("hₜ = f(W xₜ + U hₜ₋₁)\nwhere f = Σⱼ\n", 6, "f")])
def test_a_reduction_over_positions_in_a_cell_without_memory_is_reported_at_it(source, col, spelled):
    text = check_error(source)
    assert f"{spelled}(…) runs over the positions j of a decoder's memory" in text
    assert_points_at(text, 1, col, spelled, width=len(spelled))


def test_a_declared_input_that_no_equation_reads_is_reported_at_the_declaration():
    text = check_error("input xₜ\nhₜ = tanh(U hₜ₋₁ + b)\n")
    assert "the input xₜ is declared, but no equation reads it" in text
    assert_points_at(text, 1, 7, "xₜ", width=2)

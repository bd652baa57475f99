"""nn2c.lang.parse (and nn2c.lang.errors, nn2c.lang.kernels): notations, precedence, aliases, errors."""

import pytest

from nn2c.lang.ast import BinOp, Call, Concat, Neg, Num, Var
from nn2c.lang.errors import KernelError
from nn2c.lang.kernels import load_kernel, sample_names
from nn2c.lang.parse import parse
from support.messages import assert_points_at


def rhs(text: str):
    """The expression of a one-equation kernel `zₜ = text`."""
    return parse(f"zₜ = {text}\n").equations[0].expr


def v(name, time=None):
    return Var(name, time, None)


def op(kind, left, right):
    return BinOp(kind, left, right, None)


def syntax_error(source: str) -> str:
    with pytest.raises(KernelError) as info:
        parse(source, "k.eq")
    return str(info.value)


@pytest.mark.parametrize("ascii_form, unicode_form", [
    ("x_t", "xₜ"),
    ("x_{t}", "xₜ"),
    ("h_{t-1}", "hₜ₋₁"),
    ("h_{t−1}", "hₜ₋₁"),
    ("h_{t - 1}", "hₜ₋₁"),
    ("W x", "W·x"),
    ("W@x", "W·x"),
    ("W⋅x", "W·x"),
    ("W_f xₜ", "W_f·xₜ"),
    ("a ∘ b", "a ⊙ b"),
    ("a * b", "a ⊙ b"),
    ("a - b", "a − b"),
    ("-a", "−a"),
    ("h'", "h′"),
    ("h\u0302", "ĥ"),
    ("W_{hf} x", "W_hf x"),
    ("sigmoid(x)", "σ(x)"),
    ("[a, b]", "[a; b]"),
    ("((a))", "a"),
    ("σ(a +\n      b)", "σ(a + b)"),
    ("1e-3 ⊙ a", "0.001 ⊙ a"),
])
def test_ascii_notation_parses_like_its_unicode_twin(ascii_form, unicode_form):
    assert rhs(ascii_form) == rhs(unicode_form)


@pytest.mark.parametrize("written, name, time", [
    ("xₜ", "x", 0), ("hₜ₋₁", "h", -1), ("x_t", "x", 0), ("x_{t-1}", "x", -1),
    ("W_f", "W_f", None), ("W_{hf}", "W_hf", None), ("σ_g", "σ_g", None),
    ("c̃ₜ", "c̃", 0), ("b_t", "b", 0), ("Wx", "Wx", None), ("h′ₜ", "h′", 0),
    ("tanh", "tanh", None), ("W₁", "W₁", None),
])
def test_a_trailing_time_index_is_split_off_the_name(written, name, time):
    assert rhs(written) == Var(name, time, None)


@pytest.mark.parametrize("text, tree", [
    ("a + b ⊙ c", op("add", v("a"), op("mul", v("b"), v("c")))),
    ("a ⊙ W x", op("mul", v("a"), op("matmul", v("W"), v("x")))),
    ("a − b − c", op("sub", op("sub", v("a"), v("b")), v("c"))),
    ("a ⊙ b ⊙ c", op("mul", op("mul", v("a"), v("b")), v("c"))),
    ("W x + b", op("add", op("matmul", v("W"), v("x")), v("b"))),
    ("−W x", Neg(op("matmul", v("W"), v("x")), None)),
    ("a ⊙ −b", op("mul", v("a"), Neg(v("b"), None))),
    ("U (r ⊙ h)", op("matmul", v("U"), op("mul", v("r"), v("h")))),
    ("1 − z", op("sub", Num(1.0, None), v("z"))),
    ("2 x", op("mul", Num(2.0, None), v("x"))),
    ("W·[h; x]", op("matmul", v("W"), Concat((v("h"), v("x")), None))),
])
def test_precedence_and_associativity(text, tree):
    assert rhs(text) == tree


@pytest.mark.parametrize("text, value", [("1", 1.0), ("0.5", 0.5), ("1e-3", 0.001), (".5", 0.5)])
def test_numbers_are_scalar_constants(text, value):
    assert rhs(text) == Num(value, None)


def test_a_name_directly_before_a_parenthesis_is_a_call_and_with_a_space_a_product():
    assert rhs("tanh(x)") == Call("tanh", v("x"), None)
    assert rhs("W (x)") == op("matmul", v("W"), v("x"))


@pytest.mark.parametrize("where_first", [True, False])
def test_where_aliases_resolve_wherever_the_clause_is(where_first):
    eq, where = "hₜ = σ_h(cₜ)", "where σ_h = tanh, σ_g = σ"
    kernel = parse(f"{where}\n{eq}\n" if where_first else f"{eq}\n{where}\n")
    call = kernel.equations[0].expr
    assert (call.func, call.spelled) == ("tanh", "σ_h")
    assert kernel.aliases == {"σ_h": "tanh", "σ_g": "sigmoid"}


def test_a_where_clause_may_end_an_equation_line():
    assert parse("hₜ = φ(xₜ) where φ = tanh\n").equations[0].expr.func == "tanh"


def test_an_alias_may_name_another_alias():
    assert parse("hₜ = g(xₜ)\nwhere g = f, f = relu\n").aliases == {"g": "relu", "f": "relu"}


def test_comments_and_blank_lines_are_ignored():
    plain = parse("aₜ = xₜ\nhₜ = aₜ\n")
    noisy = parse("# a kernel\n\naₜ = xₜ   # first\n\n  # between\nhₜ = aₜ\n# end")
    assert noisy.equations == plain.equations


def test_input_and_output_declarations_are_recorded():
    kernel = parse("input uₜ\noutput sₜ\nsₜ = uₜ\n")
    assert (kernel.declared_input, kernel.declared_output) == (v("u", 0), v("s", 0))


def test_positions_are_line_and_character_column():
    target = parse("\n  c̃ₜ = xₜ\n").equations[0].target
    assert (target.pos.line, target.pos.column, target.pos.end_column) == (2, 3, 6)


def test_syntax_error_names_what_was_expected_with_a_caret():
    text = syntax_error("aₜ = xₜ\nhₜ =\n")
    assert "unexpected end of line; expected one of: a name, a number" in text
    assert_points_at(text, 2, 5, "")


@pytest.mark.parametrize("op", ["+", "⊙", "·"])
def test_a_line_ending_in_an_operator_says_how_to_continue_an_equation(op):
    text = syntax_error(f"aₜ = xₜ\nhₜ = W xₜ {op}\n")
    assert f"unexpected end of line after '{op}'" in text and "inside brackets" in text
    assert_points_at(text, 2, 12, "")


def test_unexpected_token_is_shown_in_quotes():
    text = syntax_error("hₜ = xₜ = yₜ\n")
    assert "unexpected '='" in text
    assert_points_at(text, 1, 9, "= yₜ", width=1)


def test_unexpected_character_after_a_combining_mark_lines_up():
    text = syntax_error("c̃ₜ = $x\n")
    assert "unexpected character '$'" in text
    assert_points_at(text, 1, 7, "$")


def test_unclosed_bracket_names_where_it_was_opened():
    text = syntax_error("aₜ = xₜ\nhₜ = σ(W xₜ\ncₜ = hₜ\n")
    assert "unclosed '(' opened at 2:7" in text
    assert_points_at(text, 2, 12, "")


def test_unmatched_closing_bracket_is_reported_at_it():
    text = syntax_error("hₜ = σ(xₜ))\n")
    assert "unmatched ')'" in text
    assert_points_at(text, 1, 11, ")\n", width=1)


def test_mismatched_brackets_name_both():
    text = syntax_error("hₜ = [aₜ; xₜ)\n")
    assert "')' does not match '[' opened at 1:6" in text


def test_unknown_function_suggests_a_product():
    text = syntax_error("hₜ = tanh(W(xₜ))\n")
    assert "unknown function 'W'" in text and "W·(…)" in text
    assert_points_at(text, 1, 11, "W(", width=1)


def test_unknown_alias_target_is_reported_at_it():
    text = syntax_error("hₜ = g(xₜ)\nwhere g = blah\n")
    assert "unknown function 'blah'" in text
    assert_points_at(text, 2, 11, "blah", width=4)


def test_unsupported_time_index_is_reported():
    assert "only ₜ and ₜ₋₁" in syntax_error("hₜ = h_{t-2}\n")


def test_the_grammar_is_loaded_once():
    from nn2c.lang import parse as module
    parse("hₜ = xₜ\n")
    first = module._parser()
    parse("hₜ = xₜ\n")
    assert module._parser() is first and module.grammar_path().name == "kernel.lark"


def test_error_without_position_is_one_line():
    assert str(KernelError("no such file", "k.eq")) == "k.eq: no such file"


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn", "torchgru", "mgu"])
def test_samples_are_bundled_and_load_by_name(name):
    assert name in sample_names()
    assert load_kernel(name).equations


def test_load_kernel_reads_a_path(tmp_path):
    path = tmp_path / "cell.eq"
    path.write_text("hₜ = tanh(W xₜ + U hₜ₋₁)\n", encoding="utf-8")
    assert load_kernel(str(path)).filename == str(path)


def test_load_kernel_reports_a_missing_file():
    with pytest.raises(KernelError, match="no such kernel file"):
        load_kernel("/nonexistent/cell.eq")


def test_load_kernel_reports_non_utf8(tmp_path):
    path = tmp_path / "bad.eq"
    path.write_bytes(b"h = \xff\n")
    with pytest.raises(KernelError, match="not UTF-8"):
        load_kernel(str(path))


def test_unknown_sample_lists_the_samples():
    with pytest.raises(KernelError, match="samples: .*lstm"):
        load_kernel("nosuchcell")


# --- typos a new user makes, each reported where it is -----------------------------------

@pytest.mark.parametrize("source, col, under, name", [
    ("hₜ = tanh(W xₜ + U h_{t-1 + b)\n", 21, "_{t-1", "h"),
    ("hₜ = tanh(W_f x_{t + U hₜ₋₁)\n", 16, "_{t +", "x"),
])
def test_an_unclosed_subscript_brace_is_reported_at_the_subscript(source, col, under, name):
    text = syntax_error(source)
    assert "unclosed '{' of a subscript" in text and f"{name}ₜ₋₁ or {name}_{{t-1}}" in text
    assert_points_at(text, 1, col, under, width=2)


def test_an_unmatched_closing_brace_is_reported_at_it():
    text = syntax_error("hₜ = tanh(W xₜ + U h_{t-1}} + b)\n")
    assert "unmatched '}'" in text
    assert_points_at(text, 1, 27, "} +", width=1)


@pytest.mark.parametrize("written, col", [("h(t-1)", 20), ("h(t)", 20), ("h[t-1]", 20),
                                          ("h[t − 1]", 20)])
def test_a_time_index_written_as_an_argument_or_index_is_reported(written, col):
    text = syntax_error(f"hₜ = tanh(W xₜ + U {written} + b)\n")
    assert "is not a time index" in text and "hₜ₋₁ or h_{t-1}" in text
    assert_points_at(text, 1, col, written, width=len(written))


@pytest.mark.parametrize("source, col, char", [
    ("hₜ = tanh(W xₜ + U hₜ-₁)\n", 23, "₁"),       # an ASCII minus between subscripts
    ("hₜ = tanh(W xₜ + U hₜ_₁)\n", 22, "_"),
    ("hₜ = tanh(W xₜ + U h_(t-1))\n", 21, "_"),
])
def test_a_stray_subscript_character_shows_how_a_time_index_is_written(source, col, char):
    text = syntax_error(source)
    assert f"unexpected character '{char}'" in text and "h_{t-1}" in text
    assert_points_at(text, 1, col, char, width=1)


@pytest.mark.parametrize("char", ["×", ".", "∙", "•", "⊗"])
def test_a_product_sign_the_language_lacks_shows_the_product_operators(char):
    text = syntax_error(f"hₜ = tanh(W {char} xₜ)\n")
    assert f"unexpected character '{char}' (a matrix product is written W·x, W@x or W x, " \
           "an element-wise one a ⊙ b or a * b)" in text
    assert_points_at(text, 1, 13, char, width=1)


@pytest.mark.parametrize("char, code", [("–", "U+2013"), ("—", "U+2014")])
def test_a_dash_for_a_minus_is_named(char, code):
    text = syntax_error(f"hₜ = (1 {char} zₜ) ⊙ xₜ\n")
    assert f"unexpected character '{char}' ({code}, a dash; a minus sign is - or −)" in text
    assert_points_at(text, 1, 9, char, width=1)


@pytest.mark.parametrize("source, col", [("hₜ ← tanh(xₜ)\n", 4), ("hₜ := tanh(xₜ)\n", 4),
                                         ("hₜ = σ_g(xₜ)\nwhere σ_g: σ\n", 10)])
def test_an_assignment_written_otherwise_says_it_is_an_equals_sign(source, col):
    text = syntax_error(source)
    assert "(an equation or an alias is written with '=')" in text
    assert f":{col}: " in text.splitlines()[0]


def test_a_textbook_function_name_without_its_where_clause_says_how_to_add_it():
    text = syntax_error("hₜ = σ_g(W xₜ)\n")
    assert "unknown function 'σ_g'; add `where σ_g = σ` if it is σ" in text
    assert_points_at(text, 1, 6, "σ_g", width=3)


@pytest.mark.parametrize("spelled, meant", [("sigma", "sigmoid"), ("Tanh", "tanh"),
                                            ("tahn", "tanh"), ("Relu", "relu")])
def test_a_misspelled_function_suggests_the_known_one(spelled, meant):
    text = syntax_error(f"hₜ = {spelled}(W xₜ)\n")
    assert f"unknown function '{spelled}'; did you mean '{meant}'?" in text
    assert_points_at(text, 1, 6, spelled, width=len(spelled))


def test_a_byte_order_mark_at_the_start_is_skipped(tmp_path):
    path = tmp_path / "cell.eq"
    path.write_text("hₜ = tanh(W xₜ + U hₜ₋₁)\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    kernel = load_kernel(str(path))
    assert kernel.equations == parse("hₜ = tanh(W xₜ + U hₜ₋₁)\n").equations
    assert kernel.equations[0].target.pos.column == 1


def test_a_byte_order_mark_keeps_error_columns():
    text = syntax_error("\ufeffhₜ = tanh(W xₜ $)\n")
    assert_points_at(text, 1, 16, "$", width=1)


@pytest.mark.parametrize("char, named", [("\u200b", "U+200B (zero width space)"),
                                         ("\ufeff", "U+FEFF (zero width no-break space)"),
                                         ("\u2009", "U+2009 (thin space)")])
def test_an_invisible_character_is_named_by_its_code_point(char, named):
    text = syntax_error(f"hₜ = tanh(W xₜ +{char} U hₜ₋₁)\n")
    assert f"unexpected character {named};" in text
    assert_points_at(text, 1, 17, char, width=1)


# --- how deep an expression may nest -------------------------------------------------

def _sum(terms: int) -> str:
    """A kernel whose right-hand side is a sum of `terms` terms: terms − 1 levels deep."""
    return "hₜ = hₜ₋₁" + " + b" * (terms - 2) + " + W xₜ\n"


def test_a_sum_at_the_nesting_limit_compiles_and_one_term_more_is_refused():
    from nn2c.compiler.pipeline import compile_kernel
    from nn2c.lang.parse import MAX_NESTING
    compiled = compile_kernel(parse(_sum(MAX_NESTING + 1), "k.eq"), 4, 2, 3)
    assert compiled.program["code"]
    text = syntax_error(_sum(MAX_NESTING + 2))
    assert f"expression nested more than {MAX_NESTING} levels deep" in text
    assert "split it into several equations" in text
    assert_points_at(text, 1, 6, "hₜ₋₁")


@pytest.mark.parametrize("source, col", [
    ("hₜ = tanh(" + "(" * 1000 + "W xₜ" + ")" * 1000 + " + hₜ₋₁)\n", 109),
    ("hₜ = " + "tanh(" * 1000 + "W xₜ + hₜ₋₁" + ")" * 1000 + "\n", 506),
    ("hₜ = " + "−" * 1000 + "tanh(W xₜ + hₜ₋₁)\n", 106),
    ("hₜ = tanh(W xₜ + hₜ₋₁ + " + "[" * 1000 + "b" + "]" * 1000 + ")\n", 123),
    (_sum(20000), 6)], ids=["brackets", "calls", "minus signs", "concatenations", "sum"])
def test_an_expression_nested_too_deep_is_one_error_where_it_gets_too_deep(source, col):
    text = syntax_error(source)
    assert text.startswith(f"k.eq:1:{col}: expression nested more than 100 levels deep"), text[:120]


def test_nn2c_check_of_a_huge_sum_is_one_error_without_a_traceback(tmp_path):
    import subprocess

    from support.models import BIN
    (tmp_path / "k.eq").write_text(_sum(20000), encoding="utf-8")
    r = subprocess.run([str(BIN / "nn2c"), "check", "k.eq"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 3 and lines[0].startswith("k.eq:1:6: expression nested"), r.stderr[-500:]


def test_an_alias_may_not_rebind_a_built_in_function():
    text = syntax_error("hₜ = tanh(W xₜ + U hₜ₋₁)\nwhere tanh = σ\n")
    assert "tanh is a built-in function (tanh); an alias names a new one" in text
    assert_points_at(text, 2, 7, "tanh", width=4)
    # binding a built-in spelling to the function it already names changes nothing
    assert parse("hₜ = σ(W xₜ)\nwhere σ = sigmoid\n").equations == parse("hₜ = σ(W xₜ)\n").equations


@pytest.mark.parametrize("source, line, col", [
    ("hₜ = f(W xₜ)\nwhere f = tanh, f = σ\n", 2, 17),
    ("where f = tanh\nhₜ = f(W xₜ)\nwhere f = σ\n", 3, 7)])
def test_an_alias_bound_to_two_functions_is_reported_at_the_second(source, line, col):
    text = syntax_error(source)
    assert "f is bound twice: to tanh at " in text and "to σ here" in text
    assert text.startswith(f"k.eq:{line}:{col}: ")


def test_an_alias_bound_twice_to_one_function_is_that_function():
    kernel = parse("hₜ = f(W xₜ)\nwhere f = tanh, f = tanh\n")
    assert kernel.equations[0].expr.func == "tanh"


def test_the_known_functions_of_a_cell_kernel_leave_out_the_decoders_reductions():
    cell = syntax_error("hₜ = foo(W xₜ)\n")
    assert "known functions: sigmoid, σ, tanh" in cell and "Σⱼ" not in cell and "softmax_j" not in cell
    decoder = syntax_error("memory hⱼ\nsₜ = foo(W xₜ)\n")
    assert "Σⱼ" in decoder and "softmax_j" in decoder


def test_a_kernel_path_that_is_a_fifo_or_a_directory_is_refused_without_reading(tmp_path):
    import os
    import subprocess

    from support.models import BIN
    os.mkfifo(tmp_path / "pipe.eq")
    (tmp_path / "dir.eq").mkdir()
    for name in ("pipe.eq", "dir.eq"):
        r = subprocess.run([str(BIN / "nn2c"), "check", name], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr == f"nn2c: {name}: not a regular file; a kernel is a UTF-8 text file\n"


def test_a_kernel_of_more_than_max_terms_is_refused_at_the_equation_that_passes_it():
    from nn2c.lang.parse import MAX_TERMS
    # 8 terms, then 6 a line (⊙, hₜ₋₁, tanh, U hₜ₋₁, U, hₜ₋₁): the last line passes the limit
    lines = ["hₜ = tanh(W xₜ + U hₜ₋₁)\n"] + [f"g{i}ₜ = hₜ₋₁ ⊙ tanh(U hₜ₋₁)\n" for i in range(MAX_TERMS // 6)]
    text = syntax_error("".join(lines))
    assert f"the kernel is too large: more than {MAX_TERMS} names, numbers and operations" in text
    assert text.startswith(f"k.eq:{MAX_TERMS // 6 + 1}:1: ")
    parse("".join(lines[:-2]), "k.eq")        # below the limit it parses


def test_a_kernel_file_of_more_than_a_quarter_megabyte_is_refused_before_parsing(tmp_path):
    from nn2c.lang.parse import MAX_SOURCE_CHARS
    path = tmp_path / "big.eq"
    path.write_text("hₜ = tanh(W xₜ + U hₜ₋₁)\n" * (MAX_SOURCE_CHARS // 20), encoding="utf-8")
    with pytest.raises(KernelError) as info:
        load_kernel(str(path))
    assert str(info.value).startswith(f"{path}: the kernel is too large: ")

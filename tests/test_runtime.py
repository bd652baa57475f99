"""The runtime's public Python API: load, parameters by name, step, batching, sampling."""

from __future__ import annotations

import numpy as np
import pytest

import nn2run
from nn2run.generate import generate
from nn2run.sample import Sampler, SamplerConfig
from support.models import build_model


@pytest.fixture
def lstm(tmp_path):
    return build_model(tmp_path / "m.nnb", "lstm", 12, 2, 7, seed=1)


def test_load_exposes_vocab_layers_hidden(lstm):
    path, _, _ = lstm
    m = nn2run.load(path)
    assert (m.layers, m.hidden, len(m.vocab)) == (2, 12, 7)
    assert m.vocab[0] == "a"


def test_param_returns_each_kernel_parameter_as_the_equations_shape_it(lstm):
    """The optimizer stacks W_f, W_i, W_o, W_c into one tensor; param() still finds each."""
    path, _, logical = lstm
    m = nn2run.load(path)
    assert m.param("W_f", layer=0).shape == (12, 7)
    assert m.param("U_o", layer=1).shape == (12, 12)
    for key, value in logical.items():
        name, _, layer = key.partition("@")
        np.testing.assert_array_equal(m.param(name, int(layer or 0)), value)
    assert set(m.param_names()) == set(logical)
    assert len(m.tensors) < len(logical)          # really stacked


def test_param_unknown_name_raises_key_error(lstm):
    m = nn2run.load(lstm[0])
    with pytest.raises(KeyError, match="W_zz"):
        m.param("W_zz")


def test_step_is_functional_and_state_is_not_aliased(lstm):
    m = nn2run.load(lstm[0])
    s0 = m.initial_state(batch=4)
    ids = np.array([0, 1, 2, 3])
    a, s1 = m.step(ids, s0)
    b, s2 = m.step(ids, s0)           # stepping the same state twice gives the same result
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 7) and a.dtype == np.float32
    assert np.all(s0.arrays[0] == 0)
    c, _ = m.step(ids, s1)
    assert not np.allclose(a, c)
    assert s1["h", 1].shape == (4, 12)


def test_batch_rows_are_independent(lstm):
    m = nn2run.load(lstm[0])
    seq = [3, 1, 4, 1, 5]
    single, s = None, m.initial_state(1)
    for t in seq:
        single, s = m.step(np.array([t]), s)
    many, s = None, m.initial_state(3)
    for t in seq:
        many, s = m.step(np.array([0, t, 6]), s)
    np.testing.assert_allclose(many[1], single[0], atol=1e-6)


BAD_IDS = [([99], "token id 99 is outside"), ([-1], "token id -1 is outside"), ([7], "token id 7 is outside"),
           ([1.5], "token ids must be integers: 1.5 is not"), ([10**12], f"token id {10**12} is outside"),
           ([10**30], f"token id {10**30} is outside"), (np.array([1.0]), "token ids must be integers: 1.0 is not"),
           ([True], "token ids must be integers: True is not")]


@pytest.mark.parametrize("ids, message", BAD_IDS)
def test_step_names_the_bad_token_id(lstm, ids, message):
    m = nn2run.load(lstm[0])
    with pytest.raises(ValueError, match=message):
        m.step(ids, m.initial_state(1))


@pytest.mark.parametrize("ids, message", BAD_IDS)
def test_generate_validates_token_ids_as_step_does(lstm, ids, message):
    m = nn2run.load(lstm[0])
    with pytest.raises(ValueError, match=f"prime 1: {message}"):
        list(generate(m, [[0, 1], list(ids)], 3, Sampler(SamplerConfig(), 0)))


@pytest.mark.parametrize("primes", [[], [[]], "ab", [[[0]]]])
def test_generate_refuses_primes_that_are_not_lists_of_ids(lstm, primes):
    m = nn2run.load(lstm[0])
    with pytest.raises(ValueError, match="prime"):
        list(generate(m, primes, 3, Sampler(SamplerConfig(), 0)))


def test_a_closed_model_says_it_is_closed(lstm):
    m = nn2run.load(lstm[0])
    state = m.initial_state(1)
    m.close()
    for call in (lambda: m.step([0], state), lambda: m.initial_state(1), lambda: m.param("W_f"),
                 lambda: list(generate(m, [[0]], 2, Sampler(SamplerConfig(), 0)))):
        with pytest.raises(nn2run.ClosedModelError, match="closed"):
            call()


def test_a_state_from_another_model_is_named_as_such(lstm, tmp_path):
    other = nn2run.load(build_model(tmp_path / "gru.nnb", "gru", 5, 1, 7)[0])
    m = nn2run.load(lstm[0])
    with pytest.raises(ValueError, match="state is not this model's: it holds h@0"):
        m.step([0], other.initial_state(1))
    wide = nn2run.load(build_model(tmp_path / "wide.nnb", "lstm", 13, 2, 7)[0])
    with pytest.raises(ValueError, match="state is not this model's: c@0 is"):
        m.step([0], wide.initial_state(1))


@pytest.mark.parametrize("state", [None, "s", [np.zeros((1, 12))]])
def test_step_without_a_state_says_a_state_is_needed(lstm, state):
    m = nn2run.load(lstm[0])
    with pytest.raises(ValueError, match="state must be a State"):
        m.step([0], state)


@pytest.mark.parametrize("batch", [-1, 0, 1.5, "2"])
def test_initial_state_needs_a_positive_integer_batch(lstm, batch):
    m = nn2run.load(lstm[0])
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        m.initial_state(batch=batch)


def test_float_ids_of_the_right_shape_are_named_not_a_shape_problem(lstm):
    m = nn2run.load(lstm[0])
    with pytest.raises(ValueError, match="must be integers") as e:
        m.step(np.array([0.0, 1.0]), m.initial_state(2))
    assert "shape" not in str(e.value)
    with pytest.raises(ValueError, match=r"shape \(2,\), got \(3,\)"):
        m.step([0, 1, 2], m.initial_state(2))


def test_generate_and_sample_resolve_after_import_nn2run():
    import subprocess
    import sys
    code = "import nn2run; nn2run.generate.generate; nn2run.sample.Sampler; nn2run.sample.SamplerConfig"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_generate_same_seed_same_text_and_streams_continue_their_own_prime(lstm):
    m = nn2run.load(lstm[0])
    run = lambda seed: [ids.copy() for _, ids in generate(m, [[1, 2], [3]], 30, Sampler(SamplerConfig(), seed))]  # noqa
    assert np.array_equal(np.stack(run(5)), np.stack(run(5)))
    assert not np.array_equal(np.stack(run(5)), np.stack(run(6)))


def test_greedy_and_top_k_1_pick_the_argmax():
    logits = np.array([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]], np.float32)
    assert list(Sampler(SamplerConfig(greedy=True))(logits)) == [1, 0]
    assert list(Sampler(SamplerConfig(top_k=1), seed=0)(logits)) == [1, 0]


@pytest.mark.parametrize("rows", [1, 3])
def test_a_draw_that_rounds_up_to_the_total_still_takes_a_kept_token(rows):
    # u = draw · total rounds to the total in float32 for a draw within 2⁻²⁵ of 1; counting
    # cdf ≤ u would then count the masked tokens after the last kept one
    logits = np.tile(np.array([[4.0, 1.0, 0.5, 0.2, 0.1]], np.float32), (rows, 1))
    for config in (SamplerConfig(top_k=1), SamplerConfig(top_k=2), SamplerConfig(top_p=0.5)):
        got = Sampler(config).draw(logits, [lambda: 1 - 2.0 ** -26] * rows)
        assert list(got) == [0 if config.top_k != 2 else 1] * rows, config


@pytest.mark.parametrize("rows", [1, 3])
def test_a_temperature_whose_inverse_is_past_float32_takes_the_most_likely_token(rows):
    logits = np.random.default_rng(2).normal(0, 2, (rows, 9)).astype(np.float32)
    for t in (1e-39, 1e-44):
        s = Sampler(SamplerConfig(temperature=t), seed=0)
        assert list(s(logits)) == list(logits.argmax(axis=1))
        assert list(s.draw(logits, [s.rng.random] * rows)) == list(logits.argmax(axis=1))
    # just above the limit the arithmetic is finite and gives the same token
    assert list(Sampler(SamplerConfig(temperature=1e-37), seed=0)(logits)) == list(logits.argmax(axis=1))


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([[0.6, 0.3, 0.1]], np.float64))
    s = Sampler(SamplerConfig(top_p=0.5), seed=0)
    assert {int(s(logits)[0]) for _ in range(200)} == {0}
    s = Sampler(SamplerConfig(top_p=0.85), seed=0)
    assert {int(s(logits)[0]) for _ in range(400)} == {0, 1}



@pytest.mark.parametrize("rows", [1, 3])
def test_a_top_p_below_float32s_least_takes_the_most_likely_token(rows):
    # 1e-300 is 0 once compared with float32 probabilities: the nucleus must still hold one
    logits = np.random.default_rng(4).normal(0, 2, (rows, 9)).astype(np.float32)
    for top_p in (1e-300, 1e-46, 1e-30):
        s = Sampler(SamplerConfig(top_p=top_p), seed=0)
        assert [list(s(logits)) for _ in range(20)] == [list(logits.argmax(axis=1))] * 20, top_p


def test_temperature_sampling_matches_the_softmax_distribution():
    p = np.array([0.5, 0.3, 0.2])
    s = Sampler(SamplerConfig(temperature=1.0), seed=0)
    draws = np.array([int(s(np.log(p)[None])[0]) for _ in range(20000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / len(draws), p, atol=0.015)


def test_tensors_are_memory_mapped_read_only_views(lstm):
    m = nn2run.load(lstm[0])
    t = next(iter(m.tensors.values()))
    assert not t.flags.writeable
    assert not t.flags.owndata


@pytest.mark.parametrize("sampling, word", [({"temperature": "hot"}, "positive number"),
                                            ({"temperature": -1}, "positive number"),
                                            ({"temperature": 0.5, "top_k": 3}, "only"), ([1.0], "only")])
def test_bad_sampling_defaults_are_a_format_error(tmp_path, sampling, word):
    from nn2run.format import read, write
    path, _, _ = build_model(tmp_path / "m.nnb", "rnn", 4, 1, 5)
    nnb = read(str(path))
    header = {k: v for k, v in nnb.header.items() if k != "tensors"}
    tensors = {k: np.array(v) for k, v in nnb.tensors.items()}
    nnb.close()
    write(str(path), {**header, "sampling": sampling}, tensors)
    with pytest.raises(nn2run.NNBFormatError, match=word):
        nn2run.load(str(path))


def test_the_files_temperature_is_the_default(tmp_path):
    path, _, _ = build_model(tmp_path / "m.nnb", "rnn", 4, 1, 5)
    assert nn2run.load(str(path)).sampling == {"temperature": 1.0}


def test_a_sampler_takes_a_numpy_integer_seed_and_refuses_other_seeds():
    logits = np.random.default_rng(3).standard_normal((1, 30)).astype(np.float32)

    def draws(seed):
        sampler = Sampler(SamplerConfig(), seed)
        return [int(sampler(logits)[0]) for _ in range(20)]
    assert draws(np.int64(5)) == draws(5) != draws(6)
    for bad in (-1, 5.0, "5"):         # random.Random would take abs(-1), 5.0 and "5" as seeds
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            Sampler(SamplerConfig(), bad)


def test_a_model_without_states_steps_from_its_initial_state(tmp_path):
    """A feed-forward kernel (no ₜ₋₁) has an empty state; step still knows its batch."""
    kernel = tmp_path / "ff.eq"
    kernel.write_text("hₜ = tanh(W xₜ + b)\n", encoding="utf-8")
    path, _, p = build_model(tmp_path / "ff.nnb", str(kernel), 6, 1, 5, seed=3)
    ids = np.array([4, 0, 2])
    with nn2run.load(path) as m:
        state = m.initial_state(3)
        assert state.batch == 3 and state.arrays == []
        for _ in range(2):
            logits, state = m.step(ids, state)
            assert state.batch == 3
    f64 = {k: v.astype(np.float64) for k, v in p.items()}
    h = np.tanh(np.eye(5)[ids] @ f64["W@0"].T + f64["b@0"])
    np.testing.assert_allclose(logits, h @ f64["W_y"].T + f64["b_y"], atol=1e-6)

"""The float32 sampler against a float64 reference, and the quick paths of Model.step."""

from __future__ import annotations

import random

import numpy as np
import pytest

import nn2run
from nn2run.sample import Sampler, SamplerConfig
from support.models import build_model


def _sample64(logits, cfg: SamplerConfig, rng):
    """The sampler's arithmetic in float64: softmax at the temperature, top-k, top-p, one
    uniform draw scaled by the last cumulative value."""
    z = logits.astype(np.float64) / cfg.temperature
    z -= z.max(axis=1, keepdims=True)
    if cfg.top_k is not None:
        kth = np.sort(z, axis=1)[:, -cfg.top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    if cfg.top_p is not None:
        out = np.zeros_like(p)
        for i, row in enumerate(p):
            order = np.argsort(-row, kind="stable")
            mass_before = np.cumsum(row[order]) - row[order]
            keep = order[mass_before < cfg.top_p]
            out[i, keep] = row[keep]
        p = out
    cdf = np.cumsum(p, axis=1)
    u = np.array([[rng.random()] for _ in range(p.shape[0])]) * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=1), p.shape[1] - 1)


@pytest.mark.parametrize("cfg", [SamplerConfig(), SamplerConfig(temperature=0.7), SamplerConfig(top_k=5),
                                 SamplerConfig(top_p=0.8), SamplerConfig(temperature=1.3, top_k=20, top_p=0.9)])
@pytest.mark.parametrize("rows", [50, 1])          # one stream takes a path of its own
def test_float32_sampler_draws_what_the_float64_arithmetic_draws(cfg, rows):
    logits = (np.random.default_rng(1).standard_normal((400, 65)) * 3).astype(np.float32)
    before = logits.copy()
    sampler, rng = Sampler(cfg, seed=11), random.Random(11)      # the sampler's draws: the stdlib's
    got = np.concatenate([sampler(logits[i:i + rows]) for i in range(0, 400, rows)])
    want = np.concatenate([_sample64(logits[i:i + rows], cfg, rng) for i in range(0, 400, rows)])
    # a float32 cumulative sum can move a boundary by an ulp: a draw that lands within it differs
    assert (got != want).sum() <= 1
    np.testing.assert_array_equal(logits, before)        # the logits are read, never written


def test_sampler_follows_the_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.2, 1e-9]], np.float32)).repeat(20000, axis=0)
    freq = np.bincount(Sampler(SamplerConfig(), seed=0)(logits), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2, 0.0], atol=0.015)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _, _ = build_model(tmp_path_factory.mktemp("step") / "m.nnb", "lstm", 6, 2, 7, seed=3)
    with nn2run.load(path) as m:
        yield m


@pytest.mark.parametrize("bad", [np.array([0, 7]), np.array([-1, 2]), np.array([0, 2**40])])
def test_step_refuses_an_intp_array_with_an_id_outside_the_vocabulary(model, bad):
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        model.step(bad.astype(np.intp), model.initial_state(2))


def test_step_refuses_a_state_of_another_batch_or_kind(model):
    with pytest.raises(ValueError, match="state is not this model's"):
        model.step(np.array([1, 2]), model.initial_state(3).__class__(
            model.state_names, [np.zeros((2, 5), np.float32)] * 4))
    s = model.initial_state(2)
    s.arrays[0] = s.arrays[0].tolist()
    with pytest.raises(ValueError, match="state is not this model's"):
        model.step(np.array([1, 2]), s)


def test_step_agrees_with_the_vm_loop_and_returns_states_it_does_not_reuse(model):
    ids = np.random.default_rng(4).integers(0, 7, (6, 2))
    vm = model.vm(2)
    vm.reset()
    state, kept = model.initial_state(2), []
    for row in ids:
        logits, state = model.step(row, state)
        kept.append((logits, [a.copy() for a in state.arrays], state))
    vm.reset()
    for row, (logits, arrays, st) in zip(ids, kept):
        np.testing.assert_array_equal(vm.advance(row), logits)
        for a, b in zip(st.arrays, arrays):        # later steps left earlier results alone
            np.testing.assert_array_equal(a, b)


def _vm_states(model, ids):
    """The state after each step of the VM's own loop, copied."""
    vm = model.vm(ids.shape[1])
    vm.reset()
    out = []
    for row in ids:
        logits = vm.advance(row).copy()
        out.append((logits, [a.copy() for a in vm.state_arrays()]))
    vm.reset()
    return out


def test_states_kept_unread_keep_their_values_while_later_steps_run(model):
    ids = np.random.default_rng(5).integers(0, 7, (8, 2))
    want = _vm_states(model, ids)
    state, kept = model.initial_state(2), []
    for row in ids:
        _, state = model.step(row, state)
        kept.append(state)                         # held, not read, while the loop goes on
    assert kept[-1]._vm is model.vm(2)             # the last one is the VM's buffers: no copy was made
    for st, (_, arrays) in zip(kept, want):
        for a, b in zip(st.arrays, arrays):
            np.testing.assert_array_equal(a, b)


def test_a_state_stepped_twice_or_around_generate_gives_the_same_result(model):
    from nn2run.generate import generate
    ids = np.random.default_rng(6).integers(0, 7, (3, 2))
    want = _vm_states(model, ids)
    _, s1 = model.step(ids[0], model.initial_state(2))
    l2, s2 = model.step(ids[1], s1)
    h = s2["h", 1]                                 # an array read out of a state stays as it was
    list(generate(model, [[1, 2], [3]], 4, Sampler(SamplerConfig(), seed=0)))    # the same VM
    l2b, s2b = model.step(ids[1], s1)              # s1 again: a branch
    l3, s3 = model.step(ids[2], s2)
    np.testing.assert_array_equal(l2, want[1][0])
    np.testing.assert_array_equal(l2b, want[1][0])
    np.testing.assert_array_equal(l3, want[2][0])
    np.testing.assert_array_equal(h, want[1][1][model.state_names.index(("h", 1))])
    for st, k in ((s1, 0), (s2, 1), (s2b, 1), (s3, 2)):
        for a, b in zip(st.arrays, want[k][1]):
            np.testing.assert_array_equal(a, b)


def test_a_copied_or_pickled_state_owns_its_values(model):
    import copy
    import pickle
    ids = np.random.default_rng(7).integers(0, 7, (3, 2))
    want = _vm_states(model, ids)
    _, s1 = model.step(ids[0], model.initial_state(2))
    twins = [copy.copy(s1), copy.deepcopy(s1), pickle.loads(pickle.dumps(s1))]
    _, s2 = model.step(ids[1], s1)
    model.step(ids[2], s2)
    for twin in twins:
        for a, b in zip(twin.arrays, want[0][1]):
            np.testing.assert_array_equal(a, b)

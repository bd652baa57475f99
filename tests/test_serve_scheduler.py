"""The scheduler without HTTP: per-row sampling and rows that join and leave between steps."""

from __future__ import annotations

import time

import numpy as np
import pytest

from nn2run.sample import Sampler, SamplerConfig
from nn2run.scheduler import MAX_SAMPLERS, Request, Row, Samplers, Scheduler, sample_rows
from support.models import build_model

CONFIGS = [(1.0, None, None), (0.5, 3, None), (1.3, None, 0.8), (0.9, 4, 0.6), (0.0, None, None), (2.0, 1, None)]


def _request(prime, n, temperature=1.0, top_k=None, top_p=None, seed=0, stops=(), deadline=1e18):
    return Request([prime], n, temperature, top_k, top_p, seed, list(stops), deadline, [str])


def test_each_row_draws_what_the_sampler_draws_with_its_own_settings_and_seed():
    logits = np.random.default_rng(0).normal(0, 3, (len(CONFIGS), 40)).astype(np.float32)
    for trial in range(20):
        rows = [Row(_request([0], 1, t, k, p, seed=100 * trial + i), 0) for i, (t, k, p) in enumerate(CONFIGS)]
        got = sample_rows(logits, rows)
        for i, (t, k, p) in enumerate(CONFIGS):
            ref = Sampler(SamplerConfig(temperature=t or 1.0, top_k=k, top_p=p, greedy=t == 0), 100 * trial + i)
            assert got[i] == ref(logits[i:i + 1])[0], (trial, CONFIGS[i])


def test_rows_that_share_a_setting_draw_alike_in_groups_of_any_size():
    # one sampler per setting serves every step, all sharing scratch arrays made for the
    # most rows yet (views of them for fewer): groups of 5, 2, 7, 1 and 6 rows of one setting
    # beside another's
    logits = np.random.default_rng(1).normal(0, 3, (7, 30)).astype(np.float32)
    samplers = Samplers()
    for trial, n in enumerate((5, 2, 7, 1, 6)):
        settings = [(0.8, 5, None)] * n + [(1.0, None, 0.9)] * (7 - n)
        rows = [Row(_request([0], 1, t, k, p, seed=10 * trial + i), 0) for i, (t, k, p) in enumerate(settings)]
        got = sample_rows(logits, rows, samplers)
        for i, (t, k, p) in enumerate(settings):
            assert got[i] == Sampler(SamplerConfig(temperature=t, top_k=k, top_p=p), 10 * trial + i)(logits[i:i + 1])[0]
    assert len(samplers) == 2


def test_the_samplers_kept_between_steps_are_bounded():
    logits = np.zeros((1, 5), np.float32)
    samplers = Samplers()
    for k in range(3 * MAX_SAMPLERS):
        sample_rows(logits, [Row(_request([0], 1, 0.5 + k / 1000), 0)], samplers)
        assert len(samplers) <= MAX_SAMPLERS + 1


def test_stop_text_is_held_back_until_it_cannot_start_a_stop_string():
    row = Row(Request([[0]], 10, 1.0, None, None, 0, ["abc"], 1e18, [list("xab c").__getitem__]), 0)
    sent = []
    for tok in (0, 1, 2):           # "x", "a", "b": "ab" could begin "abc"
        assert row.take(tok) is None
        sent.append(row.releasable())
    assert "".join(sent) == "x" and row.held == "ab"
    assert row.take(3) is None and row.releasable() == "ab "


def test_a_token_holding_two_stop_strings_ends_before_the_first_of_them():
    # a codec's token can be a word: "to.," holds both stops; the text ends at the earlier
    for stops in ([",", "."], [".", ","]):
        row = Row(Request([[0]], 10, 1.0, None, None, 0, stops, 1e18, [["go ", "to.,"].__getitem__]), 0)
        assert row.take(0) is None and row.releasable() == "go "
        assert row.take(1) == "stop" and row.held == "to"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import nn2run
    d = tmp_path_factory.mktemp("sched")
    _, _, logical = build_model(d / "draft.nnb", "lstm", 12, 1, 6)
    # large weights: the next token depends strongly on the state, so a row given another
    # row's state (or a stale one) writes other text
    path, _, _ = build_model(d / "m.nnb", "lstm", 12, 1, 6, logical={k: 6 * v for k, v in logical.items()})
    return nn2run.load(path)


def _text(req):
    return "".join(ev[1] for ev in _drained(req))


def _until_idle(sched, seconds: float = 10) -> None:
    end = time.monotonic() + seconds
    while not sched.idle() and time.monotonic() < end:
        time.sleep(0.005)


def test_rows_joining_at_different_steps_get_the_text_they_get_alone(model):
    # rows leave in the middle of the batch while others go on, and new ones take their places
    jobs = [([1, 2, 3], 7, 90), ([4], 8, 10), ([5, 5, 5, 5, 5], 9, 120), ([0, 1], 10, 30), ([2], 11, 60),
            ([3, 3], 12, 20)]
    sched = Scheduler(model, max_batch=4, max_queue=10).start()
    try:
        alone = []
        for prime, seed, n in jobs:
            req = _request(prime, n, seed=seed)
            req.decoders = [model.codec.decoder()]
            sched.submit(req)
            _until_idle(sched, 30)
            alone.append(_text(req))
        reqs = []
        for prime, seed, n in jobs:         # more rows than the batch holds: some wait, all share steps
            req = _request(prime, n, seed=seed)
            req.decoders = [model.codec.decoder()]
            reqs.append(req)
            sched.submit(req)
        _until_idle(sched, 30)
        assert [_text(r) for r in reqs] == alone
        assert [len(t) for t in alone] == [n for _, _, n in jobs]
    finally:
        sched.stop()


def test_a_failing_step_ends_its_requests_and_the_scheduler_goes_on(model, monkeypatch):

    import nn2run.scheduler as scheduler
    sched = Scheduler(model, max_batch=4).start()
    try:
        real = scheduler.sample_rows
        monkeypatch.setattr(scheduler, "sample_rows", lambda *a: 1 / 0)
        req = _request([1], 10)
        req.decoders = [model.codec.decoder()]
        sched.submit(req)
        assert req.events.get(timeout=10) == ("failed",)
        monkeypatch.setattr(scheduler, "sample_rows", real)
        ok = _request([1], 10)
        ok.decoders = [model.codec.decoder()]
        sched.submit(ok)
        _until_idle(sched)
        assert len(_text(ok)) == 10
    finally:
        sched.stop()


def test_the_transport_is_woken_for_the_first_token_and_for_each_choice_that_ends(model):
    sched = Scheduler(model, max_batch=4).start()
    try:
        woken = []
        # two choices, their prompts one and two tokens long: the first samples a step earlier
        # and ends a step earlier; each wake comes after that step's events
        req = Request([[1], [2, 3]], 12, 1.0, None, None, 5, [], 1e18, [model.codec.decoder()] * 2)
        req.wake = lambda: woken.append([ev[0::2] for ev in _drained(req)])
        sched.submit(req)
        _until_idle(sched)
        assert woken == [[(0, None)], [(0, None), (1, None)] * 10 + [(0, "length"), (1, None)], [(1, "length")]]
    finally:
        sched.stop()


def test_a_transport_whose_wake_fails_does_not_fail_the_step(model):
    sched = Scheduler(model, max_batch=4).start()
    try:
        gone = _request([1], 6, seed=3)
        gone.decoders = [model.codec.decoder()]

        def closed():
            raise RuntimeError("Event loop is closed")
        gone.wake = closed
        other = _request([2], 6, seed=4)
        other.decoders = [model.codec.decoder()]
        sched.submit(gone)
        sched.submit(other)
        _until_idle(sched)
        for req in (gone, other):
            events = _drained(req)
            assert events[-1][2] == "length" and len("".join(ev[1] for ev in events)) == 6
    finally:
        sched.stop()


def _drained(req) -> list:
    out = []
    while not req.events.empty():
        out.append(req.events.get())
    return out

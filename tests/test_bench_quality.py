"""bench/quality.py: its peer's held-out loss is nn2run's on the same weights, and the race
runs end to end (a few seconds per arm)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from nn2run import load
from nn2run.score import stream_loss
from support.models import ROOT, build_model

SCRIPT = ROOT / "bench" / "quality.py"


def _quality():
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _put_weights(peer, logical: dict, layers: int) -> None:
    """nn2's LSTM parameters into nn.LSTM (gates i, f, g, o; one bias) and the Linear readout."""
    cat = lambda keys, layer: torch.from_numpy(np.concatenate([logical[f"{k}@{layer}"] for k in keys]))  # noqa: E731
    with torch.no_grad():
        for layer in range(layers):
            getattr(peer.lstm, f"weight_ih_l{layer}").copy_(cat(["W_i", "W_f", "W_c", "W_o"], layer))
            getattr(peer.lstm, f"weight_hh_l{layer}").copy_(cat(["U_i", "U_f", "U_c", "U_o"], layer))
            getattr(peer.lstm, f"bias_ih_l{layer}").copy_(cat(["b_i", "b_f", "b_c", "b_o"], layer))
            getattr(peer.lstm, f"bias_hh_l{layer}").zero_()
        peer.lin.weight.copy_(torch.from_numpy(logical["W_y"]))
        peer.lin.bias.copy_(torch.from_numpy(logical["b_y"]))


def test_the_peers_held_out_loss_is_stream_loss_on_the_same_weights(tmp_path):
    vocab, hidden, layers = 12, 16, 2
    path, _, logical = build_model(str(tmp_path / "m.nnb"), "lstm", hidden, layers, vocab, seed=3)
    peer = _quality().Peer(vocab, hidden, layers, lr=2e-3, clip=5.0, seed=0, bf16=False)
    ids = np.random.default_rng(1).integers(0, vocab, 2503)
    want = stream_loss(load(path), ids, streams=5)
    assert abs(peer.stream_loss(ids, streams=5) - want) > 1e-3       # torch's own initial weights differ
    _put_weights(peer, logical, layers)
    got = peer.stream_loss(ids, streams=5, chunk=37)        # pieces that do not divide the stream
    assert abs(got - want) < 1e-5 * want


def test_a_missing_corpus_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--corpus", str(tmp_path / "none.txt")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "none.txt: no such file" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_the_race_runs_end_to_end_on_the_same_data(tmp_path, shakespeare):
    out = tmp_path / "quality.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--corpus", str(shakespeare), "--minutes", "0.03",
                        "--hidden", "16", "--eval-every", "10", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    arms = json.loads(out.read_text())["arms"]
    assert set(arms) == {"nn2", "torch"}
    assert arms["nn2"]["digest"] == arms["torch"]["digest"]
    for arm in arms.values():
        assert arm["steps"] >= 1 and arm["best_step"] <= arm["steps"]
        assert arm["history"][-1][0] == arm["steps"]            # validated at the last step, as nn2 does
        assert 0 < arm["held_out"] < math.log(65)             # learned something in the seconds it had
    assert "held-out nats/char, float32" in r.stdout and "nn2 ≤ peer" in r.stdout and "val loss at step" in r.stdout

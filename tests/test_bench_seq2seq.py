"""The seq2seq bench's torch peer against a float64 NumPy loop written here, and its CLI."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.seq2seq import peer_batch, peer_class  # noqa: E402
from nn2run.codec import CharCodec  # noqa: E402

VS, VT, H = 7, 6, 5           # target ids 0..3, BEGIN 4, END 5
BEGIN, END = 4, 5


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def gru(x, h, w_ih, w_hh, b_ih, b_hh):
    """torch's GRU equations, gates r|z|n."""
    gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
    r = sigmoid(gi[:H] + gh[:H])
    z = sigmoid(gi[H:2 * H] + gh[H:2 * H])
    n = np.tanh(gi[2 * H:] + r * gh[2 * H:])
    return (1 - z) * n + z * h


def reference(p, source: list[int], max_len: int, forced=None) -> tuple[list[int], list[np.ndarray]]:
    """One source, float64: encoder, bridge, then attention + GRU cell steps; each step's input
    is forced[t] when given (teacher forcing), else the argmax without BEGIN of the last."""
    h, memory = np.zeros(H), []
    for tok in source:
        h = gru(np.eye(VS)[tok], h, p["encoder.weight_ih_l0"], p["encoder.weight_hh_l0"],
                p["encoder.bias_ih_l0"], p["encoder.bias_hh_l0"])
        memory.append(h)
    memory = np.array(memory)
    s = np.tanh(p["bridge.weight"] @ memory[-1] + p["bridge.bias"])
    token, out, all_logits = BEGIN, [], []
    for t in range(max_len):
        if forced is not None:
            token = forced[t]
        e = np.array([p["v_a.weight"][0] @ np.tanh(p["W_a.weight"] @ s + p["U_a.weight"] @ m) for m in memory])
        alpha = np.exp(e - e.max())
        alpha /= alpha.sum()
        context = alpha @ memory
        s = gru(np.concatenate([np.eye(VT)[token], context]), s, p["cell.weight_ih"], p["cell.weight_hh"],
                p["cell.bias_ih"], p["cell.bias_hh"])
        logits = p["readout.weight"] @ s + p["readout.bias"]
        all_logits.append(logits)
        masked = logits.copy()
        masked[BEGIN] = -np.inf
        token = int(masked.argmax())
        if token == END and forced is None:
            break
        out.append(token)
    return out, all_logits


def tiny_peer(seed=0, begin_bias=0.0):
    torch.manual_seed(seed)
    peer = peer_class()(VS, VT, H)
    with torch.no_grad():
        for prm in peer.parameters():       # larger than the default init: decisive argmaxes
            prm.mul_(4)
        peer.readout.bias[BEGIN] += begin_bias
    params = {k: v.detach().double().numpy() for k, v in peer.state_dict().items()}
    return peer, params


def test_peer_greedy_matches_a_numpy_loop_in_a_padded_batch():
    peer, params = tiny_peer(1, begin_bias=50.0)     # BEGIN would win every step were it not excluded
    texts = ["abcdefg", "gfe", "ab", "cccccc"]      # unequal lengths: padding must not leak in
    codec = CharCodec(list("abcdefg"))
    src, lens = peer_batch(codec, texts)
    got = peer.greedy(src, lens, BEGIN, END, 8)
    want = [reference(params, codec.encode(t), 8)[0] for t in texts]
    assert got == want
    assert len({tuple(w) for w in want}) > 1 and BEGIN not in sum(want, [])


def test_peer_teacher_forced_logits_match_the_numpy_loop_in_a_padded_batch():
    peer, params = tiny_peer(1)
    codec = CharCodec(list("abcdefg"))
    texts = ["fdbaceg", "ge", "abc"]
    forced = [[BEGIN, 0, 3, 1, 2], [BEGIN, 2, 2, 0, 1], [BEGIN, 1, 0, 3, 3]]
    src, lens = peer_batch(codec, texts)
    with torch.no_grad():
        logits = peer(src, lens, torch.tensor(forced).t()).double().numpy()
    for b, text in enumerate(texts):
        want = np.array(reference(params, codec.encode(text), 5, forced[b])[1])
        np.testing.assert_allclose(logits[:, b], want, rtol=1e-4, atol=1e-5)


def test_missing_argument_is_one_line():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "seq2seq.py"), "train-peer"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "required" in done.stderr and "Traceback" not in done.stderr

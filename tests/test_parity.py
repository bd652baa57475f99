"""The runtime against independent references: torch.nn.LSTM / RNN / GRU and a float64
NumPy GRU of Wikipedia's form. Weights are copied in, logits compared step by step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nn2run
from support.models import build_model, lstm_logical

H, V, LAYERS, BATCH, STEPS = 16, 11, 2, 3, 60
TOL = 1e-5


def _ids(seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(STEPS, BATCH))


def _run_nn2(path, ids):
    m = nn2run.load(path)
    state = m.initial_state(BATCH)
    out = []
    for t in range(len(ids)):
        logits, state = m.step(ids[t], state)
        out.append(logits)
    return np.stack(out)


def _torch_logits(rnn, linear, ids):
    with torch.no_grad():
        x = torch.nn.functional.one_hot(torch.from_numpy(ids), V).float()
        y, _ = rnn(x)
        return linear(y).numpy()


def _split(w, n):
    return [w[i * H:(i + 1) * H].numpy() for i in range(n)]


def _readout(linear):
    return {"W_y": linear.weight.detach().numpy(), "b_y": linear.bias.detach().numpy()}


def test_lstm_kernel_matches_torch_lstm(tmp_path):
    torch.manual_seed(0)
    rnn, linear = torch.nn.LSTM(V, H, LAYERS), torch.nn.Linear(H, V)
    path, _, _ = build_model(tmp_path / "lstm.nnb", "lstm", H, LAYERS, V, lstm_logical(rnn, linear))
    ids = _ids()
    np.testing.assert_allclose(_run_nn2(path, ids), _torch_logits(rnn, linear, ids), atol=TOL, rtol=0)


def test_rnn_kernel_matches_torch_rnn(tmp_path):
    torch.manual_seed(1)
    rnn, linear = torch.nn.RNN(V, H, LAYERS, nonlinearity="tanh"), torch.nn.Linear(H, V)
    logical = _readout(linear)
    for l in range(LAYERS):
        logical.update({f"W_h@{l}": getattr(rnn, f"weight_ih_l{l}").detach().numpy(),
                        f"U_h@{l}": getattr(rnn, f"weight_hh_l{l}").detach().numpy(),
                        f"b_h@{l}": (getattr(rnn, f"bias_ih_l{l}") + getattr(rnn, f"bias_hh_l{l}")).detach().numpy()})
    path, _, _ = build_model(tmp_path / "rnn.nnb", "rnn", H, LAYERS, V, logical)
    ids = _ids(1)
    np.testing.assert_allclose(_run_nn2(path, ids), _torch_logits(rnn, linear, ids), atol=TOL, rtol=0)


def test_torchgru_kernel_matches_torch_gru(tmp_path):
    torch.manual_seed(2)
    rnn, linear = torch.nn.GRU(V, H, LAYERS), torch.nn.Linear(H, V)
    logical = _readout(linear)
    for l in range(LAYERS):
        g = {n: getattr(rnn, f"{n}_l{l}").detach() for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        for name, (a, b, c) in (("W_i", _split(g["weight_ih"], 3)), ("W_h", _split(g["weight_hh"], 3)),
                                ("b_i", _split(g["bias_ih"], 3)), ("b_h", _split(g["bias_hh"], 3))):
            logical.update({f"{name}r@{l}": a, f"{name}z@{l}": b, f"{name}n@{l}": c})   # torch: r, z, n
    path, _, _ = build_model(tmp_path / "tgru.nnb", "torchgru", H, LAYERS, V, logical)
    ids = _ids(2)
    np.testing.assert_allclose(_run_nn2(path, ids), _torch_logits(rnn, linear, ids), atol=TOL, rtol=0)


def _sig(x):
    return 1 / (1 + np.exp(-x))


def _numpy64(logical, ids, cell):
    """The stacked network in float64 around `cell(p, layer, x, h) -> new h`, written by hand."""
    p = {k: v.astype(np.float64) for k, v in logical.items()}
    hs = [np.zeros((BATCH, H)) for _ in range(LAYERS)]
    out = []
    for t in range(len(ids)):
        x = np.eye(V)[ids[t]]
        for l in range(LAYERS):
            hs[l] = x = cell(p, l, x, hs[l])
        out.append(x @ p["W_y"].T + p["b_y"])
    return np.stack(out)


def _gru_cell(p, l, x, h):
    """Wikipedia's fully gated unit."""
    z = _sig(x @ p[f"W_z@{l}"].T + h @ p[f"U_z@{l}"].T + p[f"b_z@{l}"])
    r = _sig(x @ p[f"W_r@{l}"].T + h @ p[f"U_r@{l}"].T + p[f"b_r@{l}"])
    hh = np.tanh(x @ p[f"W_h@{l}"].T + (r * h) @ p[f"U_h@{l}"].T + p[f"b_h@{l}"])
    return (1 - z) * h + z * hh


def test_gru_kernel_matches_float64_numpy_gru(tmp_path):
    path, _, logical = build_model(tmp_path / "gru.nnb", "gru", H, LAYERS, V, seed=3)
    ids = _ids(3)
    np.testing.assert_allclose(_run_nn2(path, ids), _numpy64(logical, ids, _gru_cell), atol=TOL, rtol=0)


def _mgu_cell(p, l, x, h):
    """The minimal gated unit (Zhou et al. 2016): one gate, and each weight matrix split into
    its hₜ₋₁ and xₜ columns."""
    wf, wh = p[f"W_f@{l}"], p[f"W_h@{l}"]
    f = _sig(h @ wf[:, :H].T + x @ wf[:, H:].T + p[f"b_f@{l}"])
    hh = np.tanh((f * h) @ wh[:, :H].T + x @ wh[:, H:].T + p[f"b_h@{l}"])
    return (1 - f) * h + f * hh


def test_mgu_kernel_matches_float64_numpy_mgu(tmp_path):
    path, _, logical = build_model(tmp_path / "mgu.nnb", "mgu", H, LAYERS, V, seed=4)
    ids = _ids(4)
    np.testing.assert_allclose(_run_nn2(path, ids), _numpy64(logical, ids, _mgu_cell), atol=TOL, rtol=0)


@pytest.mark.parametrize("kernel", ["lstm", "gru", "rnn", "torchgru", "mgu"])
def test_torch_backend_and_vm_agree_on_the_same_file(tmp_path, kernel):
    """Trainer <-> runtime: the torch backend reading the .nnb's tensors gives the VM's logits."""
    from nn2c.backend.network import TorchNetwork
    path, compiled, _ = build_model(tmp_path / "m.nnb", kernel, H, LAYERS, V, seed=4)
    m = nn2run.load(path)
    net = TorchNetwork(compiled.network, {k: np.array(v) for k, v in m.tensors.items()})
    ids = _ids(4)
    with torch.no_grad():
        ref, _ = net(torch.from_numpy(ids), net.initial_state(BATCH))
    np.testing.assert_allclose(_run_nn2(path, ids), ref.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("kernel", ["lstm", "gru", "mgu"])
def test_optimized_and_unoptimized_programs_compute_the_same_logits(tmp_path, kernel):
    _, _, logical = build_model(tmp_path / "opt.nnb", kernel, H, LAYERS, V, seed=5)
    build_model(tmp_path / "plain.nnb", kernel, H, LAYERS, V, logical, passes=())
    ids = _ids(5)
    np.testing.assert_allclose(_run_nn2(tmp_path / "opt.nnb", ids), _run_nn2(tmp_path / "plain.nnb", ids),
                               atol=TOL, rtol=0)


def test_a_renderer_table_out_of_step_with_the_operator_registry_is_refused():
    """Each renderer checks its operator table against nn2run.ops when it is imported."""
    from nn2run.ops import check_table, named
    with pytest.raises(ImportError, match=r"^backend: .*; missing tanh$"):
        check_table("backend", {"add": "{} + {}"}, ["add", "tanh"])
    with pytest.raises(ImportError, match=r"; unknown gelu$"):
        check_table("backend", {"gelu": "…"}, [])
    check_table("backend", {"add": "{} + {}"}, ["add", "softmax"], unsupported=("softmax",))
    assert "softmax" in named("activation") and "matmul" in named("product")

"""The fused time loop: its compiler-derived backward against torch autograd through the
plain per-step program (no hoisting, no fusion), for every sample kernel."""

from __future__ import annotations

import pytest
import torch

from nn2c.compiler import compile_kernel
from nn2c.fused import FusedLoop, supported
from nn2c.parse import parse
from nn2c.torch_backend import TorchNetwork, init_tensors


def _grads(net, ids, batch):
    state = [[(s + 0.1).requires_grad_(True) for s in layer] for layer in net.initial_state(batch)]
    logits, final = net(ids, state)
    loss = (logits ** 2).mean() + sum((s ** 3).sum() for layer in final for s in layer)
    loss.backward()
    return logits.detach(), [p.grad.clone() for p in net.parameters()], [s.grad for layer in state for s in layer]


@pytest.mark.parametrize("kernel", ["lstm", "gru", "rnn", "torchgru", "mgu"])
def test_fused_backward_matches_autograd_of_the_plain_program(kernel):
    compiled = compile_kernel(kernel, 12, 2, 7)
    assert all(supported(c) for c in compiled.network.cells)
    tensors = init_tensors(compiled.network, 1)
    ids = torch.randint(0, 7, (15, 3), generator=torch.Generator().manual_seed(0))
    ref = _grads(TorchNetwork(compiled.network, tensors, hoist=False, fused=False), ids, 3)
    got = _grads(TorchNetwork(compiled.network, tensors, hoist=True, fused=True), ids, 3)
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=1e-5)
    for g, r in zip(got[1] + got[2], ref[1] + ref[2]):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("hoist, fused", [(True, False), (True, True)])
def test_a_term_made_of_parameters_alone_is_the_same_at_every_step(hoist, fused):
    """exp(a) depends on no input: hoisted, it is one vector, broadcast over steps and streams."""
    kernel = parse("hₜ = tanh(W xₜ + U hₜ₋₁ + b) ⊙ exp(a)\n", "scaled.eq")
    compiled = compile_kernel(kernel, 6, 2, 5)
    tensors = init_tensors(compiled.network, 3)
    ids = torch.randint(0, 5, (9, 4), generator=torch.Generator().manual_seed(0))
    ref = _grads(TorchNetwork(compiled.network, tensors, hoist=False, fused=False), ids, 4)
    got = _grads(TorchNetwork(compiled.network, tensors, hoist=hoist, fused=fused), ids, 4)
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=1e-5)
    for g, r in zip(got[1] + got[2], ref[1] + ref[2]):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


def test_fused_lstm_weight_gradients_match_torch_nn_lstm():
    """Against an independent implementation: torch.nn.LSTM's own backward."""
    H, V, T, B = 10, 6, 9, 2
    compiled = compile_kernel("lstm", H, 1, V)
    torch.manual_seed(0)
    lstm, lin = torch.nn.LSTM(V, H), torch.nn.Linear(H, V)
    w = {n: getattr(lstm, f"{n}_l0").detach() for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    gates = dict(zip("ifco", range(4)))
    logical = {"W_y": lin.weight.detach().numpy(), "b_y": lin.bias.detach().numpy()}
    for g, k in gates.items():
        rows = slice(k * H, (k + 1) * H)
        logical.update({f"W_{g}@0": w["weight_ih"][rows].numpy(), f"U_{g}@0": w["weight_hh"][rows].numpy(),
                        f"b_{g}@0": (w["bias_ih"] + w["bias_hh"])[rows].numpy()})
    from nn2c.emit import pack, unpack
    specs = compiled.network.tensors()
    net = TorchNetwork(compiled.network, pack(specs, logical))
    ids = torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(2))
    logits, _ = net(ids, net.initial_state(B))
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).backward()
    out, _ = lstm(torch.nn.functional.one_hot(ids, V).float())
    torch.nn.functional.cross_entropy(lin(out).reshape(-1, V), y.reshape(-1)).backward()
    grads = unpack(specs, {n: p.grad.numpy() for n, p in zip(net.names, net.parameters())})
    for g, k in gates.items():
        rows = slice(k * H, (k + 1) * H)
        torch.testing.assert_close(torch.from_numpy(grads[f"U_{g}@0"]), lstm.weight_hh_l0.grad[rows], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(grads[f"W_{g}@0"]), lstm.weight_ih_l0.grad[rows], atol=1e-6, rtol=1e-4)


def test_fused_loop_source_computes_weight_gradients_once_after_the_loop():
    loop = FusedLoop(compile_kernel("lstm", 8, 1, 5).network.cells[0])
    body, after = loop.backward_src.split("for t in range(T - 1, -1, -1):")
    assert "torch.cat(k" in after and ".t() @ torch.stack(gM" in after
    assert "addmm" in loop.forward_src


def test_python_and_torchscript_loops_agree():
    """The loop runs in TorchScript when this torch can compile it; both must be one function."""
    cell = compile_kernel("gru", 8, 1, 5).network.cells[0]
    py, ts = FusedLoop(cell, script=False), FusedLoop(cell, script=True)
    if not ts.scripted:
        pytest.skip("this torch cannot compile TorchScript; the Python loop is used")
    gen = torch.Generator().manual_seed(0)
    E = [torch.randn(6, 2, e.width, generator=gen) for e in py.ext]
    P = [torch.randn(8, p.width, generator=gen) for p in py.params]
    S = [torch.randn(2, 8, generator=gen)]
    out_py, _, K_py = py.fwd(E, S, P, 6)
    out_ts, _, K_ts = ts.fwd(E, S, P, 6)
    torch.testing.assert_close(out_ts, out_py)
    g = torch.randn(out_py.shape, generator=gen)
    for a, b in zip(sum(py.bwd(K_py, g, [torch.zeros(2, 8)], E, P, 6), []),
                    sum(ts.bwd(K_ts, g, [torch.zeros(2, 8)], E, P, 6), [])):
        torch.testing.assert_close(a, b)

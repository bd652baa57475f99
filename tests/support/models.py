"""Models built from known weights and the numerical references the tests compare against."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent


def build_model(path, kernel: str, hidden: int, layers: int, vocab_size: int, logical: dict | None = None,
                seed: int = 0, passes=None):
    """Write a .nnb for `kernel` with the given kernel parameters (by key, e.g. "W_f@0"),
    or random ones; returns (path, compiled, logical)."""
    from nn2c.compiler.emit import logical_shapes, pack
    from nn2c.compiler.pipeline import compile_kernel, write_model
    from nn2run.codec import CharCodec
    kwargs = {} if passes is None else {"passes": passes}
    compiled = compile_kernel(kernel, hidden, layers, vocab_size, **kwargs)
    specs = compiled.network.tensors()
    if logical is None:
        rng = np.random.default_rng(seed)
        logical = {k: rng.uniform(-0.5, 0.5, s).astype(np.float32) for k, s in logical_shapes(specs).items()}
    codec = CharCodec([chr(ord("a") + i) if i < 26 else chr(0x100 + i) for i in range(vocab_size)])
    write_model(path, compiled, pack(specs, logical), codec, {"test": True})
    return path, compiled, logical


def random_tensors(network, seed: int) -> dict:
    """Stored tensors with every parameter uniform in ±1/√hidden (no gain at 1, no bias at 0:
    a gradient test wants every value generic)."""
    from nn2c.compiler.emit import init_logical, pack
    specs = network.tensors()
    return pack(specs, init_logical(specs, network.hidden, seed))


def autograd_grads(net, ids, batch: int):
    """Logits, parameter gradients and initial-state gradients of a loss that reaches every
    output and final state of a TorchNetwork."""
    state = [[(s + 0.1).requires_grad_(True) for s in layer] for layer in net.initial_state(batch)]
    logits, final = net(ids, state)
    loss = (logits ** 2).mean() + sum((s ** 3).sum() for layer in final for s in layer)
    loss.backward()
    return logits.detach(), [p.grad.clone() for p in net.parameters()], [s.grad for layer in state for s in layer]


def assert_matches_plain_program(network, tensors, ids, batch: int, **options):
    """A TorchNetwork built with `options` gives the logits and gradients of autograd through
    the plain per-step program (no hoisting, no fused loop); returns that network."""
    import torch

    from nn2c.backend.network import TorchNetwork
    ref = autograd_grads(TorchNetwork(network, tensors, hoist=False, fused=False), ids, batch)
    net = TorchNetwork(network, tensors, **options)
    got = autograd_grads(net, ids, batch)
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=1e-5)
    for g, r in zip(got[1] + got[2], ref[1] + ref[2]):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)
    return net


def lstm_logical(lstm, linear) -> dict:
    """The `lstm` sample's kernel parameters (W_f@0, U_f@0, b_f@0, …, W_y, b_y) holding the
    weights of a torch.nn.LSTM (gate order i, f, g, o; the two biases summed) and a Linear."""
    H = lstm.hidden_size
    logical = {"W_y": linear.weight.detach().numpy(), "b_y": linear.bias.detach().numpy()}
    for layer in range(lstm.num_layers):
        w = {n: getattr(lstm, f"{n}_l{layer}").detach() for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        for k, gate in enumerate("ifco"):
            rows = slice(k * H, (k + 1) * H)
            logical.update({f"W_{gate}@{layer}": w["weight_ih"][rows].numpy(),
                            f"U_{gate}@{layer}": w["weight_hh"][rows].numpy(),
                            f"b_{gate}@{layer}": (w["bias_ih"] + w["bias_hh"])[rows].numpy()})
    return logical


def assert_matches_nn_lstm(hidden: int, vocab: int, steps: int, batch: int):
    """The `lstm` sample with torch.nn.LSTM's weights gives its logits and its weight
    gradients (an independent implementation); returns the TorchNetwork."""
    import torch
    import torch.nn.functional as F

    from nn2c.backend.network import TorchNetwork
    from nn2c.compiler.emit import pack, unpack
    from nn2c.compiler.pipeline import compile_kernel
    H, V = hidden, vocab
    compiled = compile_kernel("lstm", H, 1, V)
    torch.manual_seed(0)
    lstm, lin = torch.nn.LSTM(V, H), torch.nn.Linear(H, V)
    specs = compiled.network.tensors()
    net = TorchNetwork(compiled.network, pack(specs, lstm_logical(lstm, lin)))
    ids = torch.randint(0, V, (steps, batch), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, V, (steps, batch), generator=torch.Generator().manual_seed(2))
    logits, _ = net(ids, net.initial_state(batch))
    F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).backward()
    out, _ = lstm(F.one_hot(ids, V).float())
    ref = lin(out)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-4)
    F.cross_entropy(ref.reshape(-1, V), y.reshape(-1)).backward()
    grads = unpack(specs, {n: p.grad.numpy() for n, p in zip(net.names, net.parameters())})
    for k, g in enumerate("ifco"):
        rows = slice(k * H, (k + 1) * H)
        torch.testing.assert_close(torch.from_numpy(grads[f"U_{g}@0"]), lstm.weight_hh_l0.grad[rows],
                                   atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(grads[f"W_{g}@0"]), lstm.weight_ih_l0.grad[rows],
                                   atol=1e-6, rtol=1e-4)
    return net

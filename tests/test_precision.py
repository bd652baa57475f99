"""`--precision bf16`: products with bf16 operands and float32 sums, everything else float32.

The gradients are checked against torch.nn.LSTM run in float64 (an independent
implementation at a precision far above both). bf16 keeps 8 significant bits, so rounding
one operand changes it by at most 2^-9 ≈ 2e-3 of itself; a gradient goes through a few
products per step, and the errors of its T·B terms are independent, so its relative error
is a small multiple of 2^-9 (about 5e-3 here). The bound, 2e-2 (10 × 2^-9), leaves room
for that and is still a thousand times what float32 gets (checked alongside: < 1e-5); a
floor of 1e-4 shows the products really were rounded.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import nn2run
import nn2run.format as fmt
from nn2c.backend.network import TorchNetwork
from nn2c.cli import main as nn2c_main
from nn2c.compiler.emit import pack, unpack
from nn2c.compiler.pipeline import compile_kernel
from support.models import lstm_logical
from support.runs import one_line, write_corpus

BF16_BOUND, FP32_BOUND, ROUNDED = 2e-2, 1e-5, 1e-4
H, V, LAYERS, T, B = 24, 9, 2, 20, 4


def _reference_grads(lstm, lin, ids, y) -> tuple[float, dict]:
    """torch.nn.LSTM + Linear in float64: the loss and the gradients, by kernel parameter name."""
    lstm, lin = lstm.double(), lin.double()
    out, _ = lstm(F.one_hot(ids, V).double())
    loss = F.cross_entropy(lin(out).reshape(-1, V), y.reshape(-1))
    loss.backward()
    grads = {"W_y": lin.weight.grad.numpy(), "b_y": lin.bias.grad.numpy()}
    for layer in range(LAYERS):
        g = {n: getattr(lstm, f"{n}_l{layer}").grad for n in ("weight_ih", "weight_hh", "bias_ih")}
        for k, gate in enumerate("ifco"):
            rows = slice(k * H, (k + 1) * H)
            grads.update({f"W_{gate}@{layer}": g["weight_ih"][rows].numpy(),
                          f"U_{gate}@{layer}": g["weight_hh"][rows].numpy(),
                          f"b_{gate}@{layer}": g["bias_ih"][rows].numpy()})   # = the summed bias's
    return loss.item(), grads


def _nn2_grads(precision: str, logical: dict, ids, y):
    compiled = compile_kernel("lstm", H, LAYERS, V)
    specs = compiled.network.tensors()
    net = TorchNetwork(compiled.network, pack(specs, logical), precision=precision)
    logits, state = net(ids, net.initial_state(B))
    loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    loss.backward()
    grads = unpack(specs, {n: p.grad.numpy() for n, p in zip(net.names, net.parameters())})
    return net, loss.item(), grads, state


def _relative_errors(grads: dict, ref: dict) -> dict:
    return {n: float(np.linalg.norm(np.asarray(grads[n], np.float64) - ref[n]) / np.linalg.norm(ref[n]))
            for n in ref}


@pytest.mark.parametrize("native", ["1", "0"])
def test_bf16_gradients_match_float64_nn_lstm_within_the_bf16_bound(native, monkeypatch):
    monkeypatch.setenv("NN2_NATIVE", native)
    torch.manual_seed(0)
    lstm, lin = torch.nn.LSTM(V, H, LAYERS), torch.nn.Linear(H, V)
    logical = lstm_logical(lstm, lin)
    ids = torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(2))
    ref_loss, ref = _reference_grads(lstm, lin, ids, y)

    net32, loss32, g32, _ = _nn2_grads("fp32", logical, ids, y)
    net16, loss16, g16, state = _nn2_grads("bf16", logical, ids, y)
    assert net16.loop_kind() == ("native" if native == "1" else "fused")
    err32, err16 = _relative_errors(g32, ref), _relative_errors(g16, ref)
    assert max(err32.values()) < FP32_BOUND, err32
    assert max(err16.values()) < BF16_BOUND, err16
    # the products' weights were rounded (b_y's gradient is softmax - onehot: no product)
    assert min(err16[n] for n in ref if n != "b_y") > ROUNDED, err16
    assert abs(loss16 - ref_loss) < BF16_BOUND * ref_loss and abs(loss32 - ref_loss) < FP32_BOUND * ref_loss
    # master weights, their gradients and the carried states stay float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net16.parameters())
    assert all(s.dtype == torch.float32 for layer in state for s in layer)


@pytest.mark.parametrize("native", ["1", "0"])
def test_under_bf16_the_readout_product_stays_float32(native, monkeypatch):
    """Logits rounded to bf16 cost a few hundredths of a nat per character (see
    nn2c/backend/network.py): the bf16 network's readout is the float32 product."""
    monkeypatch.setenv("NN2_NATIVE", native)
    torch.manual_seed(0)
    logical = lstm_logical(torch.nn.LSTM(V, H, LAYERS), torch.nn.Linear(H, V))
    ids = torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(1))
    net, _, _, _ = _nn2_grads("bf16", logical, ids, ids)
    h = torch.randn(1, 3, H, generator=torch.Generator().manual_seed(4)) * 3
    logits, _ = net._readout(h, [], net.tensor_dict())
    want = h[0].double() @ torch.from_numpy(logical["W_y"]).double().T + torch.from_numpy(logical["b_y"]).double()
    assert logits.dtype == torch.float32 and torch.allclose(logits[0].double(), want, atol=1e-5)


@pytest.mark.parametrize("native", ["1", "0"])
def test_the_loop_runs_in_its_own_precision_inside_an_autocast_region(native, monkeypatch):
    """Called under torch.autocast (as a user's or a bench's code may), the loop's Function
    runs both ways with autocast off: its outputs, final states and gradients are those of
    the same call outside autocast, bit for bit, and float32."""
    monkeypatch.setenv("NN2_NATIVE", native)
    compiled = compile_kernel("lstm", H, 1, V)
    torch.manual_seed(0)
    net = TorchNetwork(compiled.network, pack(compiled.network.tensors(),
                                              lstm_logical(torch.nn.LSTM(V, H), torch.nn.Linear(H, V))))
    loop, tensors = net.loops[0], net.tensor_dict()
    gen = torch.Generator().manual_seed(3)
    E = [torch.randn(T, B, e.width, generator=gen) for e in loop.ext]
    S = [torch.randn(B, s.width, generator=gen) for s in loop.backward.loop.states]

    def run(autocast: bool):
        P = [tensors[p.attrs["tensor"]] for p in loop.params]
        inputs = [t.clone().requires_grad_() for t in E + S]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs, finals = loop(T, inputs[:len(E)], inputs[len(E):], P)
            total = outs.sum() + sum(f.square().sum() for f in finals)
        grads = torch.autograd.grad(total, inputs + P)
        return [outs, *finals, *grads], loop.last_kind

    plain, kind = run(False)
    inside, kind_inside = run(True)
    assert kind == kind_inside == ("native" if native == "1" else "fused")
    for a, b in zip(plain, inside):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def train(*args):
    result = CliRunner().invoke(nn2c_main, ["train", *map(str, args)])
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    assert "Traceback" not in result.stderr
    return result


SMALL = ["--hidden", "16", "--layers", "2", "--seq-len", "16", "--batch", "8", "--device", "cpu",
         "--eval-every", "40", "--lr", "1e-2"]


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "words.txt")


def test_a_bf16_run_learns_and_writes_a_float32_model_nn2run_runs(tmp_path, corpus):
    out = tmp_path / "m.nnb"
    result = train(corpus, "-o", out, *SMALL, "--steps", "80", "--precision", "bf16")
    assert result.exit_code == 0, result.stderr
    m = nn2run.load(str(out))
    prov = m.header["provenance"]
    vocab = len(m.codec.vocab)
    assert prov["precision"] == "bf16" and prov["hyperparameters"]["precision"] == "bf16"
    assert prov["val_loss"] < math.log(vocab) - 0.5, (prov["val_loss"], math.log(vocab))
    nnb = fmt.read(str(out))
    try:
        assert nnb.tensors and all(np.asarray(a).dtype == np.float32 for a in nnb.tensors.values())
    finally:
        nnb.close()
    runtime = Path(sys.executable).parent / "nn2run"
    info = subprocess.run([str(runtime), "generate", str(out), "--info"], capture_output=True, text=True,
                          timeout=120)
    assert info.returncode == 0 and "bf16" in info.stdout, info.stderr
    text = subprocess.run([str(runtime), "generate", str(out), "-n", "40", "--seed", "1"], capture_output=True,
                          text=True, timeout=120)
    assert text.returncode == 0 and len(text.stdout.strip()) >= 20, text.stderr


@pytest.mark.parametrize("value", ["fp16", "BF16", ""])
def test_a_bad_precision_is_one_line(tmp_path, corpus, value):
    result = train(corpus, "-o", tmp_path / "m.nnb", *SMALL, "--steps", "2", "--precision", value)
    one_line(result, "--precision", "fp32 or bf16", repr(value))
    assert not (tmp_path / "m.nnb").exists()


def test_resume_keeps_the_precision_and_refuses_a_change(tmp_path, corpus):
    out = tmp_path / "m.nnb"
    assert train(corpus, "-o", out, *SMALL, "--steps", "10", "--precision", "bf16").exit_code == 0
    refused = train(corpus, "-o", out, *SMALL, "--steps", "20", "--resume", "--precision", "fp32")
    one_line(refused, "--precision fp32", "bf16", "--resume")
    assert nn2run.load(str(out)).header["provenance"]["steps"] == 10       # nothing lost
    resumed = train(corpus, "-o", out, *SMALL, "--steps", "20", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    prov = nn2run.load(str(out)).header["provenance"]
    assert prov["steps"] == 20 and prov["precision"] == "bf16"

"""Seq2seq files built by hand: programs written here as instruction lists (the contract of
nn2run.seq2seq), random NumPy weights, written with nn2run.format.write.

The encoder is a two-layer tanh RNN, hₜ = tanh(W_x xₜ + U hₜ₋₁ + b) per layer (layer 0 reads
the one-hot source token through a gather of W_x's rows). The decoder (layer 2) is a GRU
with Bahdanau's additive attention:

    eₜⱼ = v_a · tanh(W_a sₜ₋₁ + U_a hⱼ)        (U_a hⱼ in prepare)
    αₜⱼ = softmaxⱼ(eₜⱼ);  cₜ = Σⱼ(αₜⱼ ⊙ hⱼ)
    the GRU step of torch.nn.GRUCell on [onehot(yₜ₋₁); cₜ] (gates r, z, n stacked in W_i, W_h)
    s₀ = tanh(W_0 hₙ + b_0);  logits = W_y [sₜ; cₜ] + b_y
"""

from __future__ import annotations

import json

import numpy as np

from nn2run import format as fmt
from nn2run.codec import CharCodec

SOURCE = "abcdefgh"
TARGET = "wxyz"
ALPHA = 24          # register of αₜⱼ in the decoder (tests read the attention weights there)


def r(i):
    return ["r", i]


def t(name):
    return ["t", name]


def encoder_program(hidden: int) -> dict:
    code = [
        ["gather", 2, t("l0.W_x")], ["matmul", 3, r(0), t("l0.U")], ["add", 4, r(2), r(3)],
        ["add", 5, r(4), t("l0.b")], ["tanh", 6, r(5)],
        ["matmul", 7, r(6), t("l1.W_x")], ["matmul", 8, r(1), t("l1.U")], ["add", 9, r(7), r(8)],
        ["add", 10, r(9), t("l1.b")], ["tanh", 11, r(10)],
    ]
    states = [{"name": "h", "layer": 0, "prev": 0, "next": 6}, {"name": "h", "layer": 1, "prev": 1, "next": 11}]
    return {"registers": [hidden] * 12, "states": states, "output": 11, "code": code}


def decoder_program(hidden: int, vt: int) -> dict:
    h = hidden
    widths = {0: h, 1: h, 2: h, 3: h, 4: h, 5: h, 6: h, 7: h, 10: h, 11: h,
              20: vt, 21: h, 22: h, 23: h, 24: 1, 25: 1, 26: h, 27: h, 28: 1, 29: vt + h,
              30: 3 * h, 31: 3 * h, 32: 3 * h, 33: 3 * h, 34: h, 35: h, 36: h, 37: h, 38: h, 39: h,
              40: h, 41: h, 42: h, 43: h, 44: h, 45: h, 46: h, 47: h, 48: h, 49: 2 * h, 50: vt, 51: vt}
    registers = [widths.get(i, 1) for i in range(52)]
    prepare = [
        ["matmul", 2, r(0), t("l2.U_a")],                       # U_a hⱼ (per position)
        ["matmul", 3, r(1), t("l2.W_0")], ["add", 4, r(3), t("l2.b_0")], ["tanh", 5, r(4)],
    ]
    code = [
        ["onehot", 20],
        ["matmul", 21, r(10), t("l2.W_a")],                     # W_a sₜ₋₁
        ["add", 22, r(2), r(21)], ["tanh", 23, r(22)],          # per position
        ["mul", 26, r(23), t("l2.v_a")], ["sum", 28, r(26)],    # eₜⱼ (batch, J, 1)
        ["softmaxj", ALPHA, r(28)],
        ["mul", 27, r(ALPHA), r(0)], ["sumj", 44, r(27)],    # cₜ
        ["concat", 29, r(20), r(44)],
        ["matmul", 30, r(29), t("l2.W_i")], ["add", 31, r(30), t("l2.b_i")],
        ["matmul", 32, r(10), t("l2.W_h")], ["add", 33, r(32), t("l2.b_h")],
        ["slice", 34, r(31), 0], ["slice", 35, r(31), h], ["slice", 36, r(31), 2 * h],
        ["slice", 37, r(33), 0], ["slice", 38, r(33), h], ["slice", 39, r(33), 2 * h],
        ["add", 40, r(34), r(37)], ["sigmoid", 41, r(40)],      # r
        ["add", 42, r(35), r(38)], ["sigmoid", 43, r(42)],      # z
        ["mul", 45, r(41), r(39)], ["add", 46, r(36), r(45)], ["tanh", 47, r(46)],   # n
        ["sub", 48, ["k", 1.0], r(43)], ["mul", 6, r(48), r(47)],
        ["mul", 7, r(43), r(10)], ["add", 11, r(6), r(7)],     # sₜ
        ["concat", 49, r(11), r(44)],
        ["matmul", 50, r(49), t("l2.W_y")], ["add", 51, r(50), t("l2.b_y")],
    ]
    return {"registers": registers, "positional": [0, 2, 22, 23, 26, 28, ALPHA, 27],
            "memory": 0, "final": 1, "prepare": prepare,
            "states": [{"name": "s", "layer": 2, "prev": 10, "next": 11, "init": 5}],
            "code": code, "logits": 51}


def weights(hidden: int, seed: int = 0, source: str = SOURCE, target: str = TARGET) -> dict:
    """name -> float32 array, stored as the programs read them (matrices (in, out))."""
    h, vs, vt = hidden, len(source), len(target) + 2
    rng = np.random.default_rng(seed)
    shapes = {"l0.W_x": (vs, h), "l0.U": (h, h), "l0.b": (h,), "l1.W_x": (h, h), "l1.U": (h, h), "l1.b": (h,),
              "l2.U_a": (h, h), "l2.W_a": (h, h), "l2.v_a": (h,), "l2.W_0": (h, h), "l2.b_0": (h,),
              "l2.W_i": (vt + h, 3 * h), "l2.b_i": (3 * h,), "l2.W_h": (h, 3 * h), "l2.b_h": (3 * h,),
              "l2.W_y": (2 * h, vt), "l2.b_y": (vt,)}
    w = {k: rng.uniform(-0.9, 0.9, s).astype(np.float32) for k, s in shapes.items()}
    w["l2.b_y"][len(target) + 1] += 0.8          # END likely enough that outputs vary in length
    return w


def param_map(tensors: dict) -> dict:
    out = {}
    for name, a in tensors.items():
        layer, pname = name.split(".")
        kind = "matrix" if a.ndim == 2 else "vector"
        key = f"{pname}@{layer[1:]}"
        out[key] = {"tensor": name, "kind": kind, "start": 0, "stop": a.shape[-1], "name": pname,
                    "layer": int(layer[1:])}
    return out


def header(hidden: int, tensors: dict, source: str = SOURCE, target: str = TARGET,
           limits=(12, 10)) -> dict:
    n = len(target)
    return {
        "nn2": {"kind": "seq2seq", "nn2c": "test"},
        "model": {"layers": 2, "hidden": hidden, "encoder": "rnn", "decoder": "seq2seq/bahdanau"},
        "codec": CharCodec(list(source)).to_header(),
        "target": {"codec": CharCodec(list(target)).to_header(), "begin": n, "end": n + 1},
        "limits": {"source": limits[0], "target": limits[1]},
        "encoder": encoder_program(hidden),
        "decoder": decoder_program(hidden, n + 2),
        "params": param_map(tensors),
        "source": {"encoder": {"name": "rnn", "text": "hₜ = tanh(W_x xₜ + U hₜ₋₁ + b)"},
                   "decoder": {"name": "seq2seq/bahdanau", "text": "αₜⱼ = softmaxⱼ(eₜⱼ)"}},
        "provenance": {"test": True},
    }


def build(path, hidden: int = 8, seed: int = 0, limits=(12, 10), change=None):
    """Write a seq2seq file; change(header) may edit the header first. Returns (path, weights)."""
    tensors = weights(hidden, seed)
    head = header(hidden, tensors, limits=limits)
    if change is not None:
        change(head)
    head = json.loads(json.dumps(head))
    fmt.write(path, head, tensors)
    return path, tensors

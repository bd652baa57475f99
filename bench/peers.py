"""The generation peers: the same LSTM, written by hand, on the same weights.

`NumpyLSTM` is the loop a careful person writes with NumPy alone: per layer one stacked
product for the input (a row lookup for the one-hot token of layer 0) and one for the
state, gates in the order i|f|o|g so that one sigmoid covers three of them, every ufunc
in place, σ(x) = ½·tanh(½x) + ½. `TorchLSTM` is torch's eager nn.LSTM stepped one token
at a time with (h, c) carried, then the nn.Linear readout.
"""

from __future__ import annotations

import numpy as np

GATES = "ifoc"          # the peer's gate order: three sigmoids, then the candidate (tanh)


def _stack(logical, prefix: str, layer: int) -> np.ndarray:
    """(inputs, 4H): the four gates' matrices side by side, as x @ M wants them."""
    return np.concatenate([logical[f"{prefix}_{g}@{layer}"].T for g in GATES], axis=1)


class NumpyLSTM:
    def __init__(self, logical: dict, layers: int, batch: int = 1):
        self.layers = layers
        self.H = H = logical["U_f@0"].shape[0]
        self.W = [np.ascontiguousarray(_stack(logical, "W", layer)) for layer in range(layers)]
        self.U = [np.ascontiguousarray(_stack(logical, "U", layer)) for layer in range(layers)]
        self.b = [np.concatenate([logical[f"b_{g}@{layer}"] for g in GATES]) for layer in range(layers)]
        # layer 0: the one-hot input times W is a row of W; fold the bias into the rows
        self.W[0] = self.W[0] + self.b[0]
        self.Wy = np.ascontiguousarray(logical["W_y"].T)
        self.by = logical["b_y"].copy()
        self.h = [np.zeros((batch, H), np.float32) for _ in range(layers)]
        self.c = [np.zeros((batch, H), np.float32) for _ in range(layers)]
        self.g = [np.zeros((batch, 4 * H), np.float32) for _ in range(layers)]
        self.t = [np.zeros((batch, 4 * H), np.float32) for _ in range(layers)]
        self.tmp = np.zeros((batch, H), np.float32)
        self.logits = np.zeros((batch, len(self.by)), np.float32)

    def reset(self) -> None:
        for a in self.h + self.c:
            a.fill(0.0)

    def step(self, tok: int) -> np.ndarray:
        """One token (batch 1) -> logits (1, vocab), overwritten by the next step."""
        H, mm, add, mul, tanh = self.H, np.matmul, np.add, np.multiply, np.tanh
        x = None
        for layer in range(self.layers):
            g, h, c, tmp = self.g[layer], self.h[layer], self.c[layer], self.tmp
            if layer == 0:
                mm(h, self.U[0], out=g)
                add(g, self.W[0][tok], out=g)
            else:
                t = self.t[layer]
                mm(x, self.W[layer], out=g)
                mm(h, self.U[layer], out=t)
                add(g, t, out=g)
                add(g, self.b[layer], out=g)
            s = g[:, :3 * H]
            mul(s, 0.5, out=s)
            tanh(s, out=s)
            mul(s, 0.5, out=s)
            add(s, 0.5, out=s)
            cand = g[:, 3 * H:]
            tanh(cand, out=cand)
            mul(c, g[:, H:2 * H], out=c)                    # c = f ⊙ c
            mul(g[:, :H], cand, out=tmp)                    #   + i ⊙ c̃
            add(c, tmp, out=c)
            tanh(c, out=h)
            mul(h, g[:, 2 * H:3 * H], out=h)                # h = o ⊙ tanh(c)
            x = h
        mm(x, self.Wy, out=self.logits)
        add(self.logits, self.by, out=self.logits)
        return self.logits


class TorchLSTM:
    """nn.LSTM (one-hot input) + nn.Linear on the same weights, stepped one token a call."""

    def __init__(self, logical: dict, layers: int, device: str = "cpu"):
        import torch
        self.torch = torch
        H = logical["U_f@0"].shape[0]
        V = logical["W_y"].shape[0]
        self.lstm = torch.nn.LSTM(V, H, layers).to(device)
        self.lin = torch.nn.Linear(H, V).to(device)
        order = "ifco"                                        # torch's gate order: i, f, g, o
        with torch.no_grad():
            for layer in range(layers):
                getattr(self.lstm, f"weight_ih_l{layer}").copy_(
                    torch.from_numpy(np.concatenate([logical[f"W_{g}@{layer}"] for g in order])))
                getattr(self.lstm, f"weight_hh_l{layer}").copy_(
                    torch.from_numpy(np.concatenate([logical[f"U_{g}@{layer}"] for g in order])))
                getattr(self.lstm, f"bias_ih_l{layer}").copy_(
                    torch.from_numpy(np.concatenate([logical[f"b_{g}@{layer}"] for g in order])))
                getattr(self.lstm, f"bias_hh_l{layer}").zero_()
            self.lin.weight.copy_(torch.from_numpy(logical["W_y"]))
            self.lin.bias.copy_(torch.from_numpy(logical["b_y"]))
        # one-hot rows, looked up rather than built each step (favours the peer)
        self.eye = torch.eye(V, device=device).view(V, 1, 1, V)
        self.device = device
        self.state = None
        self.reset()

    def reset(self) -> None:
        H, L = self.lstm.hidden_size, self.lstm.num_layers
        z = lambda: self.torch.zeros(L, 1, H, device=self.device)   # noqa: E731
        self.state = (z(), z())

    def step(self, tok: int):
        """One token -> logits (1, vocab) as a torch tensor. Call under torch.no_grad()."""
        out, self.state = self.lstm(self.eye[tok], self.state)
        return self.lin(out[0])

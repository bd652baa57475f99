"""The torch model of a Seq2SeqNetwork: parameters (one per stored tensor), the encoder over
a padded batch, the decoder teacher-forced or greedy.

Which loop runs where: the encoder's layers run through the language model's machinery
(`nn2c.backend.network.compile_cell`): the whole padded batch at once, input products
hoisted over all positions, and the recurrent loop native (generated C) on CPU float32
where the native loop supports the cell, else the compiler's fused loop in torch (a GPU,
float64). Sources are padded at the end, so an encoder output at a position below a row's
length never sees the padding. The decoder runs step by step in autograd (its positional
nodes are outside what the fused and native loops do), with the terms of memory, final
and parameters computed once per batch and the token terms once per batch for all steps.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nn2c.backend.network import compile_cell
from nn2c.compiler.ir import Seq2SeqNetwork
from nn2c.train.seq2seq.render import compile_decoder


class Seq2SeqTorch(torch.nn.Module):
    def __init__(self, network: Seq2SeqNetwork, tensors: dict[str, np.ndarray], fused: bool = True):
        super().__init__()
        self.network = network
        self.names = list(network.tensors())
        for i, name in enumerate(self.names):
            self.register_parameter(f"t{i}", torch.nn.Parameter(torch.from_numpy(np.array(tensors[name]))))
        self._encoder, self.loops = [], []
        for cell in network.encoder:
            run, loop = compile_cell(cell, True, fused)
            self._encoder.append(run)
            if loop is not None:
                self.loops.append(loop)
        self._prepare, self._hoist, self._step, self.decoder_source = compile_decoder(network.decoder, network.bridge)
        self.state_widths = [prev.width for _, prev, _ in network.decoder.states]

    def tensor_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"t{i}") for i, name in enumerate(self.names)}

    def numpy_tensors(self) -> dict[str, np.ndarray]:
        return {name: t.detach().cpu().numpy().astype(np.float32) for name, t in self.tensor_dict().items()}

    def loop_kind(self) -> str:
        """What runs the encoder's recurrent loops: "native", "fused" or "autograd"; the
        decoder always runs per step in autograd."""
        if not self.loops or len(self.loops) < len(self._encoder):
            return "autograd"
        params = list(self.parameters())
        return "+".join(sorted({loop.kind_for(params) for loop in self.loops}))

    def encode(self, src: torch.Tensor, src_len: torch.Tensor):
        """src (T, B), lengths (B,) -> memory (B, T, H), final (B, H), mask (B, T, 1)."""
        P = self.tensor_dict()
        x = src
        for run, cell in zip(self._encoder, self.network.encoder):
            states = [torch.zeros(src.shape[1], prev.width, dtype=P[self.names[0]].dtype, device=src.device)
                      for _, prev, _ in cell.states]
            x, _ = run(x, states, P)
        memory = x.transpose(0, 1)
        rows = torch.arange(src.shape[1], device=src.device)
        final = memory[rows, src_len - 1]
        mask = (torch.arange(src.shape[0], device=src.device)[None, :] < src_len[:, None]).unsqueeze(-1)
        return memory, final, mask

    def start(self, src, src_len):
        """Everything the decoder's steps read: (P, K, initial states, memory, mask)."""
        P = self.tensor_dict()
        memory, final, mask = self.encode(src, src_len)
        K, inits = self._prepare(P, memory, final, mask)
        B = src.shape[1]
        states = [init.expand(B, w) if init is not None else memory.new_zeros(B, w)
                  for init, w in zip(inits, self.state_widths)]
        return P, K, states, memory, mask

    def forward(self, src, src_len, tgt_in):
        """Teacher forcing: tgt_in (U, B) -> logits (U, B, Vt)."""
        P, K, states, memory, mask = self.start(src, src_len)
        H = self._hoist(P, tgt_in, K, mask)
        out = []
        for t in range(tgt_in.shape[0]):
            logits, states = self._step(P, states, K, [h[t] for h in H], memory, mask)
            out.append(logits)
        return torch.stack(out)

    @torch.no_grad()
    def greedy(self, src, src_len, begin: int, end: int, max_len: int) -> list[list[int]]:
        """Each row's argmax decoding up to END (not included) or max_len tokens; BEGIN is
        never chosen (as nn2run decodes: it is an input token only)."""
        P, K, states, memory, mask = self.start(src, src_len)
        B = src.shape[1]
        token = torch.full((B,), begin, dtype=torch.int64, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        picked = []
        for _ in range(max_len):
            H = self._hoist(P, token[None], K, mask)
            logits, states = self._step(P, states, K, [h[0] for h in H], memory, mask)
            token = logits.index_fill(-1, torch.tensor([begin], device=logits.device), -torch.inf).argmax(-1)
            picked.append(torch.where(done, end, token))
            done |= token == end
            if bool(done.all()):
                break
        ids = torch.stack(picked, 1).tolist() if picked else [[] for _ in range(B)]
        return [row[:row.index(end)] if end in row else row for row in ids]


def masked_loss(logits: torch.Tensor, tgt_out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per target token (END included), padding excluded."""
    per = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), reduction="none")
    return (per * mask.flatten()).sum() / mask.sum()

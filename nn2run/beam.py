"""Decoding a seq2seq model: greedy, and beam search with the beams on the batch axis.

Both drive a decoder machine (`nn2run.decoder.DecoderVM`) that has been started on the
encoded sources: `advance(ids) -> logits` and, for beams, `reorder(parents)`. Step 0 reads
BEGIN; each step's logits give the next token; a hypothesis ends at END (which is not part
of its tokens but counts in its length) or after `max_len` tokens. BEGIN is never chosen
(a trained model does not predict it; its probability is not given to the others).

Beam search keeps K rows per sentence (rows i*K .. i*K+K-1). At each step the sentence's
candidates are every live row's score plus each token's log-probability; the best
K - (finished so far) of them are taken (ties: the lower row, then the lower token): those
ending in END are finished, the others become the live rows, their states gathered from
their parent rows. So exactly K hypotheses finish per sentence, and K = 1 is greedy. They
are ranked by log-probability / length ** alpha (the length penalty) and reported with
their average log-probability per token.

Imports NumPy and the standard library only.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Hypothesis(NamedTuple):
    tokens: list          # target token ids, END not included
    logp: float           # the sum of the tokens' log-probabilities (END's included)
    length: int           # tokens scored: len(tokens), plus one for END

    @property
    def score(self) -> float:
        """The average log-probability per token."""
        return self.logp / self.length


def log_softmax(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def greedy(machine, rows: int, begin: int, end: int, max_len: int) -> list[Hypothesis]:
    """The most likely token at every step, for each of `rows` sentences."""
    ids = np.full(rows, begin, dtype=np.intp)
    tokens = np.zeros((rows, max_len), dtype=np.intp)
    lengths = np.zeros(rows, dtype=np.intp)
    logp = np.zeros(rows)
    done = np.zeros(rows, dtype=bool)
    every = np.arange(rows)
    for t in range(max_len):
        step = log_softmax(machine.advance(ids))
        step[:, begin] = -np.inf
        nxt = step.argmax(axis=1)
        live = ~done
        logp[live] += step[every, nxt][live]
        ends = live & (nxt == end)
        grows = live & ~ends
        tokens[grows, t] = nxt[grows]
        lengths[grows] += 1
        done |= ends
        if done.all():
            break
        ids[:] = nxt
    return [Hypothesis(tokens[i, :n].tolist(), float(logp[i]), int(n) + int(n < max_len))
            for i, n in enumerate(lengths)]


def search(machine, sentences: int, k: int, begin: int, end: int, max_len: int,
           alpha: float = 1.0) -> list[list[Hypothesis]]:
    """Beam search of width k: per sentence, its k hypotheses, best first."""
    scores = np.full((sentences, k), -np.inf)
    scores[:, 0] = 0.0
    hyps = [[[] for _ in range(k)] for _ in range(sentences)]
    finished = [[] for _ in range(sentences)]
    ids = np.full(sentences * k, begin, dtype=np.intp)
    for _ in range(max_len):
        logp = log_softmax(machine.advance(ids))
        logp[:, begin] = -np.inf
        vocab = logp.shape[1]
        cand = (scores[:, :, None] + logp.reshape(sentences, k, vocab)).reshape(sentences, k * vocab)
        parents = np.arange(sentences * k)
        new_scores = np.full((sentences, k), -np.inf)
        new_hyps = [[[] for _ in range(k)] for _ in range(sentences)]
        ids = np.full(sentences * k, end, dtype=np.intp)
        for i in range(sentences):
            slot = 0
            for f in np.argsort(-cand[i], kind="stable")[:k - len(finished[i])]:
                row, tok = divmod(int(f), vocab)
                if cand[i, f] == -np.inf:
                    break
                if tok == end:
                    finished[i].append(Hypothesis(hyps[i][row], float(cand[i, f]), len(hyps[i][row]) + 1))
                    continue
                new_hyps[i][slot] = hyps[i][row] + [tok]
                new_scores[i, slot] = cand[i, f]
                parents[i * k + slot], ids[i * k + slot] = i * k + row, tok
                slot += 1
        scores, hyps = new_scores, new_hyps
        if all(len(f) == k for f in finished):
            break
        machine.reorder(parents)
    for i in range(sentences):
        for slot in range(k):
            if scores[i, slot] > -np.inf:
                finished[i].append(Hypothesis(hyps[i][slot], float(scores[i, slot]), len(hyps[i][slot])))
    return [sorted(f, key=lambda h: -h.logp / h.length ** alpha) for f in finished]

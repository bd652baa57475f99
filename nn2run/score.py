"""Scoring: how surprising each of many token sequences is to a model, batched on one VM.

Imports NumPy and the standard library only.
"""

from __future__ import annotations

import math

import numpy as np

from .generate import start_token
from .model import Model


def score(model: Model, lines: list[list[int]]) -> list[tuple[float, int]]:
    """(mean bits per token, token count) of each line, all lines stepped at once.

    A line is read as if it followed the start token (a newline where the vocabulary has
    one, as in the corpus a line follows the previous line's end): the first token is
    predicted from the start token alone, each later one from everything before it. The
    figure is the mean of -log2 p(token); an empty line has none and scores NaN.
    """
    checked = [model.check_ids(ids) for ids in lines]
    if not checked:
        return []
    lens = np.array([len(ids) for ids in checked])
    longest = int(lens.max())
    targets = np.zeros((len(checked), longest), np.intp)
    for i, ids in enumerate(checked):
        targets[i, :len(ids)] = ids
    inputs = np.concatenate([np.full((len(checked), 1), start_token(model), np.intp), targets[:, :-1]], axis=1)
    bits = np.zeros(len(checked))
    rows = np.arange(len(checked))
    vm = model.vm(len(checked))
    vm.reset()
    with np.errstate(all="ignore"):
        for t in range(longest):
            z = vm.advance(inputs[:, t]).astype(np.float64)
            top = z.max(axis=1)
            log_norm = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
            surprise = (log_norm - z[rows, targets[:, t]]) / math.log(2)
            bits += np.where(t < lens, surprise, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = bits / lens
    return [(float(m), int(n)) for m, n in zip(mean, lens)]


def stream_loss(model: Model, ids, streams: int = 8) -> float:
    """Mean -ln p(next token) over a token stream, in float64: the stream cut into `streams`
    contiguous pieces stepped side by side from the zero state (a held-out loss)."""
    ids = np.asarray(model.check_ids(list(ids)))
    n = (len(ids) - 1) // streams
    if n < 1:
        raise ValueError(f"a stream of {len(ids)} tokens is too short for {streams} streams")
    inputs = np.stack([ids[i * n:(i + 1) * n] for i in range(streams)], axis=1)
    targets = np.stack([ids[i * n + 1:(i + 1) * n + 1] for i in range(streams)], axis=1)
    vm = model.vm(streams)
    vm.reset()
    total, rows = 0.0, np.arange(streams)
    for t in range(n):
        z = vm.advance(inputs[t]).astype(np.float64)
        top = z.max(axis=1)
        log_norm = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
        total += float((log_norm - z[rows, targets[t]]).sum())
    return total / (n * streams)

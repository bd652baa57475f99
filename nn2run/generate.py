"""Text generation: primes in, sampled token ids out, many streams at once."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .model import Model
from .sample import Sampler


def start_token(model: Model) -> int:
    """The token fed when the prime is empty: a newline if the vocabulary has one."""
    start = getattr(model.codec, "start", None)       # a codec service may name its own
    if start is not None:
        return start
    return model.vocab.index("\n") if "\n" in model.vocab else 0


def generate(model: Model, primes: list[list[int]], n: int, sampler: Sampler) -> Iterator[tuple[int, np.ndarray]]:
    """Feed each stream its prime, then sample `n` tokens per stream.

    Yields (step, ids) after each VM step. Stream i is generating (its ids[i] is new
    text) at steps len(primes[i]) - 1 ... len(primes[i]) + n - 2; before that it is
    still reading its prime. Streams run in lock step on one VM, so shorter primes
    start generating earlier. Each prime must hold at least one token, each an integer
    in [0, len(model.vocab)) (else ValueError, as for Model.step).
    """
    primes = _check_primes(model, primes)
    if type(n) is not int or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    lens = np.array([len(p) for p in primes])
    vm = model.vm(len(primes))
    vm.reset()
    total = int(lens.max()) - 1 + n
    padded = np.zeros((len(primes), int(lens.max())), dtype=np.intp)
    for i, p in enumerate(primes):
        padded[i, :len(p)] = p
    ids = padded[:, 0].copy()
    first_sample = int(lens.min()) - 1
    with np.errstate(all="ignore"):
        for t in range(total):
            logits = vm.advance(ids)
            # before the shortest prime ends every stream is still reading: nothing to sample
            nxt = sampler(logits) if t >= first_sample else np.empty(len(lens), np.intp)
            if t + 1 < padded.shape[1]:
                reading = t + 1 < lens
                nxt[reading] = padded[reading, t + 1]
            yield t, nxt
            ids = nxt


def _check_primes(model: Model, primes) -> list[np.ndarray]:
    if isinstance(primes, (str, bytes)) or not hasattr(primes, "__len__") or len(primes) == 0:
        raise ValueError("primes must be a non-empty list of token-id lists, one per stream")
    checked = []
    for i, p in enumerate(primes):
        try:
            ids = model.check_ids(p)
        except ValueError as e:
            raise ValueError(f"prime {i}: {e}") from None
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"prime {i}: needs at least one token id (a flat list)")
        checked.append(ids)
    return checked

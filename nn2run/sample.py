"""The sampler: logits -> next token ids. Separate from the codec and from the VM."""

from __future__ import annotations

import math
import operator
import random
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False

    def check(self) -> None:
        """ValueError for a value no sampler can use (NaN and infinity included)."""
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be > 0 and finite, got {self.temperature}")
        if self.top_k is not None and (type(self.top_k) is not int or self.top_k < 1):
            raise ValueError(f"top-k must be ≥ 1 (an integer), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")


class Sampler:
    """Draws one token per stream from (batch, vocab) logits.

    Works in float32 in scratch arrays reused from step to step (one set per vocab): the logits
    (owned by the VM, overwritten by the next step) are read once and never upcast. The
    uniform draws come from the standard library's generator (`stream`): importing
    numpy.random would add ~10 ms to every start of the command.
    """

    def __init__(self, config: SamplerConfig, seed: int | None = None, scratch: dict | None = None):
        config.check()
        self.config = config
        self.rng = stream(seed)
        # per vocab, the scratch arrays: samplers used one after the other may share them
        self._scratch: dict[int, tuple] = {} if scratch is None else scratch
        with np.errstate(over="ignore"):
            self._scale = np.float32(1.0 / config.temperature)
        # a temperature so small that 1/T is past float32 (< ~3e-39) would make the largest
        # logit 0·inf = NaN: it takes the most likely token, as its limit does
        self._argmax = config.greedy or not np.isfinite(self._scale)

    def _buffers(self, shape: tuple) -> tuple:
        """Scratch arrays for `shape` (rows, vocab): one set per vocab, as many rows as the
        most yet (a server's groups of rows vary from step to step), and views of them."""
        rows, vocab = shape
        have = self._scratch.get(vocab)
        if have is None or have[0].shape[0] < rows:
            have = self._scratch[vocab] = (np.empty(shape, np.float32), np.empty(shape, np.float32),
                                           np.empty((rows, 1), np.float32), np.empty(shape, bool))
        return have if have[0].shape[0] == rows else tuple(a[:rows] for a in have)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        return self.draw(logits, [self.rng.random] * logits.shape[0])

    def draw(self, logits: np.ndarray, uniforms: list) -> np.ndarray:
        """One token per row of logits (batch, vocab) with this sampler's settings, row i's
        uniform draw from `uniforms[i]()`, called once each in row order (not at all when the
        settings take the most likely token): the rows of a server's batch draw from
        generators of their own with the arithmetic of a sampler alone."""
        cfg = self.config
        if self._argmax:
            return logits.argmax(axis=1)
        z, cdf, col, mask = self._buffers(logits.shape)
        np.max(logits, axis=1, keepdims=True, out=col)      # the max of logits / T is max(logits) / T
        np.subtract(logits, col, out=z)
        if cfg.temperature != 1.0:
            np.multiply(z, self._scale, out=z)
        if cfg.top_k is not None and cfg.top_k < z.shape[1]:
            kth = np.partition(z, -cfg.top_k, axis=1)[:, -cfg.top_k][:, None]
            np.less(z, kth, out=mask)
            np.copyto(z, -np.inf, where=mask)
        np.exp(z, out=z)
        if cfg.top_p is not None and cfg.top_p < 1:
            np.sum(z, axis=1, keepdims=True, out=col)
            np.divide(z, col, out=z)
            z = _nucleus(z, cfg.top_p)
        np.cumsum(z, axis=1, out=cdf)
        # the token is the count of cdf ≤ u, u = draw · total; u below the total, where a
        # draw near 1 rounds it up in float32, would count masked tokens after the last one
        last = z.shape[1] - 1
        if z.shape[0] == 1:     # one stream: a binary search finds the count
            total, r = cdf[0, last], uniforms[0]()
            u = np.float32(r * float(total))
            if r > _NEAR_ONE and u >= total:        # (the test on r first: the usual case is quick)
                u = np.nextafter(total, _ZERO)
            return np.array([min(int(cdf[0].searchsorted(u, "right")), last)], np.intp)
        total = cdf[:, -1:]
        u = (np.array([[draw()] for draw in uniforms]) * total).astype(np.float32)
        np.minimum(u, np.nextafter(total, _ZERO), out=u)
        np.less_equal(cdf, u, out=mask)
        return np.minimum(mask.sum(axis=1), last)


_ZERO = np.float32(0.0)
_NEAR_ONE = 1.0 - 2.0 ** -22      # a draw below it never rounds up to the total in float32


def stream(seed: int | None = None, index: int = 0) -> random.Random:
    """The uniform draws of a sampler seeded `seed`, a non-negative integer (a NumPy one
    too) or None (from the system's entropy); `index` > 0 gives the other streams derived
    from one seed (a request's n choices). ValueError for any other seed."""
    if seed is None:
        return random.Random()
    try:
        value = operator.index(seed)
    except TypeError:
        value = -1
    if value < 0:           # random.Random would take abs() of a negative one, or a float
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return random.Random(value if index == 0 else f"{value}/{index}")


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches top_p."""
    order = np.argsort(-p, axis=1)
    sorted_p = np.take_along_axis(p, order, axis=1)
    keep_sorted = np.cumsum(sorted_p, axis=1) - sorted_p < top_p
    keep_sorted[:, 0] = True        # the most likely always: a top_p below float32's least is 0 here
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    return np.where(keep, p, 0.0)

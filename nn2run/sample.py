"""The sampler: logits -> next token ids. Separate from the codec and from the VM."""

from __future__ import annotations

import math
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
    """Draws one token per stream from (batch, vocab) logits."""

    def __init__(self, config: SamplerConfig, seed: int | None = None):
        config.check()
        self.config = config
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        cfg = self.config
        if cfg.greedy:
            return logits.argmax(axis=1)
        z = logits.astype(np.float64) / cfg.temperature
        z -= z.max(axis=1, keepdims=True)
        if cfg.top_k is not None and cfg.top_k < z.shape[1]:
            kth = np.partition(z, -cfg.top_k, axis=1)[:, -cfg.top_k][:, None]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        if cfg.top_p is not None and cfg.top_p < 1:
            p = _nucleus(p, cfg.top_p)
        cdf = np.cumsum(p, axis=1)
        u = self.rng.random((p.shape[0], 1)) * cdf[:, -1:]
        return np.minimum((cdf <= u).sum(axis=1), p.shape[1] - 1)


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches top_p."""
    order = np.argsort(-p, axis=1)
    sorted_p = np.take_along_axis(p, order, axis=1)
    keep_sorted = np.cumsum(sorted_p, axis=1) - sorted_p < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    return np.where(keep, p, 0.0)

"""Pairs of strings for seq2seq training: a TSV of source<TAB>target lines, the two char
codecs, the validation split and batches bucketed by length.

Token ids: the source codec's characters are 0..Vs-1; the target codec's are 0..n-1, then
BEGIN = n (the decoder's input at step 0) and END = n + 1 (the last output of every row).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from nn2run.codec import CharCodec

BOM = "\ufeff"
BUCKET_POOL = 64        # batches sorted by length together: similar lengths, yet shuffled


class PairsError(Exception):
    """A pairs file that cannot be trained on; the message names the file and line."""


@dataclass
class Pairs:
    path: str
    sources: list[str]
    targets: list[str]
    source_codec: CharCodec
    target_codec: CharCodec
    sha256: str

    @property
    def begin(self) -> int:
        return len(self.target_codec.vocab)

    @property
    def end(self) -> int:
        return len(self.target_codec.vocab) + 1

    @property
    def target_vocab(self) -> int:
        return len(self.target_codec.vocab) + 2


def parse_pairs(text: str, path: str) -> tuple[list[str], list[str]]:
    """source<TAB>target lines -> two lists; the first bad line refused, by its number."""
    if text.startswith(BOM):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise PairsError(f"{path} holds no pairs (a line is source<TAB>target)")
    sources, targets = [], []
    for n, line in enumerate(lines, 1):
        line = line[:-1] if line.endswith("\r") else line
        tabs = line.count("\t")
        if tabs != 1:
            what = "no tab" if tabs == 0 else f"{tabs} tabs"
            raise PairsError(f"{path}:{n}: {what}; a line is source<TAB>target")
        src, tgt = line.split("\t")
        if not src:
            raise PairsError(f"{path}:{n}: the source is empty")
        sources.append(src)
        targets.append(tgt)
    return sources, targets


def read_pairs(path: str) -> Pairs:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise PairsError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PairsError(f"{path} is a directory, not a pairs file") from None
    except OSError as e:
        raise PairsError(f"cannot read {path}: {e.strerror or e}") from None
    if not data:
        raise PairsError(f"{path} is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise PairsError(f"{path}:{line}: not UTF-8 text (bad byte at offset {e.start})") from None
    sources, targets = parse_pairs(text, path)
    target_chars = sorted(set("".join(targets)))
    if not target_chars:
        raise PairsError(f"{path}: every target is empty; there is nothing to learn")
    return Pairs(path, sources, targets, CharCodec(sorted(set("".join(sources)))), CharCodec(target_chars),
                 hashlib.sha256(data).hexdigest())


@dataclass
class Encoded:
    sources: list[np.ndarray]       # source ids
    targets: list[np.ndarray]       # target ids, END appended

    def __len__(self) -> int:
        return len(self.sources)


def encode(pairs: Pairs, index: np.ndarray) -> Encoded:
    src = [np.array(pairs.source_codec.encode(pairs.sources[i]), np.int64) for i in index]
    tgt = [np.array(pairs.target_codec.encode(pairs.targets[i]) + [pairs.end], np.int64) for i in index]
    return Encoded(src, tgt)


def split(pairs: Pairs, val_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation pairs: a fixed shuffle of the file (the same
    whatever --seed), its tail held out, so runs with other seeds validate on the same pairs."""
    order = np.random.default_rng(0).permutation(len(pairs.sources))
    n_val = int(round(len(order) * val_frac))
    if val_frac > 0:
        n_val = max(1, n_val)
    return order[:len(order) - n_val], order[len(order) - n_val:]


@dataclass
class Batch:
    src: torch.Tensor           # (T, B) source ids, padded with 0
    src_len: torch.Tensor       # (B,) source lengths (int64)
    tgt_in: torch.Tensor        # (U, B) the decoder's inputs: BEGIN, then the target
    tgt_out: torch.Tensor       # (U, B) what each step should give: the target, then END
    tgt_mask: torch.Tensor      # (U, B) True where tgt_out is a real token
    rows: np.ndarray            # which pairs of the split, in order

    @property
    def tokens(self) -> int:
        return int(self.tgt_mask.sum())


def make_batch(data: Encoded, rows: np.ndarray, begin: int, device) -> Batch:
    T = max(len(data.sources[i]) for i in rows)
    U = max(len(data.targets[i]) for i in rows)
    src = np.zeros((T, len(rows)), np.int64)
    tgt_in = np.zeros((U, len(rows)), np.int64)
    tgt_out = np.zeros((U, len(rows)), np.int64)
    mask = np.zeros((U, len(rows)), bool)
    for b, i in enumerate(rows):
        s, t = data.sources[i], data.targets[i]
        src[:len(s), b] = s
        tgt_out[:len(t), b] = t
        tgt_in[0, b] = begin
        tgt_in[1:len(t), b] = t[:-1]
        mask[:len(t), b] = True
    lengths = np.array([len(data.sources[i]) for i in rows], np.int64)
    as_t = lambda a: torch.from_numpy(a).to(device)          # noqa: E731
    return Batch(as_t(src), as_t(lengths), as_t(tgt_in), as_t(tgt_out), as_t(mask), np.asarray(rows))


class Buckets:
    """The training batches of one epoch, a function of (seed, epoch) alone: the pairs are
    shuffled, sorted by length within pools of BUCKET_POOL batches (so a batch holds pairs
    of similar length and pads little), cut into batches, and the batches shuffled."""

    def __init__(self, data: Encoded, batch: int, seed: int, begin: int, device):
        self.data, self.batch, self.seed, self.begin, self.device = data, batch, seed, begin, device
        self.count = max(1, len(data) // batch)
        self._epoch, self._plan = None, None

    def __len__(self) -> int:
        return self.count

    def plan(self, epoch: int) -> list[np.ndarray]:
        if self._epoch != epoch:
            rng = np.random.default_rng((self.seed, epoch))
            order = rng.permutation(len(self.data))[:self.count * self.batch]
            src = np.array([len(self.data.sources[i]) for i in order])
            tgt = np.array([len(self.data.targets[i]) for i in order])
            pool = BUCKET_POOL * self.batch
            for a in range(0, len(order), pool):         # by source length, then target length
                order[a:a + pool] = order[a:a + pool][np.lexsort((tgt[a:a + pool], src[a:a + pool]))]
            batches = order.reshape(self.count, self.batch)
            self._plan = [batches[k] for k in rng.permutation(self.count)]
            self._epoch = epoch
        return self._plan

    def at_step(self, step: int) -> Batch:
        """The batch of optimizer step `step` (0-based)."""
        rows = self.plan(step // self.count)[step % self.count]
        return make_batch(self.data, rows, self.begin, self.device)


def eval_batches(data: Encoded, batch: int, begin: int, device) -> list[Batch]:
    """The whole split in batches sorted by length (padding little), each pair once."""
    order = np.argsort([len(s) for s in data.sources], kind="stable")
    return [make_batch(data, order[a:a + batch], begin, device) for a in range(0, len(order), batch)]

"""The trainer: truncated BPTT with Adam over the IR's torch backend, checkpoints that
survive any crash, and a .nnb of the best validation weights at the end.

Data layout: the training ids are cut into `batch` contiguous rows; step k reads the
k-th window of `seq_len` tokens of every row, so the state carried from one step to the
next continues the same text. The state is reset at the start of each epoch. Everything
is a function of the step number, which is what makes a resumed run identical to an
uninterrupted one.
"""

from __future__ import annotations

import math
import signal
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .compiler import compile_kernel, write_model
from .corpus import Corpus
from .progress import Progress
from .torch_backend import TorchNetwork, init_tensors


class TrainError(Exception):
    """A training run that cannot start or go on; the message says why."""


@dataclass
class TrainConfig:
    kernel: str = "lstm"
    hidden: int = 128
    layers: int = 2
    seq_len: int = 64
    batch: int = 32
    steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-3
    clip: float = 5.0
    eval_every: int = 200
    val_frac: float = 0.05
    seed: int = 0
    device: str = "auto"
    codec: str = "char"
    checkpoint_every: int | None = None
    max_eval_tokens: int = 1 << 17

    def check(self) -> None:
        for name in ("hidden", "layers", "seq_len", "batch", "eval_every"):
            if getattr(self, name) <= 0:
                raise TrainError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.steps is not None and self.steps <= 0:
            raise TrainError("--steps must be > 0")
        if self.epochs is not None and not self.epochs > 0:
            raise TrainError("--epochs must be > 0")
        if not 0 <= self.val_frac < 1:
            raise TrainError("--val-frac must be in [0, 1)")
        if not self.lr > 0 or not self.clip > 0:
            raise TrainError("--lr and --clip must be > 0")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise TrainError("--checkpoint-every must be > 0")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)")
    if name not in ("cpu", "cuda"):
        raise TrainError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


class Batches:
    """Windows of a token stream laid out as `rows` contiguous rows; batch k -> (x, y), (T, B)."""

    def __init__(self, ids: np.ndarray, rows: int, seq_len: int, device):
        per_row = len(ids) // rows
        data = torch.from_numpy(ids[:rows * per_row].astype(np.int64)).view(rows, per_row)
        self.data = data.t().contiguous().to(device)       # (time, rows): a window is a slice
        self.seq_len = seq_len
        self.count = (per_row - 1) // seq_len

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int):
        a = k * self.seq_len
        return self.data[a:a + self.seq_len], self.data[a + 1:a + self.seq_len + 1]


def split(corpus: Corpus, cfg: TrainConfig, device):
    n = len(corpus.ids)
    n_val = int(n * cfg.val_frac)
    train_ids, val_ids = corpus.ids[:n - n_val], corpus.ids[n - n_val:][:cfg.max_eval_tokens]
    need = cfg.batch * (cfg.seq_len + 1)
    if len(train_ids) < need:
        raise TrainError(f"{corpus.path} is too short: {len(train_ids):,} training tokens, one batch needs "
                         f"{need:,} (--batch {cfg.batch} × (--seq-len {cfg.seq_len} + 1)); "
                         "use a longer corpus or smaller --batch/--seq-len")
    train = Batches(train_ids, cfg.batch, cfg.seq_len, device)
    val_rows = min(cfg.batch, len(val_ids) // (cfg.seq_len + 1))
    val = Batches(val_ids, val_rows, cfg.seq_len, device) if val_rows > 0 else None
    return train, val


def _detach(state):
    return [[s.detach() for s in layer] for layer in state]


@torch.no_grad()
def evaluate(net: TorchNetwork, batches: Batches, vocab: int) -> float:
    """Mean cross-entropy (nats/token) over a whole split, state carried across windows."""
    state = net.initial_state(batches.data.shape[1])
    total, count = 0.0, 0
    for k in range(len(batches)):
        x, y = batches[k]
        logits, state = net(x, state)
        total += F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return total / count


class Interrupted(Exception):
    """Training stopped by Ctrl-C after saving; the message says where things are."""


class Trainer:
    def __init__(self, cfg: TrainConfig, corpus: Corpus, out_path: str, ckpt_path: str,
                 resume: "TrainState | None" = None, stream=None):
        cfg.check()
        self.cfg, self.corpus, self.out_path, self.ckpt_path = cfg, corpus, out_path, ckpt_path
        self.device = pick_device(cfg.device)
        self.vocab = len(corpus.codec.vocab)
        self.compiled = compile_kernel(cfg.kernel, cfg.hidden, cfg.layers, self.vocab)
        self.train, self.val = split(corpus, cfg, self.device)
        self.total = cfg.steps if cfg.steps else max(1, math.ceil((cfg.epochs or 1.0) * len(self.train)))
        torch.manual_seed(cfg.seed)
        self.ts = resume or TrainState.fresh(init_tensors(self.compiled.network, cfg.seed), cfg, corpus.sha256)
        self.net = TorchNetwork(self.compiled.network, self.ts.tensors).to(self.device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        if resume is not None:
            resume.restore(self.net, self.opt, self.device)
        self.stream = stream
        self._stop = False

    def _on_sigint(self, signum, frame):
        self._stop = True
        signal.signal(signal.SIGINT, signal.default_int_handler)   # a second Ctrl-C stops at once

    def provenance(self, rate: float) -> dict:
        ts = self.ts
        return {"corpus": str(self.corpus.path), "corpus_sha256": self.corpus.sha256,
                "corpus_tokens": int(len(self.corpus.ids)), "steps": ts.step,
                "train_loss": ts.last_train, "val_loss": ts.last_val, "best_val_loss": ts.best_val,
                "best_step": ts.best_step, "chars_per_s": round(rate), "device": str(self.device),
                "torch": torch.__version__, "hyperparameters": asdict(self.cfg)}

    def step(self, state):
        k = self.ts.step % len(self.train)
        if k == 0 or state is None:
            state = self.net.initial_state(self.cfg.batch)
        x, y = self.train[k]
        logits, state = self.net(x, state)
        loss = F.cross_entropy(logits.reshape(-1, self.vocab), y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.clip)
        self.opt.step()
        return loss.item(), _detach(state)

    def run(self) -> dict:
        cfg, ts = self.cfg, self.ts
        every_ckpt = cfg.checkpoint_every or cfg.eval_every
        state = ts.carried_state(self.device)
        chars = cfg.batch * cfg.seq_len
        old = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            with Progress(self.total, ts.step, self.stream) as progress:
                while ts.step < self.total and not self._stop:
                    loss, state = self.step(state)
                    if not math.isfinite(loss):
                        raise TrainError(f"the loss became {loss} at step {ts.step + 1}; stopped. The last good "
                                         f"checkpoint is {self.ckpt_path} (step {ts.saved_step}); "
                                         "try a lower --lr or --clip")
                    ts.step += 1
                    ts.last_train = loss
                    val = self._maybe_eval()
                    progress.update(ts.step, loss, val, chars, force=val is not None)
                    if ts.step % every_ckpt == 0 or ts.step == self.total or self._stop:
                        self._save_checkpoint(state, progress.rate)
                rate = progress.rate
                best = ts.best_tensors if ts.best_tensors is not None else self.net.numpy_tensors()
                write_model(self.out_path, self.compiled, best, self.corpus.codec, self.provenance(rate))
        finally:
            signal.signal(signal.SIGINT, old)
        if self._stop:
            raise Interrupted(f"interrupted at step {ts.step}: checkpoint {self.ckpt_path}, best weights so far "
                              f"in {self.out_path}; continue with --resume")
        return self.provenance(rate)

    def _maybe_eval(self) -> float | None:
        ts = self.ts
        if self.val is None or (ts.step % self.cfg.eval_every and ts.step != self.total and not self._stop):
            return None
        ts.last_val = evaluate(self.net, self.val, self.vocab)
        if ts.best_val is None or ts.last_val < ts.best_val:
            ts.best_val, ts.best_step = ts.last_val, ts.step
            ts.best_tensors = self.net.numpy_tensors()
        return ts.last_val

    def _save_checkpoint(self, state, rate: float) -> None:
        self.ts.capture(self.net, self.opt, state)
        save_checkpoint(self.ckpt_path, self.compiled, self.corpus.codec, self.provenance(rate), self.ts)
        self.ts.saved_step = self.ts.step

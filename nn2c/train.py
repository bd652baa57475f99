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
import time
import signal
import threading
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import TrainState, save_checkpoint
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
    dropout: float = 0.0
    max_minutes: float | None = None
    max_eval_tokens: int = 1 << 17

    def check(self) -> None:
        if not 0 <= self.dropout < 1:
            raise TrainError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise TrainError(f"--max-minutes must be > 0, got {self.max_minutes}")
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
    """Windows of a token stream laid out as `rows` contiguous rows; batch k -> (x, y), (T, B).

    The ids stay where the corpus put them (a view, 1 byte a token for most corpora); only
    the window a step reads is widened to int64 and moved to the device."""

    def __init__(self, ids: np.ndarray, rows: int, seq_len: int, device):
        per_row = len(ids) // rows
        self.data = ids[:rows * per_row].reshape(rows, per_row)
        self.rows, self.seq_len, self.device = rows, seq_len, device
        self.count = (per_row - 1) // seq_len

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int):
        a = k * self.seq_len
        window = np.ascontiguousarray(self.data[:, a:a + self.seq_len + 1].T, dtype=np.int64)
        w = torch.from_numpy(window).to(self.device)
        return w[:-1], w[1:]


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
    state = net.initial_state(batches.rows)
    total, count = 0.0, 0
    net.eval()                      # no dropout
    for k in range(len(batches)):
        x, y = batches[k]
        logits, state = net(x, state)
        total += F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    net.train()
    return total / count


def _check_fits(ts: TrainState, compiled, ckpt_path: str) -> None:
    """A checkpoint resumes only the kernel it was trained with, at the same sizes."""
    if ts.kernel_source is not None and ts.kernel_source != compiled.kernel.source:
        raise TrainError(f"--resume: kernel {compiled.kernel_name} has changed since {ckpt_path} was written; "
                         "train afresh without --resume")
    want = {name: tuple(spec.shape) for name, spec in compiled.network.tensors().items()}
    have = {name: tuple(a.shape) for name, a in ts.tensors.items()}
    carried = [tuple(a.shape[1:]) for layer in ts.carried for a in layer]
    widths = [(prev.width,) for cell in compiled.network.cells for _, prev, _ in cell.states]
    if want != have or (carried and carried != widths):
        raise TrainError(f"--resume: the weights in {ckpt_path} do not fit kernel {compiled.kernel_name} "
                         "as compiled now; train afresh without --resume")


class Interrupted(Exception):
    """Training stopped by Ctrl-C after saving; the message says where things are."""


class Diverged(TrainError):
    """The loss or the gradients stopped being finite; the weights were not updated."""


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
        if resume is not None:
            _check_fits(resume, self.compiled, ckpt_path)
        torch.manual_seed(cfg.seed)
        self.ts = resume or TrainState.fresh(init_tensors(self.compiled.network, cfg.seed), cfg, corpus.sha256)
        self.net = TorchNetwork(self.compiled.network, self.ts.tensors, dropout=cfg.dropout).to(self.device)
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
                "loop": self.net.loop_kind(),
                "torch": torch.__version__, "hyperparameters": asdict(self.cfg)}

    def step(self, state):
        """One optimizer step. Raises Diverged, leaving the weights as they were, when the loss
        or the gradient norm is not finite, so a diverged step never reaches a checkpoint."""
        k = self.ts.step % len(self.train)
        if k == 0 or state is None:
            state = self.net.initial_state(self.cfg.batch)
        x, y = self.train[k]
        logits, state = self.net(x, state)
        loss = F.cross_entropy(logits.reshape(-1, self.vocab), y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.clip)
        value, norm = torch.stack([loss.detach(), norm]).tolist()      # one wait on the device
        if not math.isfinite(value):
            raise self._diverged(f"the loss became {value}")
        if not math.isfinite(norm):
            raise self._diverged(f"the gradients became {norm}")
        self.opt.step()
        return value, _detach(state)

    def _diverged(self, what: str) -> Diverged:
        ts = self.ts
        kept = (f"the last good checkpoint is {self.ckpt_path} (step {ts.saved_step})" if ts.saved_step
                else "no checkpoint was written yet")
        return Diverged(f"{what} at step {ts.step + 1} (--lr {self.cfg.lr:g}); stopped: {kept}; "
                        "try a lower --lr or --clip")

    def run(self) -> dict:
        """Train to the last step (or until Ctrl-C), checkpointing; write the .nnb of the best weights."""
        watch = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, self._on_sigint) if watch else None
        try:
            limit = 60 * self.cfg.max_minutes if self.cfg.max_minutes else None
            with Progress(self.total, self.ts.step, self.stream, seconds=limit) as progress:
                self._loop(progress)
                rate = progress.rate
            best = self.ts.best_tensors if self.ts.best_tensors is not None else self.net.numpy_tensors()
            self._write(self.out_path, write_model, self.out_path, self.compiled, best, self.corpus.codec,
                        self.provenance(rate))
        finally:
            if watch:
                signal.signal(signal.SIGINT, old)
        if self.ts.step < self.total:
            raise Interrupted(f"interrupted at step {self.ts.step}: checkpoint {self.ckpt_path}, best weights so "
                              f"far in {self.out_path}; continue with --resume")
        return self.provenance(rate)

    def _loop(self, progress: Progress) -> None:
        cfg, ts = self.cfg, self.ts
        every_ckpt = cfg.checkpoint_every or cfg.eval_every
        state = ts.carried_state(self.device)
        chars = cfg.batch * cfg.seq_len
        deadline = progress.deadline         # --max-minutes, counted from the progress clock
        while ts.step < self.total and not self._stop:
            loss, state = self.step(state)
            ts.step += 1
            if deadline is not None and time.monotonic() > deadline:
                self.total = ts.step            # out of time: this step is the last one
            ts.last_train = loss
            val = self._maybe_eval()
            progress.update(ts.step, loss, val, chars, force=val is not None)
            if ts.step % every_ckpt == 0 or ts.step == self.total or self._stop:
                self._save_checkpoint(state, progress.rate)

    def _maybe_eval(self) -> float | None:
        """Validate on schedule only (not on Ctrl-C), so an interrupted and resumed run
        picks the same best weights as an uninterrupted one."""
        ts = self.ts
        if self.val is None or (ts.step % self.cfg.eval_every and ts.step != self.total):
            return None
        ts.last_val = evaluate(self.net, self.val, self.vocab)
        if ts.best_val is None or ts.last_val < ts.best_val:
            ts.best_val, ts.best_step = ts.last_val, ts.step
            ts.best_tensors = self.net.numpy_tensors()
        return ts.last_val

    def _save_checkpoint(self, state, rate: float) -> None:
        self.ts.capture(self.net, self.opt, state)
        self._write(self.ckpt_path, save_checkpoint, self.ckpt_path, self.compiled, self.corpus.codec,
                    self.provenance(rate), self.ts)
        self.ts.saved_step = self.ts.step

    def _write(self, path: str, writer, *args) -> None:
        """Run an (atomic) writer; a failure is one line naming the file and what is kept."""
        try:
            writer(*args)
        except OSError as e:
            kept = (f"the last good checkpoint is {self.ckpt_path} (step {self.ts.saved_step})"
                    if self.ts.saved_step else "nothing was written")
            raise TrainError(f"cannot write {path}: {e.strerror or e}; {kept}") from None

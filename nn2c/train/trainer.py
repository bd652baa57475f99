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
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from nn2c.backend.network import TorchNetwork, init_tensors
from nn2c.backend.precision import PRECISIONS
from nn2c.compiler.pipeline import compile_kernel, write_model
from nn2c.train.checkpoint import TrainState, save_checkpoint
from nn2c.train.corpus import Batches, Corpus
from nn2c.train.distributed import Collective, World, split_error
from nn2c.train.memory import BYTES_PER_PARAMETER, fmt_bytes, free_memory
from nn2c.train.progress import Progress, TrainLog
from nn2run.model import MAX_LAYERS


class TrainError(Exception):
    """A training run that cannot start or go on; the message says why."""


class Options:
    """A trainer's options: a dataclass read back from a checkpoint's record."""

    @classmethod
    def from_dict(cls, d: dict):
        """The options recorded in `d`, ignoring names this build does not have."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_ranges(cfg, positive, fractions) -> None:
    """The options both trainers range-check, each refused in one line that names it:
    `positive` integers > 0 (or None), the seed, the finite positive numbers, `fractions` in [0, 1)."""
    for name in positive:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise TrainError(f"{_flag(name)} must be > 0, got {value}")
    if cfg.layers > MAX_LAYERS:
        raise TrainError(f"--layers must be ≤ {MAX_LAYERS} (the most nn2run loads), got {cfg.layers}")
    if not 0 <= cfg.seed < 2 ** 63:
        raise TrainError(f"--seed must be an integer from 0 to 2^63-1, got {cfg.seed}")
    for name in ("lr", "clip", "epochs", "max_minutes"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise TrainError(f"{_flag(name)} must be a finite number > 0, got {value}")
    for name in fractions:
        if not 0 <= getattr(cfg, name) < 1:
            raise TrainError(f"{_flag(name)} must be in [0, 1), got {getattr(cfg, name)}")


@dataclass
class TrainConfig(Options):
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
    precision: str = "fp32"         # what the products compute in (nn2c.backend.precision)

    def check(self) -> None:
        """Every option in range, each refused in one line that names it."""
        check_ranges(self, ("hidden", "layers", "seq_len", "batch", "eval_every", "steps", "checkpoint_every"),
                     ("dropout", "val_frac"))
        if self.precision not in PRECISIONS:
            raise TrainError(f"--precision must be {' or '.join(PRECISIONS)}, got {self.precision!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def pick_device(name: str, world: World | None = None) -> torch.device:
    """The device to train on; in a job on GPUs, the GPU of this process's local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)")
    if name not in ("cpu", "cuda"):
        raise TrainError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and world is not None:
        if world.local_rank >= torch.cuda.device_count():
            raise TrainError(f"process {world.rank} needs GPU {world.local_rank}, and this machine has "
                             f"{torch.cuda.device_count()}: run at most one process per GPU")
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


def split(corpus: Corpus, cfg: TrainConfig, device, part: tuple[int, int] | None = None):
    n = len(corpus.ids)
    n_val = int(n * cfg.val_frac)
    train_ids, val_ids = corpus.ids[:n - n_val], corpus.ids[n - n_val:][:cfg.max_eval_tokens]
    need = cfg.batch * (cfg.seq_len + 1)
    if len(train_ids) < need:
        raise TrainError(f"{corpus.path} is too short: {len(train_ids):,} training tokens, one batch needs "
                         f"{need:,} (--batch {cfg.batch} × (--seq-len {cfg.seq_len} + 1)); "
                         "use a longer corpus or smaller --batch/--seq-len")
    train = Batches(train_ids, cfg.batch, cfg.seq_len, device, part)
    if cfg.val_frac == 0:
        return train, None              # asked for: the file will hold the final weights
    window = cfg.seq_len + 1
    if len(val_ids) < window:
        raise TrainError(f"--val-frac {cfg.val_frac:g} holds out {len(val_ids):,} of the {n:,} tokens of "
                         f"{corpus.path}, less than one validation window ({window:,}: --seq-len {cfg.seq_len} + 1); "
                         "give a larger --val-frac or a smaller --seq-len, or --val-frac 0 to train without "
                         "validation (the file then holds the final weights)")
    val_rows = min(cfg.batch, len(val_ids) // window)
    return train, Batches(val_ids, val_rows, cfg.seq_len, device)


# float32 weights, their gradients and Adam's two moments (16 bytes), and the copies a
# checkpoint is written from: weights, both moments and the best weights (16 more).
READ_EVERY = 50                # steps between reads of the loss on a GPU (as often as progress lines)
READ_EVERY_CPU = 1             # on the CPU nothing is queued: a read costs nothing
INIT_PROBE_WINDOWS = 64        # a loss that fails this early in an epoch is checked against the initial weights


def check_memory(compiled, cfg: TrainConfig, device) -> None:
    """Refuse, before anything is allocated, a model whose training cannot fit in memory."""
    params = sum(math.prod(spec.shape) for spec in compiled.network.tensors().values())
    widths = sum(node.width for cell in compiled.network.all_cells for node in cell.nodes() if node.op != "param")
    activations = cfg.seq_len * cfg.batch * widths * 4 * 2      # each value and its gradient
    need = params * BYTES_PER_PARAMETER + activations
    where, have = free_memory(device)
    if device.type == "cuda":
        need -= params * BYTES_PER_PARAMETER // 2        # the checkpoint copies stay in host memory
    if have is not None and need > have:
        raise TrainError(
            f"a {cfg.layers}×{cfg.hidden} {compiled.kernel_name} needs about {fmt_bytes(need)} to train "
            f"({params:,} parameters × {BYTES_PER_PARAMETER} bytes for the weights, gradients, Adam's moments "
            f"and checkpoint copies, plus {fmt_bytes(activations)} of activations for --batch {cfg.batch} × "
            f"--seq-len {cfg.seq_len}); {fmt_bytes(have)} of memory is {where}; "
            "use a smaller --hidden, --layers, --batch or --seq-len")


def _detach(state):
    return [[s.detach() for s in layer] for layer in state]


@torch.no_grad()
def evaluate(net: TorchNetwork, batches: Batches, vocab: int) -> float:
    """Mean cross-entropy (nats/token) over a whole split, state carried across windows; the
    sum stays on the device (float64) and is read once, at the end."""
    state = net.initial_state(batches.rows)
    total = torch.zeros((), dtype=torch.float64, device=batches.device)
    count = 0
    net.eval()                      # no dropout
    for k in range(len(batches)):
        x, y = batches[k]
        logits, state = net(x, state)
        total += F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="sum")
        count += y.numel()
    net.train()
    return total.item() / count


class Health:
    """Whether training is still finite, decided on the device without waiting for it (as
    GradScaler's found_inf is). `bad` is sticky: once a step's loss or gradient norm is not
    finite, Adam skips that update and every later one (`found_inf`), so the weights stay
    those before the failing step until the trainer next reads, which raises Diverged."""

    def __init__(self, device):
        self.bad = torch.zeros((), device=device)                  # 0. or 1., Adam's found_inf
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.loss = torch.zeros((), device=device)
        self.norm = torch.zeros((), device=device)

    def update(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        now = ~(torch.isfinite(loss) & torch.isfinite(norm))
        first = now & (self.bad == 0)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss, self.loss)
        self.norm = torch.where(first, norm.to(self.norm.dtype), self.norm)
        self.bad = torch.maximum(self.bad, now.to(self.bad.dtype))

    def read(self, loss: torch.Tensor) -> tuple[float, tuple | None]:
        """(the loss, None) or, after a failure, (…, (failing step, its loss, its norm)): one wait."""
        bad, step, failed_loss, norm, value = torch.stack(
            [t.double() for t in (self.bad, self.step, self.loss, self.norm, loss)]).tolist()
        return value, ((int(step), failed_loss, norm) if bad else None)


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

    exit_status = 130


class Diverged(TrainError):
    """The loss or the gradients stopped being finite; the weights were not updated."""


class Trainer:
    def __init__(self, cfg: TrainConfig, corpus: Corpus, out_path: str, ckpt_path: str,
                 resume: TrainState | None = None, stream=None, log_path: str | None = None):
        cfg.check()
        self.cfg, self.corpus, self.out_path, self.ckpt_path = cfg, corpus, out_path, ckpt_path
        self.world = World.from_env()
        if self.world is not None and split_error(cfg.batch, self.world.size):
            raise TrainError(split_error(cfg.batch, self.world.size))
        self.rank = self.world.rank if self.world else 0
        self.device = pick_device(cfg.device, self.world)
        self.vocab = len(corpus.codec.vocab)
        self.compiled = compile_kernel(cfg.kernel, cfg.hidden, cfg.layers, self.vocab)
        check_memory(self.compiled, cfg, self.device)
        self.train, self.val = split(corpus, cfg, self.device, self.world and self.world.rows(cfg.batch))
        if self.rank != 0:
            self.val = None                 # rank 0 validates (and writes everything)
        self.total = cfg.steps if cfg.steps else max(1, math.ceil((cfg.epochs or 1.0) * len(self.train)))
        if resume is not None:
            _check_fits(resume, self.compiled, ckpt_path)
        torch.manual_seed(cfg.seed + self.rank)      # each rank its own dropout masks
        self.ts = resume or TrainState.fresh(init_tensors(self.compiled.network, cfg.seed), cfg, corpus.sha256)
        self.net = TorchNetwork(self.compiled.network, self.ts.tensors, dropout=cfg.dropout,
                                precision=cfg.precision).to(self.device)
        if cfg.precision == "bf16" and self.device.type == "cuda":
            # cuBLAS may otherwise sum a bf16 product's split parts in bf16: keep the sums float32
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        self.params = list(self.net.parameters())
        # fused: one kernel for the whole update, and it takes found_inf (see Health)
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, fused=True)
        self.notes = []
        if resume is not None:
            self.notes += resume.restore(self.net, self.opt, self.device, self.rank, self.world_size)
        self.health = Health(self.device)
        # the loss is read (a wait for the device) only this often, and at evaluations and
        # checkpoints; on the CPU nothing is queued, so reading every step costs nothing
        self.read_every = READ_EVERY_CPU if self.device.type == "cpu" else READ_EVERY
        self.stream = stream
        self.log_path = log_path
        self.first_step, self.resumed = self.ts.step, resume is not None
        self.elapsed_before = self.ts.elapsed_s       # training seconds of the runs this one continues
        self._stop = False                   # Ctrl-C (or, in a job, SIGTERM) asked for a stop
        self._halt = self._late = False      # stop now / out of time: in a job, agreed by every rank
        self._flags = None
        self._deadline = None
        self.collective = Collective(self.world, self.device) if self.world else None

    @property
    def world_size(self) -> int:
        return self.world.size if self.world else 1

    def _on_sigint(self, signum, frame):
        self._stop = True
        signal.signal(signal.SIGINT, signal.default_int_handler)   # a second Ctrl-C stops at once

    def provenance(self, rate: float) -> dict:
        ts = self.ts
        validated = ts.best_val is not None
        return {"corpus": os.path.abspath(self.corpus.path), "corpus_sha256": self.corpus.sha256,
                "corpus_tokens": int(len(self.corpus.ids)), "steps": ts.step,
                "weights": "best validation loss" if validated else
                           "final (no validation: --val-frac 0)" if self.val is None else "final (not validated yet)",
                "train_loss": ts.last_train, "val_loss": ts.last_val, "best_val_loss": ts.best_val,
                "best_step": ts.best_step if validated else None, "chars_per_s": round(rate),
                "device": str(self.device), "world_size": self.world_size,
                "loop": self.net.loop_kind(), "precision": self.cfg.precision,
                "torch": torch.__version__, "hyperparameters": asdict(self.cfg)}

    def step(self, state):
        """One optimizer step, queued without waiting for the device: returns the loss (a 0-d
        tensor) and the state. A step whose loss or gradient norm is not finite leaves the
        weights as they were (and so does every step after it) until `read` raises Diverged,
        so a diverged step never reaches a checkpoint."""
        k = self.ts.step % len(self.train)
        if k == 0 or state is None:
            state = self.net.initial_state(self.train.rows)
        x, y = self.train[k]
        logits, state = self.net(x, state)
        loss = F.cross_entropy(logits.reshape(-1, self.vocab), y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach()
        late = self._deadline is not None and time.monotonic() > self._deadline
        if self.collective is not None:         # the mean gradient and loss of the whole batch
            loss, self._flags = self.collective.average(self.params, loss, self._stop, late)
        else:
            self._halt, self._late = self._stop, late
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip)
        self.health.update(self.ts.step + 1, loss, norm)
        self.opt.found_inf = self.health.bad
        self.opt.step()
        return loss, _detach(state)

    def read(self, loss: torch.Tensor) -> float:
        """The loss as a number (one wait for the device); Diverged if a step since the last
        read was not finite, naming that step."""
        value, failed = self.health.read(loss)
        if self._flags is not None:             # what every rank asked, the same on all of them
            stops, lates = self._flags.tolist()
            self._halt, self._late = stops > 0, lates > 0
        if failed is not None:
            step, failed_loss, norm = failed
            self.ts.step = step - 1              # the weights are those from before it
            raise self._diverged(f"the loss became {failed_loss}" if not math.isfinite(failed_loss)
                                 else f"the gradients became {norm}")
        return value

    def _diverged(self, what: str) -> Diverged:
        ts, kept = self.ts, self._kept()
        if ts.step == 0 or self._overflows_at_init():
            when = ("with the initial weights, before any update" if ts.step == 0 else
                    "and the initial weights give non-finite values on the same text too")
            return Diverged(f"{what} at step {ts.step + 1} {when}: kernel {self.compiled.kernel_name} overflows "
                            f"as written, so --lr is not the cause; stopped: {kept}; bound what grows without "
                            "limit (e.g. exp of an unbounded sum) with σ or tanh")
        return Diverged(f"{what} at step {ts.step + 1} (--lr {self.cfg.lr:g}); stopped: {kept}; "
                        "try a lower --lr or --clip")

    def _kept(self) -> str:
        return (f"the last good checkpoint is {self.ckpt_path} (step {self.ts.saved_step})" if self.ts.saved_step
                else "no checkpoint was written yet")

    def _overflows_at_init(self) -> bool:
        """Whether the initial weights, run over this epoch's windows up to the failing one,
        give a non-finite loss or gradient: then the kernel overflows, whatever the rate.
        Only tried early in an epoch, where replaying the windows is cheap."""
        k = self.ts.step % len(self.train)
        if k >= INIT_PROBE_WINDOWS:
            return False
        net = TorchNetwork(self.compiled.network, init_tensors(self.compiled.network, self.cfg.seed)).to(self.device)
        net.eval()
        state = net.initial_state(self.train.rows)
        for j in range(k + 1):
            x, y = self.train[j]
            logits, state = net(x, state)
            loss = F.cross_entropy(logits.reshape(-1, self.vocab), y.reshape(-1))
            net.zero_grad(set_to_none=True)
            loss.backward()
            if not (torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())):
                return True
            state = _detach(state)
        return False

    def run(self) -> dict:
        """Train to the last step (or until Ctrl-C), checkpointing; write the .nnb of the best weights."""
        watch = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, self._on_sigint) if watch else None
        # in a job every rank gets the launcher's (or torchrun's) SIGTERM: stop together, saved
        old_term = signal.signal(signal.SIGTERM, self._on_sigint) if watch and self.world else None
        try:
            if self.ts.step >= self.total:        # a resumed run already at its end: nothing to time
                rate = self.ts.chars_per_s
            else:
                limit = 60 * self.cfg.max_minutes if self.cfg.max_minutes else None
                log = (TrainLog(self.log_path, self.ts.step if self.resumed else None)
                       if self.log_path and self.rank == 0 else None)
                try:
                    with Progress(self.total, self.ts.step, self.stream, seconds=limit) as progress:
                        self._loop(progress, log)
                        rate = progress.rate
                finally:
                    if log is not None:
                        log.close()
            if self.rank == 0:
                best = self.ts.best_tensors if self.ts.best_tensors is not None else self.net.numpy_tensors()
                self._write(self.out_path, write_model, self.out_path, self.compiled, best, self.corpus.codec,
                            self.provenance(rate))
        finally:
            if watch:
                signal.signal(signal.SIGINT, old)
                if old_term is not None:
                    signal.signal(signal.SIGTERM, old_term)
            if self.collective is not None:
                self.collective.close()
        if self.ts.step < self.total:
            raise Interrupted(f"interrupted at step {self.ts.step}: checkpoint {self.ckpt_path}, best weights so "
                              f"far in {self.out_path}; continue with --resume")
        return {**self.provenance(rate), "steps_run": self.ts.step - self.first_step, "total_steps": self.total}

    def _loop(self, progress: Progress, log: TrainLog | None) -> None:
        cfg, ts = self.cfg, self.ts
        every_ckpt = cfg.checkpoint_every or cfg.eval_every
        state = ts.carried_state(self.device, self.world and self.world.rows(cfg.batch))
        chars = cfg.batch * cfg.seq_len
        self._deadline = progress.deadline         # --max-minutes, counted from the progress clock
        while ts.step < self.total and not self._halt:
            loss, state = self.step(state)
            ts.step += 1
            value = None
            if ts.step % self.read_every == 0 or self._due(ts.step, every_ckpt):
                value = ts.last_train = self.read(loss)     # in a job, also the ranks' stop and time
            if self._late:
                self.total = ts.step            # out of time: this step is the last one
            evaluating = ts.step % cfg.eval_every == 0 or ts.step == self.total
            saving = ts.step % every_ckpt == 0 or ts.step == self.total or self._halt
            if (evaluating or saving) and value is None:
                value = ts.last_train = self.read(loss)
            val = self._evaluate() if evaluating else None
            progress.update(ts.step, value, val, chars, force=val is not None)
            ts.elapsed_s = self.elapsed_before + progress.elapsed
            if evaluating and log is not None:
                log.write(step=ts.step, train_loss=value, val_loss=val, chars_per_s=round(progress.rate),
                          elapsed_s=round(ts.elapsed_s, 3), lr=cfg.lr)
            if saving:
                self._save_checkpoint(state, progress.rate)

    def _due(self, step: int, every_ckpt: int) -> bool:
        return step % self.cfg.eval_every == 0 or step % every_ckpt == 0 or step == self.total

    def _evaluate(self) -> float | None:
        """Validate (on schedule only, not on Ctrl-C, so an interrupted and resumed run
        picks the same best weights as an uninterrupted one); None without validation."""
        ts = self.ts
        if self.val is None:
            return None
        ts.last_val = evaluate(self.net, self.val, self.vocab)
        if not math.isfinite(ts.last_val):
            raise Diverged(f"the validation loss became {ts.last_val} at step {ts.step} (--lr {self.cfg.lr:g}); "
                           f"stopped: {self._kept()}; try a lower --lr or --clip")
        if ts.best_val is None or ts.last_val < ts.best_val:
            ts.best_val, ts.best_step = ts.last_val, ts.step
            ts.best_tensors = self.net.numpy_tensors()
        return ts.last_val

    def _save_checkpoint(self, state, rate: float) -> None:
        self.ts.capture(self.net, self.opt, state, self.device)
        if self.collective is not None:
            parts = self.collective.gather((self.ts.carried, self.ts.torch_rng, self.ts.cuda_rng))
            self.ts.saved_step = self.ts.step
            if self.rank != 0:
                return
            self.ts.carried = [[np.concatenate([p[0][layer][i] for p in parts]) for i in range(len(arrays))]
                               for layer, arrays in enumerate(self.ts.carried)]
            self.ts.rank_rngs = [(p[1], p[2]) for p in parts[1:]]
        self.ts.world_size = self.world_size
        self._write(self.ckpt_path, save_checkpoint, self.ckpt_path, self.compiled, self.corpus.codec,
                    self.provenance(rate), self.ts)
        self.ts.saved_step = self.ts.step

    def _write(self, path: str, writer, *args) -> None:
        """Run an (atomic) writer; a failure is one line naming the file and what is kept."""
        try:
            writer(*args)
        except (OSError, ValueError) as e:      # ValueError: a file nn2run would refuse (a header too big)
            kept = (f"the last good checkpoint is {self.ckpt_path} (step {self.ts.saved_step})"
                    if self.ts.saved_step else "nothing was written")
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise TrainError(f"cannot write {path}: {reason}; {kept}") from None

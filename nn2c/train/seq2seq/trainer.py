"""The seq2seq trainer: teacher forcing over batches bucketed by length, the masked
cross-entropy (mean per target token, END included), Adam with gradient clipping, greedy
exact match on the validation split at every evaluation, the best weights kept (highest
exact match, then lowest validation loss), checkpoints and exact resume.

Everything a step does is a function of the step number (the batch plan is one of
(seed, epoch), see `pairs.Buckets`), so a run resumed from a checkpoint continues as the
uninterrupted run would, bit for bit on the same device and torch build.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass

import torch

from nn2c.compiler.ir import Seq2SeqNetwork
from nn2c.compiler.seq2seq import CompiledSeq2Seq, init_seq2seq_tensors, write_seq2seq
from nn2c.train.memory import BYTES_PER_PARAMETER, fmt_bytes, free_memory
from nn2c.train.progress import Progress, fmt_value
from nn2c.train.seq2seq.checkpoint import State, header, save_checkpoint
from nn2c.train.seq2seq.model import Seq2SeqTorch, masked_loss
from nn2c.train.seq2seq.pairs import Buckets, Pairs, encode, eval_batches, split
from nn2c.train.seq2seq.render import positional_nodes
from nn2c.train.trainer import (
    Diverged,
    Interrupted,
    Options,
    TrainError,
    check_ranges,
    pick_device,
)


@dataclass
class Seq2SeqConfig(Options):
    encoder: str = "gru"
    decoder: str = "seq2seq/bahdanau"
    hidden: int = 128
    layers: int = 1
    batch: int = 64
    steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-3
    clip: float = 5.0
    eval_every: int = 200
    val_frac: float = 0.05
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int | None = None
    max_minutes: float | None = None
    max_eval_pairs: int = 2000

    def check(self) -> None:
        check_ranges(self, ("hidden", "layers", "batch", "eval_every", "steps", "checkpoint_every", "max_eval_pairs"),
                     ("val_frac",))


class SeqProgress(Progress):
    exact: float | None = None

    def info(self) -> str:
        exact = "—" if self.exact is None else f"{100 * self.exact:.1f}%"
        return (f"loss {fmt_value(self.train)}  val {fmt_value(self.val)}  exact {exact}  "
                f"{self.rate:,.0f} pairs/s")


def check_memory(network: Seq2SeqNetwork, cfg: Seq2SeqConfig, lim: dict, device) -> None:
    """Refuse, before anything is allocated, a model whose training cannot fit in memory: the
    weights' copies, and each value of the longest batch with its gradient (a positional
    value of the decoder once per source position, at every target step)."""
    params = sum(math.prod(spec.shape) for spec in network.tensors().values())
    encoder = sum(n.width for cell in network.encoder for n in cell.nodes() if n.op != "param")
    nodes = network.decoder.nodes()
    pos = positional_nodes(nodes)
    decoder = sum(n.width * (lim["source"] if n in pos else 1) for n in nodes if n.op != "param")
    activations = cfg.batch * (lim["source"] * encoder + (lim["target"] + 1) * decoder) * 8
    need = params * BYTES_PER_PARAMETER + activations
    _, have = free_memory(device)
    if have is not None and need > have:
        raise TrainError(f"a {cfg.layers}×{cfg.hidden} seq2seq model needs about {fmt_bytes(need)} to train "
                         f"({params:,} parameters, and {fmt_bytes(activations)} of activations for --batch "
                         f"{cfg.batch} with sources of up to {lim['source']} and targets of up to {lim['target']} "
                         f"characters); {fmt_bytes(have)} is available; use a smaller --hidden, --layers or --batch")


def limits(pairs: Pairs) -> dict:
    return {"source": max(len(s) for s in pairs.sources), "target": max(len(t) for t in pairs.targets)}


class Seq2SeqTrainer:
    def __init__(self, cfg: Seq2SeqConfig, pairs: Pairs, build, out_path: str, ckpt_path: str,
                 resume: State | None = None, stream=None):
        cfg.check()
        self.cfg, self.pairs, self.out_path, self.ckpt_path, self.stream = cfg, pairs, out_path, ckpt_path, stream
        self.device = pick_device(cfg.device)
        self.compiled: CompiledSeq2Seq = build(cfg, len(pairs.source_codec.vocab), pairs.target_vocab)
        network = self.compiled.network
        self.sources = {"encoder": self.compiled.encoder_kernel.source, "decoder": self.compiled.decoder_kernel.source}
        check_memory(network, cfg, limits(pairs), self.device)
        train_idx, val_idx = split(pairs, cfg.val_frac)
        if len(train_idx) < cfg.batch:
            raise TrainError(f"{pairs.path} has {len(train_idx):,} training pairs, fewer than one batch "
                             f"(--batch {cfg.batch}); use more pairs or a smaller --batch")
        self.train = Buckets(encode(pairs, train_idx), cfg.batch, cfg.seed, pairs.begin, self.device)
        self.val_rows = val_idx[:cfg.max_eval_pairs]        # the pairs every evaluation decodes
        self.val = (eval_batches(encode(pairs, self.val_rows), cfg.batch, pairs.begin, self.device)
                    if len(val_idx) else None)
        self.total = cfg.steps if cfg.steps else max(1, math.ceil((cfg.epochs or 1.0) * len(self.train)))
        if resume is not None:
            self._check_fits(resume)
        torch.manual_seed(cfg.seed)
        self.st = resume or State.fresh(init_seq2seq_tensors(network, cfg.seed), cfg, pairs.sha256)
        self.net = Seq2SeqTorch(network, self.st.tensors).to(self.device)
        self.params = list(self.net.parameters())
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr, fused=True)
        if resume is not None:
            resume.restore(self.net, self.opt, self.device)
        names = {"encoder": self.compiled.encoder_name, "decoder": self.compiled.decoder_name}
        self.head = header(network, names, self.sources, pairs, limits(pairs), {})
        self.first_step, self.elapsed_before = self.st.step, self.st.elapsed_s
        self._stop = False

    def _check_fits(self, st: State) -> None:
        if st.sources is not None and st.sources != self.sources:
            raise TrainError(f"--resume: the kernels have changed since {self.ckpt_path} was written; "
                             "train afresh without --resume")
        want = {n: tuple(s.shape) for n, s in self.compiled.network.tensors().items()}
        if want != {n: tuple(a.shape) for n, a in st.tensors.items()}:
            raise TrainError(f"--resume: the weights in {self.ckpt_path} do not fit the network as compiled now; "
                             "train afresh without --resume")

    def _on_sigint(self, signum, frame):
        self._stop = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def step(self) -> float:
        b = self.train.at_step(self.st.step)
        logits = self.net(b.src, b.src_len, b.tgt_in)
        loss = masked_loss(logits, b.tgt_out, b.tgt_mask)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip)
        value, norm = loss.item(), norm.item()
        if not (math.isfinite(value) and math.isfinite(norm)):
            what = f"the loss became {value}" if not math.isfinite(value) else f"the gradients became {norm}"
            kept = (f"the last good checkpoint is {self.ckpt_path} (step {self.st.saved_step})"
                    if self.st.saved_step else "no checkpoint was written yet")
            raise Diverged(f"{what} at step {self.st.step + 1} (--lr {self.cfg.lr:g}); stopped: {kept}; "
                           "try a lower --lr or --clip")
        self.opt.step()
        return value

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(validation loss per target token, greedy exact match) over the validation split."""
        total, tokens, right, count = 0.0, 0, 0, 0
        for b in self.val:
            logits = self.net(b.src, b.src_len, b.tgt_in)
            total += masked_loss(logits, b.tgt_out, b.tgt_mask).item() * b.tokens
            tokens += b.tokens
            want = [row[:n - 1] for row, n in zip(b.tgt_out.t().tolist(), b.tgt_mask.sum(0).tolist())]
            got = self.net.greedy(b.src, b.src_len, self.pairs.begin, self.pairs.end, b.tgt_out.shape[0])
            right += sum(g == w for g, w in zip(got, want))
            count += len(want)
        return total / tokens, right / count

    def validation_pairs(self) -> list[tuple[str, str]]:
        """The (source, target) pairs every evaluation decodes, in the split's order."""
        return [(self.pairs.sources[i], self.pairs.targets[i]) for i in self.val_rows]

    @torch.no_grad()
    def greedy_validation(self, tensors: dict | None = None) -> list[str]:
        """The greedy translations of `validation_pairs`' sources by the weights being trained
        (or by `tensors`), each up to END or as many tokens as the longest target, as a
        written model decodes them."""
        net = self.net if tensors is None else Seq2SeqTorch(self.compiled.network, tensors).to(self.device)
        vocab, longest = self.pairs.target_codec.vocab, limits(self.pairs)["target"]
        out = [""] * len(self.val_rows)
        for b in self.val or []:
            got = net.greedy(b.src, b.src_len, self.pairs.begin, self.pairs.end, longest)
            for row, ids in zip(b.rows, got):
                out[row] = "".join(vocab[t] for t in ids)
        return out

    def _evaluate(self, progress: SeqProgress) -> None:
        st = self.st
        if self.val is None:
            return
        st.last_val, st.last_exact = self.evaluate()
        progress.exact = st.last_exact
        better = (st.best_exact is None or st.last_exact > st.best_exact
                  or (st.last_exact == st.best_exact and st.last_val < st.best_val))
        if better:
            st.best_exact, st.best_val, st.best_step = st.last_exact, st.last_val, st.step
            st.best_tensors = self.net.numpy_tensors()

    def provenance(self, rate: float) -> dict:
        st = self.st
        return {"pairs": os.path.abspath(self.pairs.path), "pairs_sha256": self.pairs.sha256,
                "pairs_count": len(self.pairs.sources),
                "steps": st.step, "weights": "best greedy exact match" if st.best_exact is not None
                else "final (no validation: --val-frac 0)",
                "train_loss": st.last_train, "val_loss": st.last_val, "exact_match": st.last_exact,
                "best_exact_match": st.best_exact, "best_val_loss": st.best_val,
                "best_step": st.best_step if st.best_exact is not None else None,
                "pairs_per_s": round(rate, 1), "device": str(self.device), "loop": self.loop_description(),
                "torch": torch.__version__, "hyperparameters": asdict(self.cfg)}

    def loop_description(self) -> str:
        return f"encoder {self.net.loop_kind()}, decoder autograd per step"

    def run(self) -> dict:
        watch = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, self._on_sigint) if watch else None
        try:
            limit = 60 * self.cfg.max_minutes if self.cfg.max_minutes else None
            with SeqProgress(self.total, self.st.step, self.stream, every=50, seconds=limit) as progress:
                progress.exact = self.st.last_exact
                self._loop(progress)
                rate = progress.rate
            self._write_model(rate)
        finally:
            if watch:
                signal.signal(signal.SIGINT, old)
        if self.st.step < self.total:
            raise Interrupted(f"interrupted at step {self.st.step}: checkpoint {self.ckpt_path}, best weights so "
                              f"far in {self.out_path}; continue with --resume")
        return {**self.provenance(rate), "steps_run": self.st.step - self.first_step, "total_steps": self.total}

    def _loop(self, progress: SeqProgress) -> None:
        cfg, st = self.cfg, self.st
        every_ckpt = cfg.checkpoint_every or cfg.eval_every
        while st.step < self.total and not self._stop:
            st.last_train = self.step()
            st.step += 1
            if progress.deadline is not None and time.monotonic() > progress.deadline:
                self.total = st.step            # out of time: this step is the last one
            evaluating = st.step % cfg.eval_every == 0 or st.step == self.total
            if evaluating:
                self._evaluate(progress)
            progress.update(st.step, st.last_train, st.last_val if evaluating else None, cfg.batch,
                            force=evaluating)
            st.elapsed_s = self.elapsed_before + progress.elapsed
            if st.step % every_ckpt == 0 or st.step == self.total or self._stop:
                self._save_checkpoint(progress.rate)

    def _save_checkpoint(self, rate: float) -> None:
        self.st.capture(self.net, self.opt, self.device)
        self._write(self.ckpt_path, save_checkpoint, self.ckpt_path,
                    {**self.head, "provenance": {**self.head["provenance"], **self.provenance(rate)}}, self.st)
        self.st.saved_step = self.st.step

    def _write_model(self, rate: float) -> None:
        best = self.st.best_tensors if self.st.best_tensors is not None else self.net.numpy_tensors()
        provenance = {**self.head["provenance"], **self.provenance(rate)}
        p = self.pairs
        self._write(self.out_path, write_seq2seq, self.out_path, self.compiled, best, p.source_codec,
                    p.target_codec, limits(p), provenance)

    def _write(self, path: str, writer, *args) -> None:
        try:
            writer(*args)
        except (OSError, ValueError) as e:      # ValueError: a file nn2run would refuse (a header too big)
            kept = (f"the last good checkpoint is {self.ckpt_path} (step {self.st.saved_step})"
                    if self.st.saved_step else "nothing was written")
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise TrainError(f"cannot write {path}: {reason}; {kept}") from None


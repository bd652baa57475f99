"""`nn2c train --task seq2seq` as a session: the pairs, the network, resume, training, and
every expected failure raised as a typed error (EXPECTED) for the command line to report."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from nn2c.compiler.seq2seq import CompiledSeq2Seq, compile_seq2seq
from nn2c.lang.errors import KernelError
from nn2c.train.progress import fmt_value
from nn2c.train.seq2seq.checkpoint import CheckpointError, load_checkpoint
from nn2c.train.seq2seq.pairs import PairsError, read_pairs
from nn2c.train.seq2seq.trainer import Seq2SeqConfig, Seq2SeqTrainer
from nn2c.train.session import resumed_config
from nn2c.train.trainer import Interrupted, TrainError

# May change when resuming; every other option is the checkpoint's.
EXPECTED = (KernelError, PairsError, TrainError, CheckpointError, Interrupted)


@dataclass
class Seq2SeqRequest:
    pairs: str | None              # None with --resume: the checkpoint's pairs file
    output: str
    checkpoint: str
    resume: bool
    options: dict
    given: frozenset | None = None  # options the user gave (None: all of them)
    build: object = None            # (cfg, Vs, Vt) -> CompiledSeq2Seq; None: compile_network


def compile_network(cfg: Seq2SeqConfig, source_vocab: int, target_vocab: int) -> CompiledSeq2Seq:
    """The encoder and decoder kernels compiled for the pairs' vocabularies."""
    return compile_seq2seq(encoder=cfg.encoder, decoder=cfg.decoder, hidden=cfg.hidden, layers=cfg.layers,
                           source_vocab=source_vocab, target_vocab=target_vocab)


def _resume_state(req: Seq2SeqRequest, cfg: Seq2SeqConfig):
    if not os.path.exists(req.checkpoint):
        raise TrainError(f"--resume: no checkpoint at {req.checkpoint}")
    head, st = load_checkpoint(req.checkpoint)
    saved = resumed_config(cfg, Seq2SeqConfig.from_dict(st.config), req.options, req.given)
    return saved, st, (head.get("provenance") or {}).get("pairs")


def run_seq2seq(req: Seq2SeqRequest, stream=None) -> dict:
    """Train as asked and return the summary; an expected failure raises one of EXPECTED."""
    out = stream or sys.stderr
    cfg = Seq2SeqConfig(**req.options)
    cfg.check()
    st, recorded = None, None
    if req.resume:
        cfg, st, recorded = _resume_state(req, cfg)
        cfg.check()
    path = req.pairs or recorded
    if path is None:
        raise TrainError("give the pairs file: nn2c train --task seq2seq PAIRS.tsv")
    pairs = read_pairs(path)
    if st is not None and pairs.sha256 != st.pairs_sha256:
        raise TrainError(f"--resume: {path} is not the pairs file this checkpoint was trained on")
    try:
        trainer = Seq2SeqTrainer(cfg, pairs, req.build or compile_network, req.output, req.checkpoint, st, stream)
        summary = trainer.run()
    except KeyboardInterrupt:
        kept = (f"the last checkpoint is {req.checkpoint}" if os.path.exists(req.checkpoint)
                else "no checkpoint was written")
        raise Interrupted(f"interrupted; {kept}") from None
    except OSError as e:
        raise TrainError(f"cannot write {e.filename or req.output}: {e.strerror or e}") from None
    print(final_line(req, cfg, pairs, summary), file=out)
    return summary


def final_line(req: Seq2SeqRequest, cfg: Seq2SeqConfig, pairs, summary: dict) -> str:
    if summary["best_exact_match"] is None:
        weights = f"validation off (--val-frac 0): the file holds the final weights, step {summary['steps']}"
    else:
        weights = (f"greedy exact match {100 * summary['best_exact_match']:.1f}%, val loss "
                   f"{fmt_value(summary['best_val_loss'])} (best, step {summary['best_step']})")
    what = (f"{req.output}: {cfg.layers}×{cfg.hidden} {cfg.encoder} encoder, {cfg.decoder} decoder, "
            f"vocabularies {len(pairs.source_codec.vocab)} → {pairs.target_vocab}; {weights}")
    if summary["steps_run"] == 0:
        return f"nothing left to train: {req.checkpoint} is at step {summary['steps']}; wrote {what}"
    return (f"wrote {what}; {summary['pairs_per_s']:,.0f} pairs/s on {summary['device']} ({summary['loop']}); "
            f"checkpoint {req.checkpoint} kept for --resume")

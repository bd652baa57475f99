"""`nn2c train` as a session: corpus, resume, training, and every expected failure turned
into one clear line. The CLI calls `run_training`; tests can call it too."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from .checkpoint import CheckpointError, load_checkpoint
from .corpus import CorpusError, read_corpus
from .errors import KernelError
from .train import Interrupted, TrainConfig, Trainer, TrainError

RESUMABLE = ("steps", "epochs", "eval_every", "checkpoint_every", "device")


@dataclass
class TrainRequest:
    corpus: str
    output: str
    checkpoint: str
    resume: bool
    options: dict


def _resume_state(req: TrainRequest, cfg: TrainConfig):
    if not os.path.exists(req.checkpoint):
        raise TrainError(f"--resume: no checkpoint at {req.checkpoint}")
    header, ts = load_checkpoint(req.checkpoint)
    saved = TrainConfig.from_dict(ts.config)
    for name in RESUMABLE:      # these may change between runs; the rest is the checkpoint's
        setattr(saved, name, getattr(cfg, name))
    return saved, ts


def run_training(req: TrainRequest, failure, sample_len: int = 0, stream=None) -> dict:
    """Train as asked; raise `failure(message, code)` for every expected error."""
    cfg = TrainConfig(**req.options)
    try:
        ts = None
        if req.resume:
            cfg, ts = _resume_state(req, cfg)
        cfg.check()
        corpus = read_corpus(req.corpus, cfg.codec, vocab=None)
        if ts is not None and corpus.sha256 != ts.corpus_sha256:
            raise TrainError(f"--resume: {req.corpus} is not the corpus this checkpoint was trained on")
        summary = Trainer(cfg, corpus, req.output, req.checkpoint, ts, stream).run()
    except KernelError as e:
        raise failure(str(e), raw=True) from None
    except (CorpusError, TrainError, CheckpointError) as e:
        raise failure(str(e)) from None
    except Interrupted as e:
        raise failure(str(e), code=130) from None
    except OSError as e:
        raise failure(f"cannot write {e.filename or req.output}: {e.strerror or e}") from None
    out = stream or sys.stderr
    print(f"wrote {req.output}: {cfg.layers}×{cfg.hidden} {cfg.kernel}, vocabulary {len(corpus.codec.vocab)}; "
          f"val loss {_fmt(summary['best_val_loss'])} (best, step {summary['best_step']}), "
          f"train loss {_fmt(summary['train_loss'])}; {summary['chars_per_s']:,} chars/s on {summary['device']}",
          file=out)
    if sample_len:
        _sample(req.output, sample_len)
    return summary


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def _sample(path: str, n: int) -> None:
    import nn2run
    from nn2run.generate import generate, start_token
    from nn2run.sample import Sampler, SamplerConfig
    m = nn2run.load(path)
    dec = m.codec.decoder()
    text = "".join(dec(int(ids[0])) for _, ids in generate(m, [[start_token(m)]], n, Sampler(SamplerConfig(), 0)))
    print(text)

"""`nn2c train` as a session: corpus, resume, training, and every expected failure raised
as a typed error (EXPECTED) for the command line to report. The CLI calls `run_training`;
tests can call it too."""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass

from nn2c.lang.errors import KernelError
from nn2c.train.checkpoint import CheckpointError, load_checkpoint
from nn2c.train.corpus import CorpusError, read_corpus
from nn2c.train.distributed import LAUNCHED, LOST_PEER_EXIT, PeerLost, World
from nn2c.train.progress import LogError, fmt_value
from nn2c.train.trainer import Interrupted, TrainConfig, Trainer, TrainError

# May change when resuming; every other option is the checkpoint's, and giving it a different
# value is refused (silently ignoring it would train something the user did not ask for).
RESUMABLE = ("steps", "epochs", "eval_every", "checkpoint_every", "device", "max_minutes")


@dataclass
class TrainRequest:
    corpus: str | None            # None: the checkpoint's corpus when resuming, else the bundled one
    output: str
    checkpoint: str
    resume: bool
    options: dict
    given: frozenset | None = None   # options the user gave (None: all of them)
    codec_service: str | None = None  # HOST:PORT of the codec service (the "service" codec)
    log: str | None = None           # --log: the JSON-lines training log


def default_corpus() -> str:
    from nn2c.lang.kernels import samples_dir
    return str(samples_dir().parent / "corpus" / "rhymes.txt")


def resumed_config(cfg, saved, options: dict, given):
    """The checkpoint's config `saved` with the options given again on the command line:
    those in RESUMABLE replace its values; any other that differs is refused in one line."""
    given = set(options if given is None else given)
    if given & {"steps", "epochs"}:
        given |= {"steps", "epochs"}          # the run's length is one choice, made by either
    for name in sorted(given):
        mine, theirs = getattr(cfg, name, None), getattr(saved, name, None)
        if name in RESUMABLE:
            setattr(saved, name, mine)
        elif name in options and mine != theirs:
            raise TrainError(f"--resume: --{name.replace('_', '-')} {mine} differs from the checkpoint's "
                             f"{theirs}; leave it out, or train afresh without --resume")
    return saved


def _resume_state(req: TrainRequest, cfg: TrainConfig):
    if not os.path.exists(req.checkpoint):
        raise TrainError(f"--resume: no checkpoint at {req.checkpoint}")
    header, ts = load_checkpoint(req.checkpoint)
    saved = resumed_config(cfg, TrainConfig.from_dict(ts.config), req.options, req.given)
    return saved, ts, (header.get("provenance") or {}).get("corpus"), header.get("codec")


def _read_recorded_corpus(path: str, ckpt: str, codec: str, service: str | None = None):
    """The corpus a checkpoint names; when it is not there, say where the path came from."""
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        raise TrainError(f"--resume: the corpus {path}{where}, recorded in {ckpt}, is not there; "
                         "give the corpus on the command line: nn2c train CORPUS --resume …")
    return read_corpus(path, codec, service)


def _prepare(req: TrainRequest):
    """The config, the resume state (or None) and the corpus, all checked."""
    cfg = TrainConfig(**req.options)
    cfg.check()
    ts, recorded, codec_header = None, None, None
    if req.resume:
        cfg, ts, recorded, codec_header = _resume_state(req, cfg)
        cfg.check()
    if req.corpus is None and recorded:
        corpus = _read_recorded_corpus(recorded, req.checkpoint, cfg.codec, req.codec_service)
    else:
        corpus = read_corpus(req.corpus or default_corpus(), cfg.codec, req.codec_service)
    if ts is not None and corpus.sha256 != ts.corpus_sha256:
        raise TrainError(f"--resume: {corpus.path} is not the corpus this checkpoint was trained on")
    if ts is not None and cfg.codec == "service" and corpus.codec.to_header() != codec_header:
        raise TrainError("--resume: the codec service's vocabulary is not the one this checkpoint was trained with")
    return cfg, ts, corpus


# Every error a session expects. The command line turns each into one line and an exit
# status (nn2c.cli); nothing here prints a failure or picks a status.
EXPECTED = (KernelError, CorpusError, TrainError, CheckpointError, LogError, Interrupted)


def run_training(req: TrainRequest, sample_len: int = 0, stream=None) -> dict:
    """Train as asked and return the summary; an expected failure raises one of EXPECTED.
    In a job of several processes only rank 0 speaks: the others train with their output
    going nowhere, and a lost peer ends them with the launcher's status."""
    world = World.from_env()
    if world is not None and world.rank != 0:
        with open(os.devnull, "w") as quiet:
            try:
                return _run(req, 0, quiet)
            except PeerLost:
                raise SystemExit(LOST_PEER_EXIT) from None
    return _run(req, sample_len, stream)


def _kept(req: TrainRequest) -> str:
    return (f"the last checkpoint is {req.checkpoint}" if os.path.exists(req.checkpoint)
            else "no checkpoint was written")


def _run(req: TrainRequest, sample_len: int, stream) -> dict:
    out = stream or sys.stderr
    try:
        cfg, ts, corpus = _prepare(req)
        for note in corpus.notes:
            print(f"nn2c: note: {note}", file=out)
        trainer = Trainer(cfg, corpus, req.output, req.checkpoint, ts, stream, req.log)
        for note in trainer.notes:
            print(f"nn2c: warning: {note}", file=out)
        summary = trainer.run()
    except PeerLost as e:
        if os.environ.get(LAUNCHED):          # the launcher says which process went and why
            raise SystemExit(LOST_PEER_EXIT) from None
        raise TrainError(f"{e}; the job stopped; {_kept(req)}; continue with --resume") from None
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {_kept(req)}") from None
    except OSError as e:
        raise TrainError(f"cannot write {e.filename or req.output}: {e.strerror or e}") from None
    print(final_line(req, cfg, corpus, summary), file=out)
    if sample_len:
        _sample(req.output, sample_len, req.codec_service)
    return summary


def final_line(req: TrainRequest, cfg: TrainConfig, corpus, summary: dict) -> str:
    """What was written, from which weights, and the checkpoint kept beside it."""
    if summary["best_val_loss"] is None:      # a finished run validates at its last step unless it is off
        weights = f"validation off (--val-frac 0): the file holds the final weights, step {summary['steps']}"
    else:
        weights = f"val loss {fmt_value(summary['best_val_loss'])} (best, step {summary['best_step']})"
    what = (f"{req.output}: {cfg.layers}×{cfg.hidden} {cfg.kernel}, vocabulary {len(corpus.codec.vocab)}; {weights}, "
            f"train loss {fmt_value(summary['train_loss'])}")
    if summary["steps_run"] == 0:
        total = summary["total_steps"]
        length = (f"--steps {total}" if cfg.epochs is None else
                  f"--epochs {cfg.epochs:g} ({total:,} step{'' if total == 1 else 's'})")
        return (f"nothing left to train: {req.checkpoint} is at step {summary['steps']}, {length}; "
                f"wrote {what} (from the checkpoint)")
    n = summary.get("world_size", 1)
    where = f"{summary['device']} × {n} processes" if n > 1 else summary["device"]
    return (f"wrote {what}; {summary['chars_per_s']:,} chars/s on {where} ({summary['loop']} loop); "
            f"checkpoint {req.checkpoint} kept for --resume")


def _sample(path: str, n: int, codec_service: str | None = None) -> None:
    import nn2run
    from nn2run.generate import generate, start_token
    from nn2run.sample import Sampler, SamplerConfig
    m = nn2run.load(path)
    if codec_service is not None:
        m.codec.attach(codec_service)
    dec = m.codec.decoder()
    pieces = [dec(int(ids[0])) for _, ids in generate(m, [[start_token(m)]], n, Sampler(SamplerConfig(), 0))]
    # a byte model's sample is bytes: shown as text here, since it is a message on the console
    try:
        print(b"".join(pieces).decode("utf-8", "replace") if m.codec.binary else "".join(pieces), flush=True)
    except OSError as e:
        if e.errno == errno.EPIPE:          # the reader went away (| head): click ends quietly
            raise
        devnull = os.open(os.devnull, os.O_WRONLY)      # what is still buffered cannot be written
        os.dup2(devnull, sys.stdout.fileno())            # either: keep the exit's flush quiet
        os.close(devnull)
        raise TrainError(f"cannot write the sample to stdout: {e.strerror or e} ({path} is written)") from None

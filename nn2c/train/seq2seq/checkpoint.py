"""Seq2seq training checkpoints: one .nnb container (`nn2run.format`, written atomically)
holding the model's stored tensors, Adam's moments
(`adam.m/NAME`, `adam.v/NAME`), the best weights so far (`best/NAME`) and torch's RNG
(`rng/torch`); the header has both codecs, the sizes, the kernels' names and text, the
parameter map and a `checkpoint` object (step, config, the evaluation history).

The header's kind is "seq2seq-checkpoint": the trainer's own layout for resuming, not a
model nn2run runs (the model file is the compiler's "seq2seq" kind, `write_seq2seq`, with
the programs); the programs are compiled again from the kernels' text on resume.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import nn2run.format as fmt
from nn2c import __version__
from nn2c.compiler.emit import param_map
from nn2c.train.checkpoint import adam_moments, restore_adam
from nn2run.codec import CharCodec, CodecError

KIND = "seq2seq-checkpoint"


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from."""


@dataclass
class State:
    step: int
    tensors: dict                     # name -> np.ndarray, the current weights
    config: dict
    pairs_sha256: str
    adam_m: dict = field(default_factory=dict)
    adam_v: dict = field(default_factory=dict)
    adam_step: int = 0
    best_tensors: dict | None = None
    best_exact: float | None = None   # greedy exact match of the best weights (0..1)
    best_val: float | None = None     # their validation loss
    best_step: int = 0
    last_train: float | None = None
    last_val: float | None = None
    last_exact: float | None = None
    torch_rng: np.ndarray | None = None
    device: str | None = None
    elapsed_s: float = 0.0
    saved_step: int = 0
    sources: dict | None = None       # {"encoder": text, "decoder": text} the weights were trained for

    @classmethod
    def fresh(cls, tensors: dict, cfg, sha: str) -> State:
        return cls(0, tensors, asdict(cfg), sha)

    def capture(self, net, opt, device) -> None:
        self.tensors = net.numpy_tensors()
        self.adam_m, self.adam_v, self.adam_step = adam_moments(net, opt, self.adam_step)
        self.torch_rng = torch.get_rng_state().numpy()
        self.device = device.type

    def restore(self, net, opt, device) -> None:
        restore_adam(net, opt, self.adam_m, self.adam_v, self.adam_step, device)
        if self.torch_rng is not None:
            torch.set_rng_state(torch.from_numpy(np.array(self.torch_rng, dtype=np.uint8)))


def header(network, names: dict, sources: dict, pairs, limits: dict, provenance: dict) -> dict:
    return {"nn2": {"kind": KIND, "nn2c": __version__},
            "model": {"layers": network.layers, "hidden": network.hidden, **names},
            "codec": pairs.source_codec.to_header(),
            "target": {"codec": pairs.target_codec.to_header(), "begin": pairs.begin, "end": pairs.end},
            "limits": limits,
            "params": param_map(network.tensors()),
            "source": {k: {"name": names[k], "text": sources[k]} for k in ("encoder", "decoder")},
            "provenance": {"nn2c": __version__,
                           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **provenance}}


def save_checkpoint(path, head: dict, st: State) -> None:
    extra = {}
    for name in st.tensors:
        if name in st.adam_m:
            extra[f"adam.m/{name}"] = st.adam_m[name]
            extra[f"adam.v/{name}"] = st.adam_v[name]
        if st.best_tensors is not None:
            extra[f"best/{name}"] = st.best_tensors[name]
    if st.torch_rng is not None:
        extra["rng/torch"] = st.torch_rng.astype(np.uint8)
    meta = {"step": st.step, "config": st.config, "pairs_sha256": st.pairs_sha256, "adam_step": st.adam_step,
            "best_exact": st.best_exact, "best_val": st.best_val, "best_step": st.best_step,
            "last_train": st.last_train, "last_val": st.last_val, "last_exact": st.last_exact,
            "device": st.device, "elapsed_s": st.elapsed_s}
    fmt.write(path, {**head, "checkpoint": meta}, {**st.tensors, **extra})


def load_checkpoint(path) -> tuple[dict, State]:
    """(the header, the state to resume from); CheckpointError in one line otherwise."""
    try:
        nnb = fmt.read(path, verify_data=True)
    except fmt.NNBFormatError as e:
        raise CheckpointError(f"cannot resume from {path}: {e}") from None
    try:
        head = nnb.header
        meta = head.get("checkpoint")
        if head.get("nn2", {}).get("kind") != KIND or not isinstance(meta, dict):
            raise CheckpointError(f"{path} is not a seq2seq training checkpoint")
        t = {k: np.array(v) for k, v in nnb.tensors.items()}
        names = [n for n in t if "/" not in n]
        st = State(int(meta["step"]), {n: t[n] for n in names}, dict(meta["config"]), str(meta["pairs_sha256"]))
        st.adam_m = {n: t[f"adam.m/{n}"] for n in names if f"adam.m/{n}" in t}
        st.adam_v = {n: t[f"adam.v/{n}"] for n in names if f"adam.v/{n}" in t}
        st.adam_step = int(meta["adam_step"])
        if all(f"best/{n}" in t for n in names):
            st.best_tensors = {n: t[f"best/{n}"] for n in names}
        for key in ("best_exact", "best_val", "last_train", "last_val", "last_exact", "device"):
            setattr(st, key, meta[key])
        st.best_step, st.elapsed_s = int(meta["best_step"]), float(meta["elapsed_s"])
        st.torch_rng = t.get("rng/torch")
        st.saved_step = st.step
        st.sources = {k: head["source"][k]["text"] for k in ("encoder", "decoder")}
        CharCodec.from_header(head["codec"])
        CharCodec.from_header(head["target"]["codec"])
    except (KeyError, TypeError, ValueError, AttributeError, CodecError) as e:
        raise CheckpointError(f"cannot resume from {path}: the checkpoint is incomplete or damaged "
                              f"({type(e).__name__}: {e})") from None
    finally:
        nnb.close()
    return head, st

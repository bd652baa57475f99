"""Training checkpoints: a runnable .nnb that also carries everything needed to resume.

Besides the model's own tensors a checkpoint holds, as more tensors of the same file,
Adam's moments (`adam.m/NAME`, `adam.v/NAME`), the best weights so far (`best/NAME`),
the recurrent state carried into the next step (`carried/LAYER/I`) and torch's RNG
states (`rng/torch`, and `rng/cuda` when it trained on a GPU); its header has a
`checkpoint` object with the step, the config and the loss history. Which tensors are the
model's comes from the parameter map (`nn2run.params`). It is written atomically like
any .nnb, so a crash at any moment leaves the previous checkpoint whole. No pickle is involved anywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import nn2run.format as fmt
from nn2c.compiler.pipeline import write_model
from nn2run import params
from nn2run.model import file_kind


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from."""


def adam_moments(net, opt, step: int = 0) -> tuple[dict, dict, int]:
    """Adam's first and second moments by tensor name, as arrays, and its step count."""
    m, v = {}, {}
    for name, p in net.tensor_dict().items():
        st = opt.state.get(p)
        if st:
            m[name] = st["exp_avg"].detach().cpu().numpy()
            v[name] = st["exp_avg_sq"].detach().cpu().numpy()
            step = int(st["step"])
    return m, v, step


def restore_adam(net, opt, m: dict, v: dict, step: int, device) -> None:
    """Put Adam's moments back for the tensors that have them."""
    for name, p in net.tensor_dict().items():
        if name in m:
            # a fused Adam keeps its step count as a float32 tensor beside the weights
            opt.state[p] = {"step": torch.tensor(float(step), dtype=torch.float32, device=device),
                            "exp_avg": torch.from_numpy(np.array(m[name])).to(device),
                            "exp_avg_sq": torch.from_numpy(np.array(v[name])).to(device)}


@dataclass
class TrainState:
    step: int
    tensors: dict                     # name -> np.ndarray, current weights
    config: dict
    corpus_sha256: str
    adam_m: dict = field(default_factory=dict)
    adam_v: dict = field(default_factory=dict)
    adam_step: int = 0
    carried: list = field(default_factory=list)   # per layer, list of (B, n) arrays
    best_tensors: dict | None = None
    best_val: float | None = None
    best_step: int = 0
    last_train: float | None = None
    last_val: float | None = None
    torch_rng: np.ndarray | None = None
    cuda_rng: np.ndarray | None = None    # the GPU's generator (dropout masks on CUDA come from it)
    device: str | None = None         # "cpu" or "cuda": where the run trained
    torch_version: str | None = None
    world_size: int = 1               # processes of the job that wrote it
    rank_rngs: list = field(default_factory=list)   # ranks 1…: (CPU RNG, GPU RNG or None)
    saved_step: int = 0
    kernel_source: str | None = None  # the equations the weights were trained for
    chars_per_s: float = 0.0          # the training speed the checkpoint's run recorded
    elapsed_s: float = 0.0            # training seconds up to this step, over every resumed run

    @classmethod
    def fresh(cls, tensors: dict, cfg, sha: str) -> TrainState:
        return cls(0, tensors, asdict(cfg), sha)

    def capture(self, net, opt, state, device) -> None:
        """Copy the live training state into this object (before saving)."""
        self.tensors = net.numpy_tensors()
        self.adam_m, self.adam_v, self.adam_step = adam_moments(net, opt, self.adam_step)
        self.carried = [[s.detach().cpu().numpy() for s in layer] for layer in state]
        self.torch_rng = torch.get_rng_state().numpy()
        self.cuda_rng = torch.cuda.get_rng_state(device).numpy() if device.type == "cuda" else None
        self.device, self.torch_version = device.type, torch.__version__

    def restore(self, net, opt, device, rank: int = 0, world_size: int = 1) -> list[str]:
        """Put Adam's moments and this rank's RNGs back (weights were loaded with the network);
        returns warnings for a resume that cannot be bit-exact."""
        restore_adam(net, opt, self.adam_m, self.adam_v, self.adam_step, device)
        cpu_rng, cuda_rng = ((self.torch_rng, self.cuda_rng) if rank == 0 else
                             self.rank_rngs[rank - 1] if rank - 1 < len(self.rank_rngs) else (None, None))
        if cpu_rng is not None:
            torch.set_rng_state(torch.from_numpy(np.array(cpu_rng, dtype=np.uint8)))
        if cuda_rng is not None and device.type == "cuda":
            torch.cuda.set_rng_state(torch.from_numpy(np.array(cuda_rng, dtype=np.uint8)), device)
        notes = []
        if world_size != self.world_size:
            notes.append(f"the checkpoint was written by a job of {self.world_size} process"
                         f"{'' if self.world_size == 1 else 'es'} and resumes in {world_size}: training goes on, "
                         "but not bit for bit as an uninterrupted run (the gradients are summed in another order)")
        if self.device is not None and self.device != device.type:
            notes.append(f"the checkpoint was trained on {self.device} and resumes on {device.type}: training "
                         "goes on, but not bit for bit as an uninterrupted run (exact resume needs the same "
                         "device and torch build)")
        elif self.torch_version is not None and self.torch_version != torch.__version__:
            notes.append(f"the checkpoint was written by torch {self.torch_version}, this is {torch.__version__}: "
                         "training goes on, but not bit for bit as an uninterrupted run")
        return notes

    def carried_state(self, device, part: tuple[int, int] | None = None):
        """The recurrent state to continue from (None at the start of training); `part`: the
        rows [start, stop) of one process of a job."""
        if not self.carried:
            return None
        rows = slice(*part) if part else slice(None)
        return [[torch.from_numpy(np.array(s[rows])).to(device) for s in layer] for layer in self.carried]


def save_checkpoint(path, compiled, codec, provenance: dict, ts: TrainState) -> None:
    extra = {}
    for name in ts.tensors:
        if name in ts.adam_m:
            extra[f"adam.m/{name}"] = ts.adam_m[name]
            extra[f"adam.v/{name}"] = ts.adam_v[name]
        if ts.best_tensors is not None:
            extra[f"best/{name}"] = ts.best_tensors[name]
    for layer, arrays in enumerate(ts.carried):
        for i, a in enumerate(arrays):
            extra[f"carried/{layer}/{i}"] = a
    if ts.torch_rng is not None:
        extra["rng/torch"] = ts.torch_rng.astype(np.uint8)
    if ts.cuda_rng is not None:
        extra["rng/cuda"] = ts.cuda_rng.astype(np.uint8)
    for rank, (cpu_rng, cuda_rng) in enumerate(ts.rank_rngs, 1):
        extra[f"rng/torch@{rank}"] = cpu_rng.astype(np.uint8)
        if cuda_rng is not None:
            extra[f"rng/cuda@{rank}"] = cuda_rng.astype(np.uint8)
    meta = {"step": ts.step, "config": ts.config, "corpus_sha256": ts.corpus_sha256,
            "adam_step": ts.adam_step, "best_val": ts.best_val, "best_step": ts.best_step,
            "last_train": ts.last_train, "last_val": ts.last_val,
            "carried_layers": [len(a) for a in ts.carried], "elapsed_s": ts.elapsed_s,
            "device": ts.device, "torch": ts.torch_version, "world_size": ts.world_size}
    write_model(path, compiled, ts.tensors, codec, provenance,
                extra_tensors=extra, extra_header={"checkpoint": meta})


def load_checkpoint(path) -> tuple[dict, TrainState]:
    """Read a checkpoint; returns (its header, the state to resume from)."""
    try:
        nnb = fmt.read(path, verify_data=True)
    except fmt.NNBFormatError as e:
        raise CheckpointError(f"cannot resume from {path}: {e}") from None
    try:
        meta = nnb.header.get("checkpoint")
        if file_kind(nnb.header) == "seq2seq-checkpoint":
            raise CheckpointError(f"{path} is a seq2seq training checkpoint; resume it with --task seq2seq")
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise CheckpointError(f"{path} is a model, not a training checkpoint")
        ts = _state(meta, nnb.header, {k: np.array(v) for k, v in nnb.tensors.items()})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"cannot resume from {path}: the checkpoint is incomplete or damaged "
                              f"({type(e).__name__}: {e})") from None
    finally:
        nnb.close()
    return nnb.header, ts


def _state(meta: dict, header: dict, t: dict) -> TrainState:
    shapes = {n: a.shape for n, a in t.items()}
    names = params.stored_tensors(params.read_map(header["params"], shapes))
    ts = TrainState(int(meta["step"]), {n: t[n] for n in names}, meta["config"], str(meta["corpus_sha256"]))
    ts.adam_m = {n: t[f"adam.m/{n}"] for n in names if f"adam.m/{n}" in t}
    ts.adam_v = {n: t[f"adam.v/{n}"] for n in names if f"adam.v/{n}" in t}
    ts.adam_step = int(meta["adam_step"])
    if all(f"best/{n}" in t for n in names):
        ts.best_tensors = {n: t[f"best/{n}"] for n in names}
    ts.carried = [[t[f"carried/{layer}/{i}"] for i in range(count)]
                  for layer, count in enumerate(meta["carried_layers"])]
    ts.best_val, ts.best_step = meta["best_val"], int(meta["best_step"])
    ts.last_train, ts.last_val = meta["last_train"], meta["last_val"]
    ts.torch_rng = t.get("rng/torch")
    ts.cuda_rng = t.get("rng/cuda")
    ts.device, ts.torch_version = meta.get("device"), meta.get("torch")     # absent in older checkpoints
    ts.world_size = int(meta.get("world_size") or 1)
    ts.rank_rngs = [(t[f"rng/torch@{r}"], t.get(f"rng/cuda@{r}")) for r in range(1, ts.world_size)
                    if f"rng/torch@{r}" in t]
    ts.saved_step = ts.step
    ts.elapsed_s = float(meta.get("elapsed_s") or 0.0)     # absent in checkpoints of older builds
    ts.kernel_source = header["source"]["text"]
    ts.chars_per_s = float((header.get("provenance") or {}).get("chars_per_s") or 0)
    for group in (ts.adam_m, ts.adam_v, ts.best_tensors or {}):
        for n, a in group.items():
            if a.shape != ts.tensors[n].shape:
                raise ValueError(f"tensor {n!r} has shape {a.shape} here, {ts.tensors[n].shape} in the model")
    if set(ts.adam_m) != set(ts.adam_v):
        raise ValueError("Adam's moments are incomplete")
    return ts

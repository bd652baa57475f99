"""Training in several processes with torch.distributed (gloo on the CPU, NCCL on CUDA).

Each process (rank) trains its share of the batch's rows; after the backward pass one
all-reduce sums every parameter gradient (flattened into one buffer, so one collective a
step), together with the loss and the ranks' stop requests, and each rank divides by the
number of ranks: every rank then clips and applies the same averaged gradient, so the
weights stay identical everywhere without being sent. Rank 0 validates, writes checkpoints
(with every rank's rows of the carried state and its RNG) and the model.

A job is started either by `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT) or by `nn2c train --nproc N`, whose `launch` starts the N processes the same
way on this machine and watches them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

LAUNCHED = "NN2_LAUNCHED"        # set by `launch`: a lost peer is reported by the launcher, not the rank
LOST_PEER_EXIT = 3               # a rank's exit status when another rank went away


class PeerLost(Exception):
    """Another process of the job stopped; a collective operation failed."""


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> World | None:
        """The job this process belongs to, from torchrun's variables; None for a single process."""
        size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if size <= 1:
            return None
        rank = int(os.environ["RANK"])
        return cls(rank, size, int(os.environ.get("LOCAL_RANK", rank)))

    def rows(self, batch: int) -> tuple[int, int]:
        """This rank's share [start, stop) of the batch's rows."""
        share = batch // self.size
        return self.rank * share, (self.rank + 1) * share


def split_error(batch: int, size: int) -> str | None:
    if batch % size:
        return (f"--batch {batch} does not split evenly over {size} processes; "
                f"give a --batch that is a multiple of {size}")
    return None


class Collective:
    """The process group of a job, and the few operations training needs from it."""

    def __init__(self, world: World, device: torch.device):
        import torch.distributed as dist
        self.dist, self.world, self.device = dist, world, device
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, rank=world.rank, world_size=world.size, init_method="env://")
        except (RuntimeError, ValueError) as e:
            raise PeerLost(f"cannot join the job (rank {world.rank} of {world.size}, {backend}): "
                           f"{_first_line(e)}") from None
        self._flags = torch.zeros(2, device=device)     # stop asked, out of time: set without a transfer

    def average(self, params, loss: torch.Tensor, stop: bool, late: bool):
        """Average the gradients and the loss over the ranks, in one all-reduce; returns the
        mean loss and the number of ranks asking to stop and out of time (tensors)."""
        self._flags[0].fill_(float(stop))
        self._flags[1].fill_(float(late))
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1), self._flags])
        self._run(self.dist.all_reduce, flat)
        flat[:-2] /= self.world.size
        at = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[at:at + n].view_as(p)
            at += n
        return flat[at], flat[at + 1:]

    def gather(self, obj):
        """Every rank's `obj` (small: the carried state and RNG), in rank order, on every rank."""
        out = [None] * self.world.size
        self._run(self.dist.all_gather_object, out, obj)
        return out

    def _run(self, op, *args):
        try:
            op(*args)
        except RuntimeError as e:
            raise PeerLost(f"another process of the job stopped ({_first_line(e)})") from None

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# ------------------------------------------------------------------ nn2c train --nproc N

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: its own process group (Ctrl-C reaches the launcher, which
    passes it on once), and on Linux a SIGKILL when the launcher dies, so no rank outlives
    a killed job."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)       # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _checkpoint_note(ckpt: str) -> str:
    import nn2run.format as fmt
    try:
        with fmt.read(ckpt) as f:
            return f"the last checkpoint is {ckpt} (step {f.header['checkpoint']['step']})"
    except (fmt.NNBFormatError, OSError, KeyError, TypeError):
        return "no checkpoint was written"


def launch(args: list[str], nproc: int, ckpt: str) -> tuple[int, str | None]:
    """Run `nn2c train ARGS` in `nproc` processes on this machine and wait for them.
    Returns (exit status, a line to show or None when rank 0 has said what happened)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), LAUNCHED: "1"}
    # N processes share the cores: torch would otherwise start one thread per core in each
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    procs = []
    for rank in range(nproc):
        procs.append(subprocess.Popen([sys.executable, "-m", "nn2c", "train", *args],
                                      env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                      preexec_fn=_die_with_parent))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _watch(procs, ckpt)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _watch(procs, ckpt: str, grace: float = 60.0) -> tuple[int, str | None]:
    """Wait for every rank. A rank killed by a signal (or failing oddly) stops the others at
    once; one that stopped in order (0, 1, 130) lets the rest finish theirs, for `grace`."""
    n = len(procs)
    deadline = None
    while any(p.poll() is None for p in procs):
        for rank, p in enumerate(procs):
            code = p.poll()
            if code is None or code in (0, 1, 130, LOST_PEER_EXIT):
                continue
            for q in procs:
                if q.poll() is None:
                    q.kill()
            for q in procs:
                q.wait()
            what = (f"was killed by {_signal_name(code)}" if code < 0 else f"failed with exit status {code}")
            return 1, (f"process {rank} of {n} {what}; the job stopped; {_checkpoint_note(ckpt)}; "
                       f"continue with --resume --nproc {n}")
        if deadline is None and any(p.poll() not in (None, 0) for p in procs):
            deadline = time.monotonic() + grace
        if deadline is not None and time.monotonic() > deadline:
            for q in procs:
                if q.poll() is None:
                    q.kill()
        time.sleep(0.05)
    codes = [p.returncode for p in procs]
    if codes[0] == LOST_PEER_EXIT or (codes[0] < 0):
        rank = next((r for r, c in enumerate(codes) if c not in (0, LOST_PEER_EXIT)), 0)
        return 1, (f"process {rank} of {n} stopped (exit status {codes[rank]}); the job stopped; "
                   f"{_checkpoint_note(ckpt)}; continue with --resume --nproc {n}")
    return (codes[0] or max(codes, key=abs)), None

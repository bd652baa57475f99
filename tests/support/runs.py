"""Training runs from a test: starting `nn2c train`, watching its checkpoint's step as it is
written, and the one line a failed `nn2c` command prints."""

from __future__ import annotations

import os
import random
import subprocess
import time

import pytest

import nn2run.format as fmt
from support.models import BIN

# One thread: the same reduction order in every process, and no fight for the two cores.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def write_corpus(path, n_words=3000, seed=1):
    """A small corpus of random words from a fixed list."""
    rng = random.Random(seed)
    words = "the cat sat on a mat and dog ran far away to see its friend".split()
    path.write_text(" ".join(rng.choice(words) for _ in range(n_words)), encoding="utf-8")
    return path


def nn2c(*args, **popen):
    """`nn2c train ARGS…` started as a user would, on one thread; returns the Popen."""
    return subprocess.Popen([str(BIN / "nn2c"), "train", *map(str, args)], env=ONE_THREAD, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finish(proc, timeout=300):
    """(exit status, stdout, stderr) once the run ends."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def checkpoint_step(path) -> int | None:
    """The step of the checkpoint at `path`, or None while there is no whole one."""
    try:
        with fmt.read(path) as f:
            return f.header["checkpoint"]["step"]
    except fmt.NNBFormatError:
        return None


def wait_for_checkpoint(path, step: int, proc, timeout: float = 120.0) -> int:
    """Poll the checkpoint's header until it reaches `step`; the run must still be going."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = checkpoint_step(path)
        if seen is not None and seen >= step:
            return seen
        assert proc.poll() is None, f"training ended early: {proc.communicate()[1][-800:]}"
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no checkpoint with step ≥ {step} after {timeout}s")


def one_line(result, *words) -> str:
    """The single `nn2c:` line of a failure (exit 1, a click result), holding every word."""
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("nn2c: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]

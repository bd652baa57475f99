"""Shared fixtures: models built from known weights, small corpora, the shared data folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent


def build_model(path, kernel: str, hidden: int, layers: int, vocab_size: int, logical: dict | None = None,
                seed: int = 0, passes=None):
    """Write a .nnb for `kernel` with the given kernel parameters (by key, e.g. "W_f@0"),
    or random ones; returns (path, compiled, logical)."""
    from nn2c.compiler import compile_kernel, write_model
    from nn2c.emit import logical_shapes, pack
    from nn2run.codec import CharCodec
    kwargs = {} if passes is None else {"passes": passes}
    compiled = compile_kernel(kernel, hidden, layers, vocab_size, **kwargs)
    specs = compiled.network.tensors()
    if logical is None:
        rng = np.random.default_rng(seed)
        logical = {k: rng.uniform(-0.5, 0.5, s).astype(np.float32) for k, s in logical_shapes(specs).items()}
    codec = CharCodec([chr(ord("a") + i) if i < 26 else chr(0x100 + i) for i in range(vocab_size)])
    write_model(path, compiled, pack(specs, logical), codec, {"test": True})
    return path, compiled, logical


@pytest.fixture(autouse=True, scope="session")
def _native_cache(tmp_path_factory):
    """Native loops built by the tests go to a temporary cache, not the user's ~/.cache/nn2
    (subprocesses inherit it)."""
    old = os.environ.get("NN2_CACHE")
    os.environ["NN2_CACHE"] = str(tmp_path_factory.mktemp("nn2-cache"))
    yield
    if old is None:
        del os.environ["NN2_CACHE"]
    else:
        os.environ["NN2_CACHE"] = old


@pytest.fixture
def run_cli():
    """Run a console script as a user would: returns CompletedProcess (text)."""
    def run(tool: str, *args, input: str | None = None, env: dict | None = None, timeout: float = 120):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([str(BIN / tool), *map(str, args)], input=input, capture_output=True,
                              text=True, env=full_env, timeout=timeout)
    return run


@pytest.fixture
def shakespeare():
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip("../shared/data/tinyshakespeare.txt is not here")
    return path

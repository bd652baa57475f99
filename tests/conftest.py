"""Fixtures shared by the tests (helpers that are not fixtures live in tests/support/)."""

from __future__ import annotations

import os
import subprocess

import pytest

from support.models import BIN, SHARED_DATA


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

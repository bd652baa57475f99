"""Golden listings: what `nn2c check` and `nn2run --dis` print for every sample kernel.

Each listing lives in tests/golden/ beside its kernel's name, so a change in a compiled
program shows up as a diff to review, not as a surprise. After a deliberate change,
rewrite them with

    NN2_UPDATE_GOLDEN=1 python -m pytest -q tests/test_golden.py

and read the diff before committing it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.models import ROOT, build_model

GOLDEN = Path(__file__).resolve().parent / "golden"
SAMPLES = sorted(p.stem for p in (ROOT / "samples" / "kernels").glob("*.eq"))
HIDDEN, VOCAB, LAYERS = 8, 10, 2
ONE_LAYER = {"jordan"}          # output feedback needs one layer


def _layers(kernel: str) -> int:
    return 1 if kernel in ONE_LAYER else LAYERS


def _compare(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("NN2_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"no golden listing {path.name}; write it with NN2_UPDATE_GOLDEN=1")
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        import difflib
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            f"golden/{name}", "now"))
        pytest.fail(f"the listing of {name} changed:\n{diff}")


def test_there_is_a_golden_listing_for_every_sample_kernel():
    assert len(SAMPLES) >= 5
    if os.environ.get("NN2_UPDATE_GOLDEN") != "1":
        stems = {p.name.split(".")[0] for p in GOLDEN.glob("*.txt")}
        assert stems == set(SAMPLES)


@pytest.mark.parametrize("kernel", SAMPLES)
def test_nn2c_check_listing_is_the_golden_one(kernel):
    from nn2c.compiler.report import describe_kernel
    text = describe_kernel(kernel, HIDDEN, VOCAB, _layers(kernel), optimized=True)
    _compare(f"{kernel}.check.txt", text.replace(str(ROOT) + os.sep, "") + "\n")


@pytest.mark.parametrize("kernel", SAMPLES)
def test_nn2run_dis_listing_is_the_golden_one(tmp_path, kernel):
    import nn2run
    from nn2run.dis import disassemble
    path = build_model(tmp_path / "m.nnb", kernel, HIDDEN, _layers(kernel), VOCAB)[0]
    with nn2run.load(path) as model:
        _compare(f"{kernel}.dis.txt", disassemble(model.program, model.tensors) + "\n")

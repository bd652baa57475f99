"""A normal (non-editable) install carries the grammar and the sample kernels."""

from __future__ import annotations

import subprocess
import site
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_wheel_contains_grammar_and_samples_and_works_outside_the_source_tree(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("nn2-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "nn2c/grammar/kernel.lark" in names
    assert "nn2c/samples/kernels/lstm.eq" in names and "nn2c/samples/corpus/rhymes.txt" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([venv / "bin" / "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel],
                   check=True, capture_output=True, timeout=300)
    r = subprocess.run([venv / "bin" / "python", "-c",
                        "import nn2c.parse, nn2c.kernels; print(nn2c.parse.grammar_path()); "
                        "print(nn2c.kernels.samples_dir())"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60,
                       env={"PYTHONPATH": site.getsitepackages()[0]})   # lark & co, but not the editable nn2
    assert r.returncode == 0, r.stderr
    grammar, samples = r.stdout.split()
    assert str(venv) in grammar and str(venv) in samples

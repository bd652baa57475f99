"""Packaging: `pip install nn2` is the runtime alone; `nn2c` without its extras says what
to install; a normal (non-editable) install carries the grammar and the sample kernels."""

from __future__ import annotations

import site
import subprocess
import sys
import textwrap
import zipfile

import pytest

from support.models import ROOT, build_model

HINT = 'install with: pip install "nn2[train]"'


def _launch(argv: list[str], blocked: tuple[str, ...]):
    """Run the `nn2c` console script's entry point with `blocked` packages unimportable."""
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {blocked!r}:
                    raise ImportError(f"{{name}} is blocked in this test")
        sys.meta_path.insert(0, Block())
        sys.argv = ["nn2c", *{argv!r}]
        from nn2c.launch import main
        main()
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, blocked, named", [
    (["train", "corpus.txt", "--steps", "1"], ("torch",), "torch"),
    (["train"], ("torch", "lark", "rich"), "lark, torch and rich"),
    (["check", "lstm"], ("lark",), "lark"),
    (["samples"], ("lark", "torch"), "lark"),
])
def test_nn2c_without_its_extras_prints_one_line_saying_what_to_install(argv, blocked, named):
    r = _launch(argv, blocked)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == f"nn2c: `nn2c {argv[0]}` needs {named}, not installed here; {HINT}\n"


def test_nn2c_check_runs_without_torch_and_help_and_version_without_any_extra():
    r = _launch(["check", "lstm", "--hidden", "4", "--vocab", "3"], ("torch", "rich"))
    assert r.returncode == 0, r.stderr
    assert "6 equations, OK" in r.stdout
    r = _launch(["train", "--help"], ("torch", "lark", "rich"))
    assert r.returncode == 0 and "--hidden" in r.stdout
    r = _launch(["--version"], ("torch", "lark", "rich"))
    assert r.returncode == 0 and "0.1.0" in r.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    return next(out.glob("nn2-*.whl"))


def _venv(path):
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return path / "bin"


@pytest.mark.slow
def test_wheel_contains_grammar_and_samples_and_works_outside_the_source_tree(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    assert "nn2c/grammar/kernel.lark" in names
    assert "nn2c/samples/kernels/lstm.eq" in names and "nn2c/samples/corpus/rhymes.txt" in names
    bin_ = _venv(tmp_path / "venv")
    subprocess.run([bin_ / "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel],
                   check=True, capture_output=True, timeout=300)
    r = subprocess.run([bin_ / "python", "-c",
                        "import nn2c.lang.parse, nn2c.lang.kernels; print(nn2c.lang.parse.grammar_path()); "
                        "print(nn2c.lang.kernels.samples_dir())"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60,
                       env={"PYTHONPATH": site.getsitepackages()[0]})   # lark & co, but not the editable nn2
    assert r.returncode == 0, r.stderr
    grammar, samples = r.stdout.split()
    assert str(tmp_path / "venv") in grammar and str(tmp_path / "venv") in samples


@pytest.mark.slow
def test_pip_install_without_extras_is_the_runtime_alone(wheel, tmp_path):
    bin_ = _venv(tmp_path / "venv")
    r = subprocess.run([bin_ / "pip", "install", "-q", wheel], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    env = {"PATH": str(bin_)}     # no PYTHONPATH: only what the wheel installed
    r = subprocess.run([bin_ / "python", "-c", "import importlib.util as u; "
                        "print([m for m in ('torch', 'lark', 'rich', 'numpy', 'click') if u.find_spec(m)])"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert r.stdout.strip() == "['numpy', 'click']", r.stderr

    model, _, _ = build_model(tmp_path / "m.nnb", "lstm", 8, 2, 5)
    r = subprocess.run([bin_ / "nn2run", model, "--prime", "abc", "-n", "20", "--seed", "1"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("abc") and len(r.stdout) >= 23

    r = subprocess.run([bin_ / "nn2c", "train", "--steps", "1"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"nn2c: `nn2c train` needs lark, torch and rich, not installed here; {HINT}\n"

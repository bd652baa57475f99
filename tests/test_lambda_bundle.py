"""`make lambda`'s bundle: nn2run, click, NumPy for the target architecture and the model."""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import subprocess
import sys
import zipfile

import pytest

from support.models import ROOT, build_model

TOOL = ROOT / "tools" / "lambda_bundle.py"
ELF_MACHINE = {"x86_64": 0x3E, "arm64": 0xB7}     # e_machine: EM_X86_64, EM_AARCH64
MiB = 1 << 20


def _tool_module():
    spec = importlib.util.spec_from_file_location("lambda_bundle", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bundle(*args, timeout=600):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF" and data[5] == 1, "not a little-endian ELF file"
    return int.from_bytes(data[18:20], "little")


def test_bundle_requirements_are_the_runtime_dependencies():
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    assert sorted(_tool_module().RUNTIME_REQUIREMENTS) == sorted(dependencies)


def test_a_file_that_is_not_a_model_gets_one_line_and_nothing_is_written(tmp_path):
    bad = tmp_path / "bad.nnb"
    bad.write_bytes(b"not a model at all")
    out = tmp_path / "b.zip"
    r = _bundle(bad, "--arch", "arm64", "-o", out)
    assert r.returncode == 2
    assert r.stderr.startswith(f"lambda_bundle: cannot load {bad}:") and r.stderr.count("\n") == 1
    assert not out.exists()


def test_a_missing_model_and_an_unknown_architecture_are_refused(tmp_path):
    r = _bundle(tmp_path / "none.nnb", "-o", tmp_path / "b.zip")
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    path, _, _ = build_model(tmp_path / "m.nnb", "lstm", 8, 1, 5)
    r = _bundle(path, "--arch", "sparc")
    assert r.returncode == 2 and "invalid choice: 'sparc'" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
def test_bundle_holds_runtime_click_numpy_for_the_arch_and_the_model(tmp_path, arch):
    model, _, _ = build_model(tmp_path / "tiny.nnb", "lstm", 8, 2, 5)
    out = tmp_path / f"lambda-{arch}.zip"
    r = _bundle(model, "--arch", arch, "--python", "3.11", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "handler   nn2run.aws.handler" in r.stdout
    assert "NN2_MODEL=/var/task/tiny.nnb" in r.stdout

    with zipfile.ZipFile(out) as z:
        infos = z.infolist()
        names = {i.filename for i in infos}
        assert {"tiny.nnb", "nn2run/__init__.py", "nn2run/vm.py", "click/__init__.py", "numpy/__init__.py"} <= names
        assert z.read("tiny.nnb") == model.read_bytes()
        tops = {n.split("/")[0] for n in names}
        assert not tops & {"torch", "lark", "rich", "nn2c", "bin"}
        assert not any("__pycache__" in n for n in names)
        shared = [i for i in infos if re.search(r"\.so(\.|$)", i.filename)]
        core = [i.filename for i in shared if "_multiarray_umath.cpython-311" in i.filename]
        assert core, "no NumPy extension module for CPython 3.11"
        for info in shared:      # NumPy's own modules and the BLAS it vendors
            assert _elf_machine(z.read(info)) == ELF_MACHINE[arch], info.filename
            assert (info.external_attr >> 16) & 0o444 == 0o444, f"{info.filename} is not world-readable"
        unzipped = sum(i.file_size for i in infos)

    zipped = out.stat().st_size
    sizes = dict(re.findall(r"(zipped|unzipped)\s+([\d.]+) MiB", r.stdout))
    assert float(sizes["zipped"]) == pytest.approx(zipped / MiB, abs=0.051)
    assert float(sizes["unzipped"]) == pytest.approx(unzipped / MiB, abs=0.051)
    assert zipped < 50 * MiB and unzipped < 250 * MiB
    assert "of the 50 MiB limit for a direct upload" in r.stdout and "of the 250 MiB limit" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or sys.version_info[:2] != (3, 11),
                    reason="runs the x86_64 / CPython 3.11 bundle on this machine")
def test_the_unpacked_bundle_generates_with_nothing_but_the_standard_library_beside_it(tmp_path):
    model, _, _ = build_model(tmp_path / "tiny.nnb", "lstm", 8, 2, 5)
    out = tmp_path / "b.zip"
    assert _bundle(model, "--arch", "x86_64", "-o", out).returncode == 0
    task = tmp_path / "task"
    zipfile.ZipFile(out).extractall(task)
    # -S: no site-packages, so numpy and click can only come from the bundle.
    code = ("import sys, numpy, click, nn2run.cli; "
            "assert all(m.__file__.startswith(sys.argv[1]) for m in (numpy, click, nn2run)); "
            "sys.argv = ['nn2run', sys.argv[2], '--prime', 'abc', '-n', '20', '--seed', '1']; nn2run.cli.main()")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(task)}
    r = subprocess.run([sys.executable, "-S", "-c", code, str(task), str(task / "tiny.nnb")], capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("abc") and len(r.stdout) >= 23

"""nn2c's subpackages import one way: train → backend → compiler → lang, and torch only
from backend and train (the language and the compiler run where torch is absent)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

NN2C = Path(__file__).resolve().parents[1] / "nn2c"
ORDER = ["lang", "compiler", "backend", "train"]          # each may import only those before it
TORCH_FREE = ["lang", "compiler"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("sub", ORDER)
def test_a_subpackage_imports_only_the_layers_below_it(sub):
    allowed = set(ORDER[:ORDER.index(sub) + 1])
    wrong = []
    for path in sorted((NN2C / sub).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "nn2c" and len(parts) > 1 and parts[1] in ORDER and parts[1] not in allowed:
                wrong.append(f"{path.relative_to(NN2C)} imports {name}")
            if sub in TORCH_FREE and parts[0] == "torch":
                wrong.append(f"{path.relative_to(NN2C)} imports torch")
    assert not wrong, wrong


def test_no_relative_import_reaches_above_its_subpackage():
    for path in NN2C.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                depth = len(path.relative_to(NN2C).parts) - 1
                assert node.level <= depth, f"{path}: from {'.' * node.level}{node.module or ''}"


def test_the_language_and_the_compiler_import_and_compile_with_torch_absent():
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "rich"):
                    raise ImportError(f"{name} is blocked in this test")
        sys.meta_path.insert(0, Block())
        import nn2c.lang, nn2c.compiler
        for pkg in (nn2c.lang, nn2c.compiler):
            for m in pkgutil.iter_modules(pkg.__path__):
                if m.name != "export":                  # needs the optional onnx package
                    importlib.import_module(f"{pkg.__name__}.{m.name}")
        from nn2c.compiler.pipeline import compile_kernel
        compiled = compile_kernel("lstm", 8, 2, 10)
        print(len(compiled.program["code"]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) > 10

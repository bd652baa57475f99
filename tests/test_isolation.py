"""The runtime imports NumPy, click and the standard library only."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from support.models import build_model

BLOCKER = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "lark", "rich", "nn2c"):
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, Block())
""")


def _run(code: str):
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_nn2run_generates_with_torch_lark_rich_and_nn2c_unimportable(tmp_path):
    path, _, _ = build_model(tmp_path / "m.nnb", "lstm", 8, 2, 5)
    r = _run(f"""
        import sys
        from nn2run.cli import main
        sys.argv = ["nn2run", {str(path)!r}, "--prime", "abc", "-n", "20", "--seed", "1"]
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "lark", "rich", "nn2c"))
        assert not bad, bad
        assert "numpy.random" not in sys.modules        # ~10 ms of every start: the sampler's draws are the stdlib's
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("abc") and len(r.stdout) >= 23


def test_every_nn2run_module_imports_only_numpy_click_and_the_standard_library():
    r = _run("""
        import pkgutil, importlib, sys
        import nn2run
        for m in pkgutil.iter_modules(nn2run.__path__):
            importlib.import_module("nn2run." + m.name)
        std = set(sys.stdlib_module_names)
        third = sorted({m.split(".")[0] for m in sys.modules} - std - {"nn2run", "numpy", "click", "__main__"})
        print(third)
    """)
    assert r.returncode == 0, r.stderr
    allowed = {"_distutils_hack", "importlib_metadata", "colorama"}   # click's optional helpers on some systems
    assert set(eval(r.stdout.strip())) <= allowed

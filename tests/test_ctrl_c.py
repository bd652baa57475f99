"""Ctrl-C in an `nn2c` command outside training's own handling (which saves and says where,
tests/test_train_safety.py) is one line, `nn2c: interrupted`, and status 130 — never click's
"Aborted!" with status 1, nor a traceback. So is Ctrl-C while `nn2run` starts."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import tomllib
from click.testing import CliRunner

from support.models import BIN


def test_ctrl_c_while_a_command_waits_on_its_input_exits_130_in_one_line(tmp_path):
    pytest.importorskip("matplotlib")
    # the log is a pipe nobody writes to: the command waits in its read until the signal
    p = subprocess.Popen([str(BIN / "nn2c"), "plot", "/dev/stdin", "-o", str(tmp_path / "loss.png")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(3)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and err == b"nn2c: interrupted\n"
    assert not (tmp_path / "loss.png").exists()


def test_ctrl_c_while_train_checks_its_options_exits_130(tmp_path, monkeypatch):
    import nn2c.cli

    def interrupted(*args, **kwargs):           # where the first import of torch happens
        raise KeyboardInterrupt
    monkeypatch.setattr(nn2c.cli, "_launching", interrupted)
    result = CliRunner().invoke(nn2c.cli.main, ["train", "-o", str(tmp_path / "m.nnb")])
    assert result.exit_code == 130 and result.stderr == "nn2c: interrupted\n"


class _InterruptedImport:
    """A module finder that raises KeyboardInterrupt when nn2c.cli is imported."""

    def find_spec(self, name, path=None, target=None):
        if name == "nn2c.cli":
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_the_command_line_is_imported_exits_130(monkeypatch, capsys):
    from nn2c import launch
    monkeypatch.delitem(sys.modules, "nn2c.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptedImport(), *sys.meta_path])
    monkeypatch.setattr(sys, "argv", ["nn2c", "samples"])
    try:
        launch.main()
    except KeyboardInterrupt:                   # caught here: raised on, it would stop pytest
        pytest.fail("the KeyboardInterrupt went through: a traceback")
    except SystemExit as stop:
        assert stop.code == 130 and capsys.readouterr().err == "nn2c: interrupted\n"
    else:
        pytest.fail("nn2c ran on")


def test_ctrl_c_while_nn2run_imports_numpy_exits_130_in_one_line():
    # the console script's first ~0.2 s are NumPy's and click's imports, before any nn2run code
    code = textwrap.dedent("""
        import sys
        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name == "numpy":
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, Interrupt())
        sys.argv = ["nn2run", "m.nnb", "-n", "5"]
        from nn2run.launch import main
        main()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and r.stderr == "nn2run: interrupted\n" and r.stdout == ""


def test_the_nn2run_console_script_is_the_launcher():
    with open(Path(__file__).parents[1] / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["nn2run"] == "nn2run.launch:main"

"""A file of the wrong kind given to a command (a seq2seq model or its training checkpoint
where a language model is wanted, and the reverse) is one line naming what the file is,
a non-zero exit and nothing written; the commands run as a user runs them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from nn2c.cli import main as nn2c_main
from support.models import build_model


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    """(model, checkpoint) of a seq2seq run of two steps on reversed strings."""
    folder = tmp_path_factory.mktemp("s2s")
    pairs, model = folder / "rev.tsv", folder / "rev.nnb"
    runner = CliRunner()
    result = runner.invoke(nn2c_main, ["tasks", "reverse", "-n", "200", "--max-len", "4", "-o", str(pairs)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(nn2c_main, ["train", "--task", "seq2seq", str(pairs), "-o", str(model), "--steps", "2",
                                       "--hidden", "4", "--batch", "8", "--eval-every", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return model, folder / "rev.nnb.ckpt"


def one_line(result, tool: str, code: int, *words: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert result.returncode == code and len(lines) == 1 and lines[0].startswith(f"{tool}: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize("args", [["MODEL", "-n", "5"], ["MODEL", "--info"], ["score", "MODEL"],
                                  ["translate", "MODEL"]])
def test_nn2run_names_a_seq2seq_training_checkpoint(run_cli, seq2seq, args):
    args = [str(seq2seq[1]) if a == "MODEL" else a for a in args]
    r = run_cli("nn2run", *args, input="abc\n")
    line = one_line(r, "nn2run", 2, "seq2seq training checkpoint", "not a model")
    assert "program" not in line and r.stdout == ""


@pytest.mark.parametrize("which, words", [(0, ["seq2seq model"]), (1, ["seq2seq training checkpoint"])])
def test_nn2c_export_refuses_a_seq2seq_file_in_one_line(run_cli, seq2seq, tmp_path, which, words):
    pytest.importorskip("onnx")
    out = tmp_path / "m.onnx"
    one_line(run_cli("nn2c", "export", seq2seq[which], "--onnx", out), "nn2c", 1, *words)
    assert not out.exists()


def test_nn2c_quantize_refuses_a_seq2seq_checkpoint_naming_it(run_cli, seq2seq, tmp_path):
    # a seq2seq model itself is quantized (tests/test_quantize.py); its checkpoint is not a model
    out = tmp_path / "q.nnb"
    line = one_line(run_cli("nn2c", "quantize", seq2seq[1], "--dtype", "int8", "-o", out), "nn2c", 1,
                    "seq2seq training checkpoint")
    assert "program" not in line and not out.exists()


def test_resuming_a_language_model_from_a_seq2seq_checkpoint_says_which_task(run_cli, seq2seq, tmp_path):
    r = run_cli("nn2c", "train", "--resume", "--checkpoint", seq2seq[1], "-o", tmp_path / "lm.nnb",
                "--device", "cpu")
    line = one_line(r, "nn2c", 1, "seq2seq training checkpoint", "--task seq2seq")
    assert "damaged" not in line and not (tmp_path / "lm.nnb").exists()


def test_resuming_a_seq2seq_run_from_a_language_models_checkpoint_is_refused(run_cli, tmp_path):
    lm, _, _ = build_model(tmp_path / "lm.nnb", "lstm", 8, 1, 5)
    r = run_cli("nn2c", "train", "--task", "seq2seq", "--resume", "--checkpoint", lm, "-o", tmp_path / "s.nnb")
    one_line(r, "nn2c", 1, "not a seq2seq training checkpoint")

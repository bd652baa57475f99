"""`nn2c train --log` (one JSON line per evaluation, continued on --resume) and `nn2c plot`
(the loss curves as a PNG)."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from nn2c.cli import main as nn2c_main
from support.runs import one_line

SMALL = ["--hidden", "8", "--layers", "1", "--seq-len", "8", "--batch", "4", "--device", "cpu",
         "--eval-every", "10", "--lr", "0.01"]
PROGRESS = re.compile(r"^step (\d+)/(\d+)  loss (\S+)  val (\S+)  ([\d,]+) chars/s  eta")


def invoke(*args):
    result = CliRunner().invoke(nn2c_main, list(map(str, args)))
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    assert "Traceback" not in result.stderr
    return result


def ok(result):
    assert result.exit_code == 0, result.stderr
    return result



def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def progress_lines(stderr: str) -> dict[int, tuple[str, str]]:
    """step -> (loss, val) as the plain progress lines print them."""
    found = {}
    for line in stderr.splitlines():
        m = PROGRESS.match(line)
        if m:
            found[int(m.group(1))] = (m.group(3), m.group(4))
    return found


@pytest.fixture
def corpus(tmp_path):
    import random
    rng = random.Random(1)
    words = "the cat sat on a mat and dog ran far away".split()
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(1500)), encoding="utf-8")
    return path


def test_the_log_has_one_record_per_evaluation_matching_the_progress_lines(tmp_path, corpus):
    log = tmp_path / "run.jsonl"
    result = ok(invoke("train", corpus, "-o", tmp_path / "m.nnb", *SMALL, "--steps", 45, "--log", log))
    recs = records(log)
    assert [r["step"] for r in recs] == [10, 20, 30, 40, 45]         # every --eval-every and the last step
    shown = progress_lines(result.stderr)
    for r in recs:
        assert set(r) == {"step", "train_loss", "val_loss", "chars_per_s", "elapsed_s", "lr"}
        assert shown[r["step"]] == (f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}")
        assert r["lr"] == 0.01 and r["chars_per_s"] > 0
    elapsed = [r["elapsed_s"] for r in recs]
    assert all(0 < a < b for a, b in zip(elapsed, elapsed[1:]))
    best = min(recs, key=lambda r: r["val_loss"])
    assert f"val loss {best['val_loss']:.4f} (best, step {best['step']})" in result.stderr.splitlines()[-1]


def test_resume_continues_the_log_and_its_clock(tmp_path, corpus):
    log, out = tmp_path / "run.jsonl", tmp_path / "m.nnb"
    ok(invoke("train", corpus, "-o", out, *SMALL, "--steps", 20, "--log", log))
    first = log.read_text(encoding="utf-8")
    ok(invoke("train", corpus, "-o", out, "--resume", "--steps", 40, "--log", log))
    text = log.read_text(encoding="utf-8")
    assert text.startswith(first)
    recs = records(log)
    assert [r["step"] for r in recs] == [10, 20, 30, 40]
    assert recs[2]["elapsed_s"] > recs[1]["elapsed_s"]               # training time, over both runs


def test_resume_drops_records_past_the_checkpoint_and_a_torn_last_line(tmp_path, corpus):
    """A run killed after logging but before its next checkpoint: the resumed run trains those
    steps again and logs them once."""
    log, out = tmp_path / "run.jsonl", tmp_path / "m.nnb"
    ok(invoke("train", corpus, "-o", out, *SMALL, "--steps", 20, "--log", log))
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 30, "train_loss": 9.0, "val_loss": 9.0, "chars_per_s": 1,
                            "elapsed_s": 1.0, "lr": 0.01}) + "\n" + '{"step": 4')
    ok(invoke("train", corpus, "-o", out, "--resume", "--steps", 30, "--log", log))
    recs = records(log)
    assert [r["step"] for r in recs] == [10, 20, 30]
    assert recs[2]["train_loss"] != 9.0


def test_a_new_run_starts_the_log_afresh(tmp_path, corpus):
    log = tmp_path / "run.jsonl"
    log.write_text("old\n", encoding="utf-8")
    ok(invoke("train", corpus, "-o", tmp_path / "m.nnb", *SMALL, "--steps", 10, "--log", log))
    assert [r["step"] for r in records(log)] == [10]


def test_without_validation_the_log_records_no_val_loss(tmp_path, corpus):
    log = tmp_path / "run.jsonl"
    ok(invoke("train", corpus, "-o", tmp_path / "m.nnb", *SMALL, "--steps", 20, "--val-frac", 0, "--log", log))
    recs = records(log)
    assert [r["step"] for r in recs] == [10, 20] and all(r["val_loss"] is None for r in recs)


@pytest.mark.parametrize("where, fragment", [("missing/run.jsonl", "does not exist"), ("m.nnb", "same file"),
                                             ("corpus.txt", "is the corpus")])
def test_a_log_path_that_cannot_be_used_is_refused_before_training(tmp_path, corpus, where, fragment):
    result = invoke("train", corpus, "-o", tmp_path / "m.nnb", *SMALL, "--steps", 10, "--log", tmp_path / where)
    one_line(result, fragment)
    assert not (tmp_path / "m.nnb").exists()


def test_resume_with_a_damaged_log_is_one_line(tmp_path, corpus):
    log, out = tmp_path / "run.jsonl", tmp_path / "m.nnb"
    ok(invoke("train", corpus, "-o", out, *SMALL, "--steps", 10, "--log", log))
    log.write_text("not json\n" + log.read_text(encoding="utf-8"), encoding="utf-8")
    one_line(invoke("train", corpus, "-o", out, "--resume", "--steps", 20, "--log", log), "run.jsonl:1")


# --- nn2c plot ---------------------------------------------------------------------------------

def _log(path, losses, val=True):
    with open(path, "w", encoding="utf-8") as f:
        for i, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": 10 * i, "train_loss": loss, "val_loss": loss + 0.1 if val else None,
                                "chars_per_s": 1000, "elapsed_s": 1.5 * i, "lr": 0.002}) + "\n")
    return path


def _pixels_near(image: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((np.abs(image[..., :3] * 255 - np.array(rgb)).max(-1) < 30).sum())


BLUE, ORANGE = (31, 119, 180), (255, 127, 14)          # matplotlib's C0 and C1


@pytest.mark.parametrize("x_axis", ["step", "time"])
def test_plot_draws_one_colour_per_run_into_a_png_that_decodes(tmp_path, x_axis):
    pytest.importorskip("matplotlib")
    import matplotlib.image
    a = _log(tmp_path / "a.jsonl", [3.0, 2.5, 2.0, 1.8])
    b = _log(tmp_path / "b.jsonl", [3.1, 2.2, 1.7, 1.5, 1.4])
    out = tmp_path / "loss.png"
    result = ok(invoke("plot", a, b, "-o", out, "--x", x_axis))
    assert "wrote" in result.stderr and out.stat().st_size > 10_000
    image = matplotlib.image.imread(str(out))
    assert image.shape[:2] == (500, 800)
    assert _pixels_near(image, BLUE) > 300 and _pixels_near(image, ORANGE) > 300


def test_plot_of_one_run_has_only_its_colour(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image
    out = tmp_path / "loss.png"
    ok(invoke("plot", _log(tmp_path / "a.jsonl", [3.0, 2.0, 1.0]), "-o", out))
    image = matplotlib.image.imread(str(out))
    assert _pixels_near(image, BLUE) > 300 and _pixels_near(image, ORANGE) == 0


def test_plot_of_a_real_training_log(tmp_path, corpus):
    pytest.importorskip("matplotlib")
    log, out = tmp_path / "run.jsonl", tmp_path / "loss.png"
    ok(invoke("train", corpus, "-o", tmp_path / "m.nnb", *SMALL, "--steps", 30, "--log", log))
    ok(invoke("plot", log, "-o", out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content, fragment", [
    ("", "holds no training-log records"),
    ('{"step": 10, "train_loss": 1.0}\nnot json\n', "bad.jsonl:2: not a training-log record"),
    ('{"train_loss": 1.0}\n', "bad.jsonl:1"),
    ('{"step": 10, "train_loss": "low"}\n', "train_loss"),
    ('[1, 2]\n', "bad.jsonl:1"),
])
def test_plot_of_a_bad_log_is_one_line(tmp_path, content, fragment):
    pytest.importorskip("matplotlib")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    one_line(invoke("plot", bad, "-o", tmp_path / "loss.png"), fragment)
    assert not (tmp_path / "loss.png").exists()


def test_plot_of_a_missing_log_or_a_binary_file_is_one_line(tmp_path):
    pytest.importorskip("matplotlib")
    one_line(invoke("plot", tmp_path / "none.jsonl", "-o", tmp_path / "loss.png"), "no such file")
    blob = tmp_path / "blob.jsonl"
    blob.write_bytes(b"\xff\xfe\x00")
    one_line(invoke("plot", blob, "-o", tmp_path / "loss.png"), "not UTF-8")


@pytest.mark.parametrize("where, fragment", [("missing/loss.png", "does not exist"), ("adir", "a directory"),
                                             ("a.jsonl", "is the log")])
def test_plot_to_an_output_that_cannot_be_written_is_one_line(tmp_path, where, fragment):
    (tmp_path / "adir").mkdir()
    a = _log(tmp_path / "a.jsonl", [3.0, 2.0])
    before = a.read_bytes()
    one_line(invoke("plot", a, "-o", tmp_path / where), fragment)
    assert a.read_bytes() == before


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib fails
    one_line(invoke("plot", _log(tmp_path / "a.jsonl", [3.0, 2.0]), "-o", tmp_path / "loss.png"),
             "needs matplotlib", "pip install matplotlib")

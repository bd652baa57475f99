"""From `nn2c tasks` to `nn2run translate`, as a user runs them: a reverse task generated and
trained through the command line, then translated by the runtime from the written file."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import nn2run
import nn2run.format as fmt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _run(*args, stdin=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([os.path.join(BIN, args[0]), *map(str, args[1:])], input=stdin, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _pairs(path):
    return [tuple(line.split("\t")) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def reverse_model(tmp_path_factory):
    """Models trained on 3,000 reversed strings of up to 8 letters (about 10 s on one thread):
    rev.nnb after 1,000 steps, and early.nnb, the file as it was at step 300 (far from
    perfect), before the run was resumed to 1,000."""
    d = tmp_path_factory.mktemp("reverse")
    _run("nn2c", "tasks", "reverse", "-n", 3000, "--max-len", 8, "-o", d / "rev.tsv")
    lines = {}
    for steps, name in ((300, "early.nnb"), (1000, "rev.nnb")):
        train = _run("nn2c", "train", "--task", "seq2seq", d / "rev.tsv", "-o", d / "rev.nnb", "--hidden", 32,
                     "--steps", steps, "--lr", 5e-3, "--batch", 32, "--eval-every", 100, "--device", "cpu",
                     *(["--resume"] if steps > 300 else []))
        if name != "rev.nnb":
            (d / name).write_bytes((d / "rev.nnb").read_bytes())
        lines[name] = train.stderr.strip().splitlines()[-1]
    return d, lines


def test_translate_reverses_held_out_strings(reverse_model):
    d, _ = reverse_model
    _run("nn2c", "tasks", "reverse", "-n", 400, "--max-len", 8, "--seed", 1, "-o", d / "new.tsv")
    seen = {s for s, _ in _pairs(d / "rev.tsv")}
    held_out = [(s, t) for s, t in _pairs(d / "new.tsv") if s not in seen]
    assert len(held_out) >= 200
    out = _run("nn2run", "translate", d / "rev.nnb", stdin="".join(s + "\n" for s, _ in held_out)).stdout
    got = out.split("\n")
    assert len(got) == len(held_out) + 1 and got[-1] == ""      # one line out per line in
    right = sum(g == t for g, (_, t) in zip(got, held_out))
    assert right / len(held_out) >= 0.95, (right, len(held_out))


@pytest.mark.parametrize("name", ["early.nnb", "rev.nnb"])
def test_the_trainers_exact_match_is_what_the_runtime_gives_on_the_validation_split(reverse_model, tmp_path, name):
    from nn2c.train.seq2seq.pairs import read_pairs
    from nn2c.train.seq2seq.session import compile_network
    from nn2c.train.seq2seq.trainer import Seq2SeqConfig, Seq2SeqTrainer
    d, lines = reverse_model
    with fmt.read(str(d / name)) as f:
        assert f.header["nn2"]["kind"] == "seq2seq"
        provenance = f.header["provenance"]
        tensors = {n: np.array(a) for n, a in f.tensors.items()}
    reported = provenance["best_exact_match"]
    assert f"greedy exact match {100 * reported:.1f}%" in lines[name]
    # the same split and network as the run, without training: the trainer's greedy decoding
    cfg = Seq2SeqConfig.from_dict(provenance["hyperparameters"])
    trainer = Seq2SeqTrainer(cfg, read_pairs(str(d / "rev.tsv")), compile_network, str(tmp_path / "x.nnb"),
                             str(tmp_path / "x.ckpt"))
    val = trainer.validation_pairs()
    assert len(val) == 150                                   # 5% of 3,000
    trained = trainer.greedy_validation(tensors)
    with nn2run.load(str(d / name)) as model:
        ran = model.translate([s for s, _ in val], beam=1)
    assert ran == trained                                    # the same translations, one by one
    assert sum(r == t for r, (_, t) in zip(ran, val)) / len(val) == reported
    assert (reported < 0.9) if name == "early.nnb" else (reported >= 0.95)
    assert not (tmp_path / "x.nnb").exists()                 # nothing trained, nothing written

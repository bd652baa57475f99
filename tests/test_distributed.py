"""`nn2c train --nproc N`: a job of N processes through torch.distributed (gloo here, on the
CPU). Two processes with half the rows each train the weights one process with all the rows
trains; a job killed at any moment resumes to the weights of an uninterrupted job; a killed
rank or Ctrl-C stops the job in one line with the last checkpoint whole."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import nn2run.format as fmt
from support.models import BIN
from support.runs import ONE_THREAD as ENV
from support.runs import checkpoint_step, finish, nn2c, wait_for_checkpoint, write_corpus

SMALL = ["--hidden", "16", "--layers", "2", "--seq-len", "8", "--batch", "8", "--device", "cpu",
         "--eval-every", "10"]
LONG = ["--hidden", "12", "--layers", "1", "--seq-len", "8", "--batch", "4", "--device", "cpu",
        "--eval-every", "50", "--checkpoint-every", "10", "--seed", "7"]
LONG_STEPS = 1500





def run(*args, timeout=300):
    return finish(nn2c(*args), timeout)


def tensors(path) -> dict:
    with fmt.read(path, verify_data=True) as f:
        return {name: np.array(t) for name, t in f.tensors.items()}




def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def rank_of(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return int(env[b"RANK"])


def wait_gone(pids: list[int], timeout=30.0) -> None:
    """Every process in `pids` has exited (or is a zombie waiting for its parent)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.append(pid)
            except FileNotFoundError:
                pass
        if not alive:
            return
        assert time.monotonic() < deadline, f"processes {alive} outlived the job"
        time.sleep(0.05)


def nn2c_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("nn2c:")]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), f"tensor {name} differs"


def max_difference(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a
               if not k.startswith(("rng/", "carried/")) and a[k].dtype.kind == "f")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def test_two_processes_with_half_the_rows_give_the_weights_of_one_with_all(tmp_path, corpus, run_cli):
    rc, _, err = run(corpus, "-o", tmp_path / "one.nnb", *SMALL, "--steps", 40)
    assert rc == 0, err
    rc, _, err = run(corpus, "-o", tmp_path / "two.nnb", *SMALL, "--steps", 40, "--nproc", 2)
    assert rc == 0, err
    assert "× 2 processes" in err.splitlines()[-1]
    one, two = tensors(tmp_path / "one.nnb.ckpt"), tensors(tmp_path / "two.nnb.ckpt")
    # weights, Adam's moments, best weights: the same up to float rounding of the split sums
    assert max_difference(one, two) < 1e-5
    for name in one:
        if name.startswith("carried/"):           # each rank's rows, gathered in order
            np.testing.assert_allclose(two[name], one[name], atol=1e-5)
    assert "rng/torch@1" in two
    with fmt.read(tmp_path / "two.nnb") as f:
        assert f.header["provenance"]["world_size"] == 2
    info = run_cli("nn2run", tmp_path / "two.nnb", "--info").stdout
    assert any(line.split() == ["world_size", "2"] for line in info.splitlines())


def test_a_batch_that_does_not_split_and_a_bad_nproc_are_one_line(tmp_path, corpus):
    for extra, fragment in ((["--batch", 7, "--nproc", 2], "--batch 7 does not split evenly over 2 processes"),
                            (["--nproc", 0], "--nproc must be ≥ 1")):
        rc, _, err = run(corpus, "-o", tmp_path / "m.nnb", *SMALL, "--steps", 5, *extra)
        assert rc == 1 and nn2c_lines(err) == err.splitlines() and len(err.splitlines()) == 1, err
        assert fragment in err
        assert not (tmp_path / "m.nnb").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """An uninterrupted two-process job."""
    out = tmp_path_factory.mktemp("ref") / "ref.nnb"
    rc, _, err = run(corpus, "-o", out, "--steps", LONG_STEPS, *LONG, "--nproc", 2)
    assert rc == 0, err
    return tensors(out), tensors(str(out) + ".ckpt")


@pytest.mark.slow
def test_sigkill_of_the_job_then_resume_ends_with_the_weights_of_an_uninterrupted_job(tmp_path, corpus, reference):
    out, ckpt = tmp_path / "m.nnb", tmp_path / "m.nnb.ckpt"
    proc = nn2c(corpus, "-o", out, "--steps", LONG_STEPS, *LONG, "--nproc", 2, start_new_session=True)
    wait_for_checkpoint(ckpt, 100, proc)
    ranks = children(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)               # the launcher; its ranks die with it
    assert finish(proc)[0] == -signal.SIGKILL
    assert len(ranks) == 2
    wait_gone(ranks)
    killed_at = checkpoint_step(ckpt)
    assert 100 <= killed_at < LONG_STEPS and killed_at % 10 == 0
    fmt.read(ckpt, verify_data=True).close()
    rc, _, err = run(corpus, "-o", out, "--steps", LONG_STEPS, *LONG, "--nproc", 2, "--resume")
    assert rc == 0, err
    assert "warning" not in err
    assert_same_tensors(tensors(out), reference[0])
    assert_same_tensors(tensors(ckpt), reference[1])


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_in_one_line_and_the_checkpoint_resumes(tmp_path, corpus, reference):
    out, ckpt = tmp_path / "m.nnb", tmp_path / "m.nnb.ckpt"
    proc = nn2c(corpus, "-o", out, "--steps", LONG_STEPS, *LONG, "--nproc", 2)
    wait_for_checkpoint(ckpt, 100, proc)
    ranks = children(proc.pid)
    rank1 = next(pid for pid in ranks if rank_of(pid) == 1)
    os.kill(rank1, signal.SIGKILL)
    rc, _, err = finish(proc)
    assert rc == 1 and "Traceback" not in err
    lines = nn2c_lines(err)
    step = checkpoint_step(ckpt)
    assert lines == [f"nn2c: process 1 of 2 was killed by SIGKILL; the job stopped; the last checkpoint is "
                     f"{ckpt} (step {step}); continue with --resume --nproc 2"], err
    wait_gone(ranks)
    fmt.read(ckpt, verify_data=True).close()
    rc, _, err = run(corpus, "-o", out, "--steps", LONG_STEPS, *LONG, "--nproc", 2, "--resume")
    assert rc == 0, err
    assert_same_tensors(tensors(out), reference[0])


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_one_step_and_resume_finishes_the_same_job(tmp_path, corpus, reference):
    out, ckpt = tmp_path / "m.nnb", tmp_path / "m.nnb.ckpt"
    proc = nn2c(corpus, "-o", out, "--steps", LONG_STEPS, *LONG, "--nproc", 2)
    wait_for_checkpoint(ckpt, 100, proc)
    proc.send_signal(signal.SIGINT)
    rc, _, err = finish(proc)
    assert rc == 130, err
    step = checkpoint_step(ckpt)
    assert nn2c_lines(err) == [f"nn2c: interrupted at step {step}: checkpoint {ckpt}, best weights so far in "
                               f"{out}; continue with --resume"], err
    assert step < LONG_STEPS and out.exists()
    rc, _, err = run(corpus, "-o", out, "--steps", LONG_STEPS, *LONG, "--nproc", 2, "--resume")
    assert rc == 0, err
    assert_same_tensors(tensors(out), reference[0])


@pytest.mark.slow
def test_a_resume_in_another_number_of_processes_warns_and_trains_on(tmp_path, corpus):
    out = tmp_path / "m.nnb"
    rc, _, err = run(corpus, "-o", out, *SMALL, "--steps", 10, "--nproc", 2)
    assert rc == 0, err
    rc, _, err = run(corpus, "-o", out, "--resume", "--steps", 20)
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("nn2c: warning:")]
    assert len(warnings) == 1 and "a job of 2 processes and resumes in 1" in warnings[0]


@pytest.mark.slow
def test_torchrun_runs_the_same_job(tmp_path, corpus):
    torchrun = shutil.which("torchrun", path=str(BIN)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    rc, _, err = run(corpus, "-o", tmp_path / "ref.nnb", *SMALL, "--steps", 20, "--nproc", 2)
    assert rc == 0, err
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "nn2c", "train", str(corpus),
                           "-o", str(tmp_path / "m.nnb"), *SMALL, "--steps", "20"], env=ENV, text=True,
                          capture_output=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("wrote ") == 1                # rank 0 speaks, once
    assert_same_tensors(tensors(tmp_path / "m.nnb"), tensors(tmp_path / "ref.nnb"))


def test_python_dash_m_nn2c_is_the_cli():
    proc = subprocess.run([sys.executable, "-m", "nn2c", "--version"], env=ENV, text=True, capture_output=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("nn2c"), proc.stderr

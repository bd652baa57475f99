"""The seq2seq trainer: pairs files, the torch model of a hand-built Bahdanau network against
a float64 NumPy reference, padding, training on a generated copy task, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nn2c.compiler.emit import pack, unpack
from nn2c.compiler.seq2seq import init_seq2seq_tensors as init_tensors
from nn2c.train.seq2seq.model import Seq2SeqTorch
from tests.support.seq2seq_ir import seq2seq_network

VS, VT, H, L = 6, 9, 8, 2          # target: 7 characters, BEGIN 7, END 8


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _reference_gru(w: dict, layer: int, xs: np.ndarray) -> np.ndarray:
    """torch.nn.GRU's layer (torchgru.eq) in float64 NumPy over one sequence: (T, in) -> (T, H)."""
    g = lambda n: w[f"{n}@{layer}"]            # noqa: E731
    h = np.zeros(H)
    out = []
    for x in xs:
        r = _sigmoid(g("W_ir") @ x + g("b_ir") + g("W_hr") @ h + g("b_hr"))
        z = _sigmoid(g("W_iz") @ x + g("b_iz") + g("W_hz") @ h + g("b_hz"))
        n = np.tanh(g("W_in") @ x + g("b_in") + r * (g("W_hn") @ h + g("b_hn")))
        h = (1 - z) * n + z * h
        out.append(h)
    return np.array(out)


def _memory(w: dict, src: list[int]) -> np.ndarray:
    """The encoder's top-layer outputs for one source, (J, H)."""
    x = np.eye(VS)[src]
    for k in range(L):
        x = _reference_gru(w, k, x)
    return x


def _reference(w: dict, src: list[int], tgt_in: list[int]):
    """Bahdanau's equations for one pair: (memory (J, H), attention (U, J), logits (U, Vt))."""
    memory = _memory(w, src)
    d = lambda n: w[f"{n}@{L}"]                 # noqa: E731
    s = np.tanh(d("W_0") @ memory[-1] + d("b_0"))
    alphas, logits = [], []
    for tok in tgt_in:
        y = np.eye(VT)[tok]
        e = np.array([d("v_a") @ np.tanh(d("W_a") @ s + d("U_a") @ h) for h in memory])
        a = np.exp(e - e.max())
        a /= a.sum()
        c = a @ memory
        r = _sigmoid(d("W_ir") @ y + d("C_r") @ c + d("b_ir") + d("W_hr") @ s + d("b_hr"))
        z = _sigmoid(d("W_iz") @ y + d("C_z") @ c + d("b_iz") + d("W_hz") @ s + d("b_hz"))
        n = np.tanh(d("W_in") @ y + d("C_n") @ c + d("b_in") + r * (d("W_hn") @ s + d("b_hn")))
        s = (1 - z) * n + z * s
        alphas.append(a)
        logits.append(d("W_y") @ s + d("b_y"))
    return memory, np.array(alphas), np.array(logits)


def _model(seed=3, dtype=np.float64):
    net = seq2seq_network(VS, VT, H, L)
    tensors = init_tensors(net, seed)
    rng = np.random.default_rng(seed)          # biases away from 0, so they are exercised too
    tensors = {n: (a + rng.uniform(-0.3, 0.3, a.shape)).astype(dtype) for n, a in tensors.items()}
    return net, tensors, Seq2SeqTorch(net, tensors)


PAIRS = [([1, 2, 3, 4, 5], [7, 0, 1, 2, 3, 4, 5]), ([2, 0], [7, 6, 6]), ([5, 4, 3], [7, 1]),
         ([3], [7, 2, 3, 4, 5])]


def _batch(pairs):
    T, U = max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs)
    src = torch.zeros(T, len(pairs), dtype=torch.int64)
    tin = torch.zeros(U, len(pairs), dtype=torch.int64)
    for b, (s, t) in enumerate(pairs):
        src[:len(s), b] = torch.tensor(s)
        tin[:len(t), b] = torch.tensor(t)
    return src, torch.tensor([len(s) for s, _ in pairs]), tin


def test_teacher_forced_logits_match_numpy_reference_on_padded_batch():
    net, tensors, model = _model()
    w = {k: v.astype(np.float64) for k, v in unpack(net.tensors(), tensors).items()}
    src, lengths, tin = _batch(PAIRS)
    with torch.no_grad():
        logits = model(src, lengths, tin).numpy()
        memory, _, mask = model.encode(src, lengths)
    for b, (s, t) in enumerate(PAIRS):
        ref_memory, _, ref_logits = _reference(w, s, t)
        np.testing.assert_allclose(memory[b, :len(s)].numpy(), ref_memory, atol=1e-5, rtol=0)
        np.testing.assert_allclose(logits[:len(t), b], ref_logits, atol=1e-5, rtol=0)
    assert mask[:, :, 0].tolist() == [[j < len(s) for j in range(src.shape[0])] for s, _ in PAIRS]


def test_a_sentence_alone_equals_it_inside_a_padded_batch():
    _, _, model = _model(seed=5, dtype=np.float32)
    src, lengths, tin = _batch(PAIRS)
    with torch.no_grad():
        together = model(src, lengths, tin)
        for b, (s, t) in enumerate(PAIRS):
            alone = model(*_batch([(s, t)]))
            torch.testing.assert_close(together[:len(t), b], alone[:, 0], atol=1e-6, rtol=0)
    greedy = model.greedy(src, lengths, 7, 8, 6)
    assert greedy == [model.greedy(*_batch([(s, t)])[:2], 7, 8, 6)[0] for s, t in PAIRS]


def test_greedy_never_chooses_begin_even_when_it_is_the_most_likely():
    net, tensors, _ = _model(seed=4, dtype=np.float32)
    logical = unpack(net.tensors(), tensors)
    logical[f"b_y@{L}"][7] = 50.0               # BEGIN (7) dominates every step's logits
    model = Seq2SeqTorch(net, pack(net.tensors(), logical))
    src, lengths, _ = _batch(PAIRS)
    got = model.greedy(src, lengths, 7, 8, 6)
    assert all(len(row) == 6 and 7 not in row for row in got)


# ---------------------------------------------------------------- pairs files

@pytest.mark.parametrize("text, words", [
    ("", ["is empty"]),
    ("ab\tba\ncd dc\n", [":2:", "no tab"]),
    ("ab\tba\n\tx\n", [":2:", "source is empty"]),
    ("ab\tb\ta\n", [":1:", "2 tabs"]),
    ("ab\t\ncd\t\n", ["every target is empty"]),
])
def test_bad_pairs_files_are_refused_in_one_line(tmp_path, text, words):
    from nn2c.train.seq2seq.pairs import PairsError, read_pairs
    path = tmp_path / "p.tsv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PairsError) as e:
        read_pairs(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_bad_utf8_is_named_by_its_line(tmp_path):
    from nn2c.train.seq2seq.pairs import PairsError, read_pairs
    path = tmp_path / "p.tsv"
    path.write_bytes(b"ab\tba\ncd\tdc\n\xff\tx\n")
    with pytest.raises(PairsError, match=r":3: not UTF-8"):
        read_pairs(str(path))


def test_codecs_batches_and_masks(tmp_path):
    from nn2c.train.seq2seq.pairs import Buckets, encode, make_batch, read_pairs, split
    path = tmp_path / "p.tsv"
    path.write_text("\ufeffabc\txy\r\nb\tyyy\nca\t\n", encoding="utf-8")
    pairs = read_pairs(str(path))
    assert pairs.source_codec.vocab == ["a", "b", "c"] and pairs.target_codec.vocab == ["x", "y"]
    assert (pairs.begin, pairs.end, pairs.target_vocab) == (2, 3, 4)
    data = encode(pairs, np.arange(3))
    b = make_batch(data, np.array([0, 1, 2]), pairs.begin, torch.device("cpu"))
    assert b.src.t().tolist() == [[0, 1, 2], [1, 0, 0], [2, 0, 0]] and b.src_len.tolist() == [3, 1, 2]
    assert b.tgt_in.t().tolist() == [[2, 0, 1, 0], [2, 1, 1, 1], [2, 0, 0, 0]]
    assert b.tgt_out.t().tolist() == [[0, 1, 3, 0], [1, 1, 1, 3], [3, 0, 0, 0]]
    assert b.tgt_mask.sum(0).tolist() == [3, 4, 1]
    train, val = split(pairs, 0.34)
    assert len(val) == 1 and sorted([*train, *val]) == [0, 1, 2]
    buckets = Buckets(data, 1, seed=4, begin=2, device=torch.device("cpu"))
    epoch = [buckets.at_step(k).rows.tolist() for k in range(3)]
    assert sorted(sum(epoch, [])) == [0, 1, 2]
    assert epoch == [Buckets(data, 1, 4, 2, torch.device("cpu")).at_step(k).rows.tolist() for k in range(3)]


def test_generated_tasks_are_deterministic_and_correct():
    from nn2c.train.tasks import generate
    assert generate("dates", 50, seed=2) == generate("dates", 50, seed=2) != generate("dates", 50, seed=3)
    for src, tgt in generate("reverse", 20, seed=1, min_len=2, max_len=6):
        assert tgt == src[::-1] and 2 <= len(src) <= 6
    import datetime
    for _, iso in generate("dates", 200, seed=1):
        assert datetime.date.fromisoformat(iso).isoformat() == iso


# ---------------------------------------------------------------- training

def _copy_pairs(tmp_path, task="copy", n=1500, max_len=5):
    from nn2c.train.tasks import generate, tsv
    path = tmp_path / f"{task}.tsv"
    path.write_text(tsv(generate(task, n, seed=0, min_len=1, max_len=max_len)), encoding="utf-8")
    return str(path)


def _trainer(tmp_path, pairs_path, resume=None, **options):
    from nn2c.train.seq2seq.pairs import read_pairs
    from nn2c.train.seq2seq.session import compile_network
    from nn2c.train.seq2seq.trainer import Seq2SeqConfig, Seq2SeqTrainer
    cfg = Seq2SeqConfig(**{"encoder": "torchgru", "hidden": 32, "layers": 1, "batch": 32, "steps": 500,
                           "eval_every": 100, "val_frac": 0.1, "lr": 5e-3, "device": "cpu", **options})
    import io
    return Seq2SeqTrainer(cfg, read_pairs(pairs_path), compile_network, str(tmp_path / "m.nnb"),
                          str(tmp_path / "m.ckpt"), resume, stream=io.StringIO())


@pytest.mark.parametrize("task", ["copy", "reverse"])
def test_a_generated_task_reaches_95_percent_greedy_exact_match(tmp_path, task):
    import nn2run.format as fmt
    torch.set_num_threads(1)
    trainer = _trainer(tmp_path, _copy_pairs(tmp_path, task))
    summary = trainer.run()
    assert summary["best_exact_match"] >= 0.95, summary
    assert summary["loop"].startswith("encoder native")
    with fmt.read(str(tmp_path / "m.nnb")) as f:
        target = f.header["target"]
        assert f.header["nn2"]["kind"] == "seq2seq" and target["end"] == target["begin"] + 1
        kept = {n: np.array(a) for n, a in f.tensors.items()}
    # the file holds the best weights: greedy exact match of a model made from them agrees
    model = Seq2SeqTorch(trainer.compiled.network, kept)
    right = count = 0
    for b in trainer.val:
        got = model.greedy(b.src, b.src_len, trainer.pairs.begin, trainer.pairs.end, b.tgt_out.shape[0])
        want = [row[:n - 1] for row, n in zip(b.tgt_out.t().tolist(), b.tgt_mask.sum(0).tolist())]
        right += sum(g == w for g, w in zip(got, want))
        count += len(want)
    assert right / count == summary["best_exact_match"]


# ---------------------------------------------------------------- resume

RUN = """
import sys, torch
torch.set_num_threads(1)
from nn2c.train.seq2seq.session import Seq2SeqRequest, run_seq2seq
pairs, out, ckpt, resume = sys.argv[1:5]
options = dict(encoder="torchgru", hidden=16, layers=1, batch=16, steps=120, eval_every=30, checkpoint_every=10,
               val_frac=0.1, lr=5e-3, device="cpu")
run_seq2seq(Seq2SeqRequest(pairs, out, ckpt, resume == "1", options, frozenset()))
"""


def _run(tmp_path, pairs, name, resume=False):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", RUN, pairs, str(tmp_path / f"{name}.nnb"),
                             str(tmp_path / f"{name}.ckpt"), "1" if resume else "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights(path):
    import nn2run.format as fmt
    with fmt.read(str(path)) as f:
        return {n: np.array(a) for n, a in f.tensors.items()}, f.header["checkpoint"]


def test_resume_after_a_kill_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    import signal

    from tests.support.runs import wait_for_checkpoint
    pairs = _copy_pairs(tmp_path, n=400)
    whole = _run(tmp_path, pairs, "whole")
    killed = _run(tmp_path, pairs, "cut")
    seen = wait_for_checkpoint(tmp_path / "cut.ckpt", 40, killed, timeout=240)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert seen < 120
    resumed = _run(tmp_path, pairs, "cut", resume=True)
    for proc in (whole, resumed):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    a, meta_a = _weights(tmp_path / "whole.ckpt")
    b, meta_b = _weights(tmp_path / "cut.ckpt")
    assert meta_a["step"] == meta_b["step"] == 120
    assert a.keys() == b.keys()
    for name in a:      # weights, Adam's moments and the best weights, bit for bit
        assert np.array_equal(a[name], b[name]), name
    assert (meta_a["best_step"], meta_a["best_exact"]) == (meta_b["best_step"], meta_b["best_exact"])


# ---------------------------------------------------------------- command line

def _cli(*args):
    from click.testing import CliRunner

    from nn2c.cli import main
    return CliRunner().invoke(main, list(map(str, args)))


def test_nn2c_tasks_then_train_task_seq2seq(tmp_path):
    pairs = tmp_path / "copy.tsv"
    result = _cli("tasks", "copy", "-n", 600, "--max-len", 4, "--seed", 3, "-o", pairs)
    assert result.exit_code == 0, result.output
    lines = pairs.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 600 and all(a == b for a, b in (line.split("\t") for line in lines))
    result = _cli("train", "--task", "seq2seq", pairs, "--encoder", "torchgru", "--hidden", 16, "--steps", 40,
                  "--eval-every", 20, "--batch", 16, "--device", "cpu", "-o", tmp_path / "m.nnb")
    assert result.exit_code == 0, result.output
    assert "exact" in result.stderr and "greedy exact match" in result.stderr.splitlines()[-1]
    assert (tmp_path / "m.nnb").exists() and (tmp_path / "m.nnb.ckpt").exists()
    result = _cli("train", "--task", "seq2seq", pairs, "--encoder", "torchgru", "--hidden", 16, "--steps", 60,
                  "--device", "cpu", "-o", tmp_path / "m.nnb", "--resume")
    assert result.exit_code == 0, result.stderr          # options left out are the checkpoint's
    assert _weights(tmp_path / "m.nnb.ckpt")[1]["step"] == 60
    from tests.support.runs import one_line
    one_line(_cli("train", "--task", "seq2seq", pairs, "--encoder", "torchgru", "--hidden", 16, "--batch", 32,
                  "--steps", 80, "-o", tmp_path / "m.nnb", "--resume"), "--batch 32 differs from the checkpoint's 16")


@pytest.mark.parametrize("args, words", [
    (("--task", "seq2seq", "PAIRS", "--seq-len", 8), ["--seq-len does not apply to --task seq2seq"]),
    (("--task", "seq2seq", "PAIRS", "--kernel", "lstm"), ["--kernel does not apply"]),
    (("PAIRS", "--encoder", "gru"), ["--encoder is for --task seq2seq"]),
    (("--task", "seq2seq"), ["needs the pairs file"]),
    (("--task", "seq2seq", "BAD"), ["bad.tsv:3: no tab"]),
])
def test_train_task_seq2seq_refuses_in_one_line(tmp_path, args, words):
    from tests.support.runs import one_line
    (tmp_path / "p.tsv").write_text("ab\tab\n", encoding="utf-8")
    (tmp_path / "bad.tsv").write_text("ab\tab\ncd\tcd\nef ef\n", encoding="utf-8")
    args = [tmp_path / "p.tsv" if a == "PAIRS" else tmp_path / "bad.tsv" if a == "BAD" else a for a in args]
    one_line(_cli("train", *args, "-o", tmp_path / "m.nnb"), *words)


@pytest.mark.slow
def test_dates_to_iso_reach_99_percent_and_attention_beats_the_bridge_only_control(tmp_path):
    """Both models trained, written and run by nn2run: about 3 CPU-minutes on one thread."""
    import io

    import nn2run
    from nn2c.train.seq2seq.pairs import read_pairs
    from nn2c.train.seq2seq.session import compile_network
    from nn2c.train.seq2seq.trainer import Seq2SeqConfig, Seq2SeqTrainer
    from nn2c.train.tasks import generate, tsv
    torch.set_num_threads(1)
    path = tmp_path / "dates.tsv"
    path.write_text(tsv(generate("dates", 12000, seed=0)), encoding="utf-8")
    exact = {}
    for decoder in ("seq2seq/bahdanau", "seq2seq/bridge"):
        cfg = Seq2SeqConfig(decoder=decoder, hidden=64, batch=64, steps=1000, eval_every=250, lr=3e-3, device="cpu")
        out = tmp_path / f"{decoder.split('/')[1]}.nnb"
        trainer = Seq2SeqTrainer(cfg, read_pairs(str(path)), compile_network, str(out), str(tmp_path / "m.ckpt"),
                                 stream=io.StringIO())
        summary = trainer.run()
        val = trainer.validation_pairs()                       # 600 dates never trained on
        with nn2run.load(str(out)) as model:
            got = model.translate([s for s, _ in val], beam=1)
        exact[decoder] = sum(g == t for g, (_, t) in zip(got, val)) / len(val)
        assert exact[decoder] == summary["best_exact_match"]
    assert exact["seq2seq/bahdanau"] >= 0.99 and exact["seq2seq/bridge"] < exact["seq2seq/bahdanau"], exact


def test_luong_lstm_decoder_with_input_feeding_matches_numpy_reference():
    from tests.support.seq2seq_ir import luong_decoder
    from tests.support.seq2seq_ir import seq2seq_network as s2s
    net = s2s(VS, VT, H, L)
    net.decoder, net.bridge, net.bridge_tensors = luong_decoder(H, VT, L)
    rng = np.random.default_rng(11)
    tensors = {n: (a + rng.uniform(-0.3, 0.3, a.shape)).astype(np.float64) for n, a in init_tensors(net, 2).items()}
    w = unpack(net.tensors(), tensors)
    model = Seq2SeqTorch(net, tensors)
    src, lengths, tin = _batch(PAIRS)
    with torch.no_grad():
        logits = model(src, lengths, tin).numpy()
    d = lambda n: w[f"{n}@{L}"]                 # noqa: E731
    for b, (s_ids, t_ids) in enumerate(PAIRS):
        memory = _memory(w, s_ids)
        h, c, ht = np.tanh(d("W_0") @ memory[-1]), np.zeros(H), np.zeros(H)
        for t, tok in enumerate(t_ids):
            pre = d("W") @ np.concatenate([np.eye(VT)[tok], ht]) + d("U") @ h + d("b")
            i, f, g, o = _sigmoid(pre[:H]), _sigmoid(pre[H:2 * H]), np.tanh(pre[2 * H:3 * H]), _sigmoid(pre[3 * H:])
            c = f * c + i * g
            h = o * np.tanh(c)
            e = memory @ (d("W_a") @ h)
            a = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
            ht = np.tanh(d("W_c") @ np.concatenate([a @ memory, h]))
            np.testing.assert_allclose(logits[t, b], d("W_y") @ ht + d("b_y"), atol=1e-5, rtol=0)


def test_memory_beyond_a_rows_length_has_exactly_no_effect():
    """Attention gives the padding weight exactly 0 and Σⱼ skips it: whatever the memory holds
    there (even inf or NaN), every logit is bit for bit the same."""
    _, _, model = _model(seed=7)
    src, lengths, tin = _batch(PAIRS)
    P, _, _, memory, mask = model.start(src, lengths)
    final = memory[torch.arange(len(PAIRS)), lengths - 1]

    def logits(mem):
        K, inits = model._prepare(P, mem, final, mask)
        states, out = list(inits), []
        for t in range(tin.shape[0]):
            y, states = model._step(P, states, K, [h[0] for h in model._hoist(P, tin[t:t + 1], K, mask)], mem, mask)
            out.append(y)
        return torch.stack(out)

    with torch.no_grad():
        clean = logits(memory.masked_fill(~mask, 0.0))
        for junk in (float("nan"), float("inf"), 1e30):
            assert torch.equal(logits(memory.masked_fill(~mask, junk)), clean)


def test_nn2c_tasks_refuses_bad_sizes_in_one_line(tmp_path):
    from tests.support.runs import one_line
    one_line(_cli("tasks", "dates", "-n", 0, "-o", tmp_path / "d.tsv"), "-n must be > 0")
    one_line(_cli("tasks", "copy", "--min-len", 5, "--max-len", 2, "-o", tmp_path / "d.tsv"), "--min-len")
    assert not (tmp_path / "d.tsv").exists()


def test_without_validation_the_file_holds_the_final_weights(tmp_path):
    import nn2run.format as fmt
    trainer = _trainer(tmp_path, _copy_pairs(tmp_path, n=200), val_frac=0.0, steps=12, eval_every=5)
    summary = trainer.run()
    assert trainer.val is None and summary["best_exact_match"] is None
    with fmt.read(str(tmp_path / "m.nnb")) as f:
        kept = {n: np.array(a) for n, a in f.tensors.items()}
        assert f.header["provenance"]["weights"].startswith("final")
    assert all(np.array_equal(kept[n], a) for n, a in trainer.net.numpy_tensors().items())


def test_ctrl_c_saves_a_checkpoint_and_the_best_weights_then_resume_finishes(tmp_path):
    import signal

    from tests.support.runs import wait_for_checkpoint
    pairs = _copy_pairs(tmp_path, n=400)
    proc = _run(tmp_path, pairs, "int")
    wait_for_checkpoint(tmp_path / "int.ckpt", 20, proc, timeout=240)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Interrupted: interrupted at step" in err, err[-2000:]
    _, meta = _weights(tmp_path / "int.ckpt")
    assert 20 <= meta["step"] < 120 and (tmp_path / "int.nnb").exists()
    assert f"interrupted at step {meta['step']}:" in err          # saved where it stopped
    resumed = _run(tmp_path, pairs, "int", resume=True)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert _weights(tmp_path / "int.ckpt")[1]["step"] == 120


def test_teacher_forced_logits_match_torch_gru_and_grucell_mapped_by_kernel_names():
    net, tensors, model = _model(seed=9)
    w = {k: torch.from_numpy(v.astype(np.float64)) for k, v in unpack(net.tensors(), tensors).items()}
    cat = lambda names, layer: torch.cat([w[f"{n}@{layer}"] for n in names])     # noqa: E731
    enc = torch.nn.GRU(VS, H, num_layers=L, dtype=torch.float64)
    cell = torch.nn.GRUCell(VT + H, H, dtype=torch.float64)          # input [xₜ; cₜ]
    with torch.no_grad():
        for k in range(L):
            getattr(enc, f"weight_ih_l{k}").copy_(cat(["W_ir", "W_iz", "W_in"], k))
            getattr(enc, f"weight_hh_l{k}").copy_(cat(["W_hr", "W_hz", "W_hn"], k))
            getattr(enc, f"bias_ih_l{k}").copy_(cat(["b_ir", "b_iz", "b_in"], k))
            getattr(enc, f"bias_hh_l{k}").copy_(cat(["b_hr", "b_hz", "b_hn"], k))
        cell.weight_ih.copy_(torch.cat([torch.cat([w[f"W_i{g}@{L}"], w[f"C_{g}@{L}"]], 1) for g in "rzn"]))
        cell.weight_hh.copy_(cat(["W_hr", "W_hz", "W_hn"], L))
        cell.bias_ih.copy_(cat(["b_ir", "b_iz", "b_in"], L))
        cell.bias_hh.copy_(cat(["b_hr", "b_hz", "b_hn"], L))
        src, lengths, tin = _batch(PAIRS)
        logits = model(src, lengths, tin)
        d = lambda n: w[f"{n}@{L}"]             # noqa: E731
        for b, (s_ids, t_ids) in enumerate(PAIRS):
            memory, _ = enc(torch.nn.functional.one_hot(torch.tensor(s_ids), VS).double()[:, None])
            memory = memory[:, 0]
            s = torch.tanh(d("W_0") @ memory[-1] + d("b_0"))
            for t, tok in enumerate(t_ids):
                alpha = torch.softmax(torch.tanh(memory @ d("U_a").T + d("W_a") @ s) @ d("v_a"), 0)
                x = torch.cat([torch.nn.functional.one_hot(torch.tensor(tok), VT).double(), alpha @ memory])
                s = cell(x[None], s[None])[0]
                torch.testing.assert_close(logits[t, b], d("W_y") @ s + d("b_y"), atol=1e-5, rtol=0)


def test_a_model_too_big_for_memory_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    import nn2c.train.memory
    from nn2c.train.trainer import TrainError
    pairs = _copy_pairs(tmp_path, n=100)
    monkeypatch.setattr(nn2c.train.memory, "available_memory", lambda: 2 ** 20)
    with pytest.raises(TrainError, match=r"a 1×32 seq2seq model needs about .* 1\.0 MiB is available"):
        _trainer(tmp_path, pairs)
    monkeypatch.setattr(nn2c.train.memory, "available_memory", lambda: 2 ** 30)
    _trainer(tmp_path, pairs)


@pytest.mark.parametrize("decoder, fused", [("seq2seq/bahdanau", 1), ("seq2seq/luong", 1), ("seq2seq/bridge", 0)])
def test_the_attention_context_is_one_batched_product(decoder, fused):
    """Σⱼ(αₜⱼ ⊙ hⱼ) renders as torch.bmm over the memory prepare zeroed beyond each length;
    the reference tests above check its values."""
    from nn2c.compiler.seq2seq import compile_seq2seq
    from nn2c.train.seq2seq.render import DecoderSource
    net = compile_seq2seq(encoder="gru", decoder=decoder, hidden=8, layers=1, source_vocab=5, target_vocab=5).network
    src = DecoderSource(net.decoder, net.bridge)
    assert len(src.contexts) == fused and src.source().count("torch.bmm") == fused
    _, _, model = _model(seed=2)
    assert len(model.decoder_source.contexts) == 1        # the hand-built network of the reference tests

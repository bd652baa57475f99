"""Compiling seq2seq models: the decoder's program, run by a float64 NumPy interpreter
written here, against the decoders' equations written by hand in NumPy."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nn2run.format as fmt
from nn2c.compiler.emit import unpack
from nn2c.compiler.ir import positional
from nn2c.compiler.seq2seq import compile_seq2seq, init_seq2seq_tensors, write_seq2seq
from nn2run.codec import CharCodec

H, J, B, STEPS = 5, 6, 3, 4
SOURCE, TARGET = CharCodec(list("abcdefg")), CharCodec(list("xyz"))
VT = len(TARGET.vocab) + 2
LENGTHS = np.array([J, 2, J - 1])


# --- a small interpreter of the program's instructions --------------------------------

def _lift(x, like):
    return x[:, None, :] if np.ndim(x) == 2 and np.ndim(like) == 3 else x


def _value(operand, regs, tensors):
    tag, v = operand
    return regs[v] if tag == "r" else np.asarray(tensors[v], np.float64) if tag == "t" else float(v)


def _softmax(a, axis=-1):
    z = np.exp(a - a.max(axis, keepdims=True))
    return z / z.sum(axis, keepdims=True)


def execute(program_code, regs, tensors, ids, mask):
    """Run instructions on float64 arrays: plain (B, width), per position (B, J, width)."""
    for ins in program_code:
        op, dst, rest = ins[0], ins[1], ins[2:]
        if op == "onehot":
            regs[dst] = np.eye(VT)[ids]
            continue
        if op == "slice":
            src, start = regs[rest[0][1]], rest[1]
            regs[dst] = src[..., start:start + program_widths[dst]]
            continue
        args = [_value(o, regs, tensors) for o in rest]
        if op == "gather":
            regs[dst] = args[0][ids]
        elif op in ("add", "sub", "mul", "div"):
            a, b = args
            if np.ndim(a) == 3 or np.ndim(b) == 3:
                a, b = _lift(a, np.zeros((1, 1, 1))), _lift(b, np.zeros((1, 1, 1)))
            regs[dst] = {"add": np.add, "sub": np.subtract, "mul": np.multiply,
                         "div": np.divide}[op](a, b)
        elif op == "matmul":
            regs[dst] = args[0] @ args[1]
        elif op == "concat":
            regs[dst] = np.concatenate(args, axis=-1)
        elif op == "softmaxj":
            regs[dst] = _softmax(np.where(mask > 0, args[0], -np.inf), axis=1)
        elif op == "sumj":
            regs[dst] = (args[0] * mask).sum(1)
        else:
            regs[dst] = {"sigmoid": lambda a: 1 / (1 + np.exp(-a)), "tanh": np.tanh,
                         "neg": np.negative, "exp": np.exp, "copy": np.copy,
                         "sum": lambda a: a.sum(-1, keepdims=True),
                         "logsoftmax": lambda a: np.log(_softmax(a)),
                         "softmax": _softmax}[op](args[0])


program_widths: list = []


def run_decoder(program, tensors, memory, final, mask, tokens):
    """Logits of every step (teacher forcing on `tokens`) and the states after each step."""
    program_widths[:] = program["registers"]
    regs = {program["memory"]: memory, program["final"]: final}
    execute(program["prepare"], regs, tensors, None, mask)
    states = {s["name"]: regs[s["init"]] if s["init"] is not None else np.zeros((B, program["registers"][s["prev"]]))
              for s in program["states"]}
    logits = []
    for ids in tokens:
        step = dict(regs)
        step.update({s["prev"]: states[s["name"]] for s in program["states"]})
        execute(program["code"], step, tensors, ids, mask)
        logits.append(step[program["logits"]])
        states = {s["name"]: step[s["next"]] for s in program["states"]}
    return np.array(logits), states


# --- references: the equations by hand -------------------------------------------------

def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def attend(scores, memory):
    """scores (B, J): the masked softmax over positions, and the context."""
    valid = np.arange(J)[None, :] < LENGTHS[:, None]
    alpha = _softmax(np.where(valid, scores, -np.inf), axis=1)
    return alpha, (alpha[:, :, None] * memory).sum(1)


def bahdanau(P, memory, final, tokens):
    s, out = np.tanh(final @ P["W_0"].T + P["b_0"]), []
    for ids in tokens:
        x = np.eye(VT)[ids]
        e = np.tanh((s @ P["W_a"].T)[:, None, :] + memory @ P["U_a"].T) @ P["v_a"].T
        _, c = attend(e[:, :, 0], memory)
        r = sigmoid(x @ P["W_ir"].T + c @ P["C_r"].T + P["b_ir"] + s @ P["W_hr"].T + P["b_hr"])
        z = sigmoid(x @ P["W_iz"].T + c @ P["C_z"].T + P["b_iz"] + s @ P["W_hz"].T + P["b_hz"])
        n = np.tanh(x @ P["W_in"].T + c @ P["C_n"].T + P["b_in"] + r * (s @ P["W_hn"].T + P["b_hn"]))
        s = (1 - z) * n + z * s
        out.append(s @ P["W_y"].T + P["b_y"])
    return np.array(out), {"s": s}


def luong(P, memory, final, tokens):
    h = m = ht = np.zeros((B, H))
    out = []
    for ids in tokens:
        xin = np.concatenate([np.eye(VT)[ids], ht], 1)
        f = sigmoid(xin @ P["W_f"].T + h @ P["U_f"].T + P["b_f"])
        i = sigmoid(xin @ P["W_i"].T + h @ P["U_i"].T + P["b_i"])
        o = sigmoid(xin @ P["W_o"].T + h @ P["U_o"].T + P["b_o"])
        g = np.tanh(xin @ P["W_g"].T + h @ P["U_g"].T + P["b_g"])
        m = f * m + i * g
        h = o * np.tanh(m)
        e = (memory * (h @ P["W_a"].T)[:, None, :]).sum(-1)
        _, c = attend(e, memory)
        ht = np.tanh(np.concatenate([c, h], 1) @ P["W_c"].T)
        out.append(ht @ P["W_y"].T + P["b_y"])
    return np.array(out), {"m": m, "h": h, "h̃": ht}


def bridge(P, memory, final, tokens):
    s, out = np.tanh(final @ P["W_0"].T + P["b_0"]), []
    for ids in tokens:
        x = np.eye(VT)[ids]
        z = sigmoid(x @ P["W_z"].T + s @ P["U_z"].T + final @ P["C_z"].T + P["b_z"])
        r = sigmoid(x @ P["W_r"].T + s @ P["U_r"].T + final @ P["C_r"].T + P["b_r"])
        sh = np.tanh(x @ P["W_s"].T + (r * s) @ P["U_s"].T + final @ P["C_s"].T + P["b_s"])
        s = (1 - z) * s + z * sh
        out.append(s @ P["W_y"].T + P["b_y"])
    return np.array(out), {"s": s}


REFERENCES = {"bahdanau": bahdanau, "luong": luong, "bridge": bridge}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_decoder_program_matches_the_equations(tmp_path, name):
    compiled = compile_seq2seq("gru", f"seq2seq/{name}", hidden=H, layers=2,
                               source_vocab=len(SOURCE.vocab), target_vocab=VT)
    path = tmp_path / "m.nnb"
    write_seq2seq(path, compiled, init_seq2seq_tensors(compiled.network, seed=3), SOURCE, TARGET,
                  {"source": 40, "target": 50}, {"test": True})
    nnb = fmt.read(path)
    header, tensors = nnb.header, {k: np.asarray(v, np.float64) for k, v in nnb.tensors.items()}
    assert header["nn2"]["kind"] == "seq2seq"
    assert header["target"] == {"codec": TARGET.to_header(), "begin": 3, "end": 4}
    assert header["limits"] == {"source": 40, "target": 50}
    assert header["model"] == {"layers": 2, "hidden": H, "encoder": "gru", "decoder": f"seq2seq/{name}"}
    assert header["source"]["decoder"]["text"] == compiled.decoder_kernel.source
    program = header["decoder"]
    assert program["registers"][program["logits"]] == VT
    assert program["memory"] in program["positional"]
    P = {key.split("@")[0]: v.astype(np.float64) for key, v in
         unpack(compiled.network.tensors(), tensors).items() if key.endswith("@2")}
    rng = np.random.default_rng(0)
    memory = rng.normal(size=(B, J, H))
    memory[np.arange(J)[None, :] >= LENGTHS[:, None]] = 7.0     # padding must not matter
    final = memory[np.arange(B), LENGTHS - 1]
    mask = (np.arange(J)[None, :] < LENGTHS[:, None]).astype(np.float64)[:, :, None]
    tokens = [np.full(B, VT - 2)] + [rng.integers(0, VT, size=B) for _ in range(STEPS - 1)]
    got, got_states = run_decoder(program, tensors, memory, final, mask, tokens)
    want, want_states = REFERENCES[name](P, memory, final, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for s, value in want_states.items():
        np.testing.assert_allclose(got_states[s], value, atol=1e-5, rtol=0)


def test_prepare_holds_the_terms_of_memory_and_parameters():
    compiled = compile_seq2seq("gru", "seq2seq/bahdanau", hidden=H, layers=1, source_vocab=7, target_vocab=VT)
    program = compiled.programs["decoder"]
    prepared = [ins for ins in program["prepare"]]
    assert ["matmul", prepared[0][1], ["r", program["memory"]], ["t", "l1.U_a"]] in prepared
    assert program["states"][0]["init"] is not None
    written = [ins[1] for ins in program["prepare"] + program["code"]]
    assert len(written) == len(set(written))                  # every register written once
    assert not {program["memory"], program["final"]} & set(written)
    prep = {ins[1] for ins in program["prepare"]}
    for ins in program["prepare"]:                            # prepare reads no step value
        for tag, v in ins[2:]:
            assert tag != "r" or v in prep | {program["memory"], program["final"]}


def test_positional_nodes_survive_the_passes():
    for passes in ((), ("cse",), None):
        kw = {} if passes is None else {"passes": passes}
        c = compile_seq2seq("gru", "seq2seq/bahdanau", hidden=H, layers=1, source_vocab=7,
                            target_vocab=VT, **kw)
        nodes = c.network.decoder.nodes()
        flagged = {n.op for n in nodes if positional(n)}
        assert "memory" in flagged and "softmaxj" in flagged and "sumj" not in flagged
        assert not any(positional(n) for n in c.network.decoder.roots())
        for n in nodes:        # positional exactly when an argument is (sumj aside)
            if n.op not in ("memory", "sumj"):
                assert positional(n) == any(positional(a) for a in n.args)
        assert not any(n.op == "slice" and positional(n) for n in nodes)


def test_encoder_program_has_an_output_not_logits():
    c = compile_seq2seq("lstm", "seq2seq/bridge", hidden=H, layers=2, source_vocab=7, target_vocab=VT)
    enc = c.programs["encoder"]
    assert "logits" not in enc and enc["registers"][enc["output"]] == H
    assert {s["layer"] for s in enc["states"]} == {0, 1}
    keys = set(c.params)
    assert "W_0@2" in keys and "W_f@0" in keys and "W_f@1" in keys and "W_z@2" in keys


def test_bad_limits_and_codecs_are_refused(tmp_path):
    c = compile_seq2seq("gru", "seq2seq/bridge", hidden=H, layers=1, source_vocab=7, target_vocab=VT)
    t = init_seq2seq_tensors(c.network, 0)
    with pytest.raises(ValueError, match="limits"):
        write_seq2seq(tmp_path / "m.nnb", c, t, SOURCE, TARGET, {"source": 0, "target": 5}, {})
    with pytest.raises(ValueError, match="target codec"):
        write_seq2seq(tmp_path / "m.nnb", c, t, SOURCE, CharCodec(list("xy")), {"source": 5, "target": 5}, {})
    assert not (tmp_path / "m.nnb").exists()


def test_nn2c_check_summarizes_a_decoder():
    exe = Path(sys.executable).with_name("nn2c")
    out = subprocess.run([str(exe), "check", "samples/kernels/seq2seq/bahdanau.eq", "--hidden", "8"],
                         capture_output=True, text=True, check=True).stdout
    assert "decoder kernel" in out and "memory   hⱼ" in out
    assert "v_a" in out and "1×H" in out
    assert "once per input" in out and "U_a·hⱼ" in out
    assert "s₀ = tanh(W_0·hₙ + b_0)" in out


def test_nn2c_check_reports_a_decoder_error(tmp_path):
    bad = tmp_path / "bad.eq"
    bad.write_text("memory hⱼ\ncₜ = αₜⱼ\nαₜⱼ = softmaxⱼ(hⱼ)\nsₜ = tanh(U sₜ₋₁ + W xₜ + C hⱼ)\n")
    exe = Path(sys.executable).with_name("nn2c")
    r = subprocess.run([str(exe), "check", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"{bad}:" in r.stderr


def _run(op, out, *operands):
    from nn2run.ops import OPS
    for fn, args in OPS[op].numpy(out, *operands):
        fn(*args)
    return out


def test_softmaxj_and_sumj_binders_mask_the_positions():
    """The binders take per-position arrays with the positions first: (J, batch, width)."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(B, J, 2)).astype(np.float32) * 5
    a[1, 2:] = 1e4                       # large scores beyond a row's length must not count
    mask = (np.arange(J)[None, :] < LENGTHS[:, None]).astype(np.float32)[:, :, None]
    a_jb, mask_jb = (np.ascontiguousarray(x.transpose(1, 0, 2)) for x in (a, mask))
    got = _run("softmaxj", np.zeros_like(a_jb), a_jb, mask_jb).transpose(1, 0, 2)
    for b in range(B):
        for col in range(2):
            n = LENGTHS[b]
            z = np.exp(a[b, :n, col].astype(np.float64) - a[b, :n, col].max())
            np.testing.assert_allclose(got[b, :n, col], z / z.sum(), atol=1e-6)
            assert (got[b, n:, col] == 0).all()
    total = _run("sumj", np.zeros((B, 2), np.float32), a_jb, mask_jb)
    want = [a[b, :LENGTHS[b]].astype(np.float64).sum(0) for b in range(B)]
    np.testing.assert_allclose(total, want, rtol=1e-6)
    empty = _run("softmaxj", np.zeros_like(a_jb), a_jb, np.zeros_like(mask_jb))
    assert (empty == 0).all()            # a row of length 0: zeros, not nan

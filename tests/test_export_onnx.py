"""`nn2c export --onnx`: the graph run by onnxruntime gives nn2run's logits, step after step."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from support.models import ROOT, build_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import nn2run
from nn2c.compiler import export

KERNELS = sorted(p.stem for p in (ROOT / "samples" / "kernels").glob("*.eq"))
VOCAB = 11


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kernel -> (.nnb path, .onnx path): 2×16 models with random weights, one file each."""
    d = tmp_path_factory.mktemp("onnx")
    out = {}
    for seed, kernel in enumerate(KERNELS):
        layers = 1 if kernel == "jordan" else 2         # output feedback needs one layer
        nnb, _, _ = build_model(d / f"{kernel}.nnb", kernel, 16, layers, VOCAB, seed=seed)
        export.export_onnx(str(nnb), str(d / f"{kernel}.onnx"))
        out[kernel] = (nnb, d / f"{kernel}.onnx")
    return out


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def assert_steps_agree(nnb, onnx_path, batch: int, steps: int, seed: int = 0):
    """Both run `steps` steps of random ids with their own state carried; the logits and
    the states agree within 1e-5 at every step."""
    sess = session(onnx_path)
    rng = np.random.default_rng(seed)
    with nn2run.load(nnb) as m:
        state = m.initial_state(batch)
        names = [i.name for i in sess.get_inputs()][1:]
        feeds = dict(zip(names, (a + 0.0 for a in state.arrays)))
        for t in range(steps):
            ids = rng.integers(0, VOCAB, batch)
            logits, state = m.step(ids, state)
            got = sess.run(None, {"ids": ids.astype(np.int64), **feeds})
            np.testing.assert_allclose(got[0], logits, atol=1e-5, rtol=0, err_msg=f"step {t}")
            for a, b in zip(got[1:], state.arrays):
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"state at step {t}")
            feeds = dict(zip(names, got[1:]))


@pytest.mark.parametrize("kernel", KERNELS)
def test_export_runs_in_onnxruntime_with_nn2runs_logits_for_50_steps(exported, kernel):
    assert_steps_agree(*exported[kernel], batch=3, steps=50)


# with the samples, every opcode of the instruction set; unoptimized, onehot and no gather
EVERY_OP = """\
output hₜ
aₜ = relu(W_a·xₜ + U_a·hₜ₋₁ + b_a)
sₜ = softmax(W_s·xₜ + U_s·gₜ₋₁)
hₜ = tanh(−aₜ ⊙ sₜ + log(1 + exp(U_e·hₜ₋₁)) − b_h)
gₜ = hₜ₋₁
"""


@pytest.mark.parametrize("passes", [None, ()], ids=["optimized", "plain"])
def test_relu_softmax_neg_exp_log_copy_and_onehot_export_too(tmp_path, passes):
    kernel = tmp_path / "k.eq"
    kernel.write_text(EVERY_OP, encoding="utf-8")
    nnb, _, _ = build_model(tmp_path / "k.nnb", str(kernel), 16, 2, VOCAB, passes=passes)
    with nn2run.load(nnb) as m:
        used = {ins[0] for ins in m.program["code"]}
    assert {"relu", "softmax", "neg", "exp", "log", "copy"} <= used
    assert ("onehot" in used) == (passes == ())
    export.export_onnx(str(nnb), str(tmp_path / "k.onnx"))
    assert_steps_agree(nnb, tmp_path / "k.onnx", batch=3, steps=20)


REDUCTIONS = """\
hₜ = tanh(W xₜ + U hₜ₋₁ ⊘ (2 + max(hₜ₋₁)) − sum(hₜ₋₁) / 16 + mean(W xₜ) ⊘ sqrt(1 + mean(hₜ₋₁ ⊙ hₜ₋₁)))
"""


def test_reductions_division_and_sqrt_export_too(tmp_path):
    kernel = tmp_path / "r.eq"
    kernel.write_text(REDUCTIONS, encoding="utf-8")
    nnb, _, _ = build_model(tmp_path / "r.nnb", str(kernel), 16, 2, VOCAB)
    with nn2run.load(nnb) as m:
        assert {"mean", "sum", "max", "div", "sqrt"} <= {ins[0] for ins in m.program["code"]}
    export.export_onnx(str(nnb), str(tmp_path / "r.onnx"))
    assert_steps_agree(nnb, tmp_path / "r.onnx", batch=3, steps=20)


@pytest.mark.parametrize("batch", [1, 5])
def test_one_file_runs_at_any_batch_size(exported, batch):
    assert_steps_agree(*exported["lstm"], batch=batch, steps=10, seed=batch)


def test_inputs_outputs_and_opset_follow_the_state_order(exported):
    nnb, path = exported["lstm"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    with nn2run.load(nnb) as m:
        states = [f"{n}@{layer}" for n, layer in m.initial_state(2).names]
    assert states == ["c@0", "h@0", "c@1", "h@1"]
    assert [i.name for i in model.graph.input] == ["ids"] + states
    assert [o.name for o in model.graph.output] == ["logits"] + [s + ".next" for s in states]
    ids = model.graph.input[0].type.tensor_type
    assert ids.elem_type == onnx.TensorProto.INT64 and [d.dim_param for d in ids.shape.dim] == ["batch"]
    logits = model.graph.output[0].type.tensor_type.shape.dim
    assert logits[0].dim_param == "batch" and logits[1].dim_value == VOCAB


@pytest.mark.parametrize("logits", [2, 0], ids=["the state's next register", "the state's prev register"])
def test_an_output_that_shares_a_register_gets_its_own_name(logits):
    """h′ = T[ids] + h, and the logits are h′ itself or the h read in: two graph outputs
    (or an output and an input) on one register."""
    table = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    program = {"registers": [4, 4, 4], "logits": logits,
               "states": [{"name": "h", "layer": 0, "prev": 0, "next": 2}],
               "code": [["gather", 1, ["t", "T"]], ["add", 2, ["r", 1], ["r", 0]]]}
    model, _ = export.to_onnx(program, {"T": table}, 3)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    h = np.full((2, 4), 0.25, np.float32)
    got_logits, got_h = sess.run(None, {"ids": np.array([2, 0]), "h@0": h})
    want_h = table.astype(np.float64)[[2, 0]] + 0.25
    np.testing.assert_allclose(got_h, want_h, atol=1e-6)
    np.testing.assert_allclose(got_logits, want_h if logits == 2 else h, atol=1e-6)


def test_tensors_named_like_graph_values_keep_their_own_values():
    """A file's tensor names are free text: one named like a state input, one like a
    register; h′ = T[ids] + b + h still comes out."""
    table = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    bias = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    program = {"registers": [4, 4, 4, 4], "logits": 2,
               "states": [{"name": "h", "layer": 0, "prev": 0, "next": 2}],
               "code": [["gather", 1, ["t", "h@0"]], ["add", 3, ["r", 1], ["t", "r1"]],
                        ["add", 2, ["r", 3], ["r", 0]]]}
    model, _ = export.to_onnx(program, {"h@0": table, "r1": bias}, 3)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    h = np.full((2, 4), 0.25, np.float32)
    _, got_h = sess.run(None, {"ids": np.array([1, 2]), "h@0": h})
    np.testing.assert_allclose(got_h, table.astype(np.float64)[[1, 2]] + bias + 0.25, atol=1e-6)


def test_two_states_with_one_name_are_refused():
    program = {"registers": [4, 4, 4, 4], "logits": 2,
               "states": [{"name": "h", "layer": 0, "prev": 0, "next": 2},
                          {"name": "h", "layer": 0, "prev": 1, "next": 3}],
               "code": [["tanh", 2, ["r", 0]], ["tanh", 3, ["r", 1]]]}
    with pytest.raises(export.ExportError, match="would be named 'h@0'"):
        export.to_onnx(program, {}, 4)


def test_an_opcode_without_a_translation_is_named(exported):
    with nn2run.load(exported["rnn"][0]) as m:
        program = {**m.program, "code": m.program["code"] + [["fma", 999, ["r", 0]]]}
        with pytest.raises(export.ExportError, match=r"^cannot export opcode 'fma' \(instruction \d+\)$"):
            export.to_onnx(program, m.tensors, VOCAB)


def test_a_tensor_that_is_not_float_is_refused_by_name(exported):
    with nn2run.load(exported["rnn"][0]) as m:
        tensors = {k: v.astype(np.int32) for k, v in m.tensors.items()}
        with pytest.raises(export.ExportError, match="of dtype int32"):
            export.to_onnx(m.program, tensors, VOCAB)


def test_large_weights_go_to_a_data_file_beside_the_graph(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "INLINE_LIMIT", 0)
    nnb, _ = exported["gru"]
    line = export.export_onnx(str(nnb), str(tmp_path / "g.onnx"))
    assert "weights in g.onnx.data" in line
    assert (tmp_path / "g.onnx").stat().st_size < 10_000 < (tmp_path / "g.onnx.data").stat().st_size
    assert_steps_agree(nnb, tmp_path / "g.onnx", batch=2, steps=5)


# --- the command line ------------------------------------------------------------------

def test_nn2c_export_writes_a_graph_and_says_so(run_cli, exported, tmp_path):
    out = tmp_path / "m.onnx"
    r = run_cli("nn2c", "export", exported["mgu"][0], "--onnx", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out}: 2×16 mgu, opset 17") and "inputs ids, h@0, h@1" in r.stdout
    assert_steps_agree(exported["mgu"][0], out, batch=2, steps=3)


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"NNB\x00" + bytes(100)])
def test_nn2c_export_of_a_file_that_is_not_a_model_is_one_line(run_cli, tmp_path, content):
    bad, out = tmp_path / "bad.nnb", tmp_path / "out.onnx"
    bad.write_bytes(content)
    out.write_bytes(b"kept")
    r = run_cli("nn2c", "export", bad, "--onnx", out)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"nn2c: cannot load {bad}: ") and r.stderr.count("\n") == 1
    assert out.read_bytes() == b"kept"


def test_nn2c_export_to_an_unwritable_place_is_one_line(run_cli, exported, tmp_path):
    r = run_cli("nn2c", "export", exported["rnn"][0], "--onnx", tmp_path / "no" / "m.onnx")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    r = run_cli("nn2c", "export", exported["rnn"][0], "--onnx", tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "is a directory" in r.stderr


def test_nn2c_export_onto_the_model_itself_is_refused(run_cli, exported, tmp_path):
    nnb = tmp_path / "m.nnb"
    nnb.write_bytes(Path(exported["rnn"][0]).read_bytes())
    r = run_cli("nn2c", "export", nnb, "--onnx", nnb)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "is the model file" in r.stderr
    assert nnb.read_bytes() == Path(exported["rnn"][0]).read_bytes()


def test_nn2c_export_without_onnx_says_what_to_install(exported, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "onnx":
                    raise ImportError("onnx is blocked in this test")
        sys.meta_path.insert(0, Block())
        from nn2c.cli import main
        sys.argv = ["nn2c", "export", {str(exported["rnn"][0])!r}, "--onnx", {str(tmp_path / "m.onnx")!r}]
        main()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1 and r.stderr == "nn2c: export needs the onnx package: pip install onnx\n"
    assert not (tmp_path / "m.onnx").exists()


def test_nn2c_export_of_a_seq2seq_model_is_one_line(run_cli, tmp_path):
    from support.seq2seq import build
    model, out = tmp_path / "s2s.nnb", tmp_path / "out.onnx"
    build(model)
    r = run_cli("nn2c", "export", model, "--onnx", out)
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr == f"nn2c: {model} is a seq2seq model; --onnx exports the step of a language model " \
                       "(nn2c train without --task seq2seq)\n"
    assert not out.exists()

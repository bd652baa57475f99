"""Generation against ONNX Runtime: the runtime a user would deploy an LSTM or a GRU with.

For each cell (2×H LSTM and GRU), thread count (one, and every core) and batch size
(1, 8, 64), three loops run greedy decoding in the same interleaved reps:

- *nn2run*: the public `nn2run.generate` with a greedy `Sampler`;
- *ORT, torch.onnx*: `torch.nn.LSTM` / `torch.nn.GRU` + `nn.Linear` on the same weights,
  exported by `torch.onnx.export(dynamo=False)` (the TorchScript exporter: the dynamo one
  needs onnxscript) to ORT's fused LSTM/GRU operators, one `InferenceSession.run` a step
  with the ids and the state in and the logits and the state out, argmax in NumPy;
- *ORT, nn2 export*: the graph `nn2c export` writes for the nn2 model, the same loop.

The GRU is nn2's `torchgru` sample, the cell torch.nn.GRU computes. At batch 64 the
bench also times the step's products alone, the same shapes in NumPy, and prints the
share of an nn2run step spent outside them. onnxruntime and onnx are bench-only
dependencies (`pip install onnx onnxruntime`); without them the measure says so.
"""

from __future__ import annotations

import ctypes
import glob
import os
import warnings

import numpy as np

from .common import best, fmt_list, interleaved, median, timed, verdict

BATCHES = (1, 8, 64)
CELLS = {"LSTM": "lstm", "GRU": "torchgru"}
REP_SECONDS = 0.15                       # nn2 time per rep (half with --quick)
SPIN_PAUSE = 0.1                         # s between loops with threads: the pools stop spinning


class WideTable:
    """A markdown table with the columns this measure needs (two peers, two ratios)."""

    def __init__(self, title: str, head: list[str]):
        self.title, self.head, self.rows, self.notes, self.raw = title, head, [], [], []

    def render(self) -> str:
        cells = [self.head] + self.rows
        widths = [max(len(c[i]) for c in cells) for i in range(len(self.head))]
        line = lambda c: "| " + " | ".join(s.ljust(w) for s, w in zip(c, widths)) + " |"   # noqa: E731
        out = [f"### {self.title}", "", line(self.head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(c) for c in self.rows]
        out += [""] + [f"note: {n}" for n in self.notes] if self.notes else []
        out += ["", "raw:"] + [f"    {r}" for r in self.raw] if self.raw else []
        return "\n".join(out) + "\n"


# --- the same network three ways ----------------------------------------------------------

def build_nn2(path, cell: str, hidden: int, layers: int, vocab: int, seed: int = 0):
    """A .nnb of nn2's sample `CELLS[cell]`, random weights; returns its logical weights."""
    from nn2c.compiler.emit import init_logical, pack
    from nn2c.compiler.pipeline import compile_kernel, write_model
    from nn2run.codec import CharCodec
    compiled = compile_kernel(CELLS[cell], hidden, layers, vocab)
    specs = compiled.network.tensors()
    logical = init_logical(specs, hidden, seed)
    write_model(str(path), compiled, pack(specs, logical), CharCodec([chr(0x100 + i) for i in range(vocab)]),
                {"bench": True})
    return logical


def _torch_weights(cell: str, logical: dict, layer: int) -> dict:
    """nn.LSTM's (gates i, f, g, o) or nn.GRU's (r, z, n) weights of one layer."""
    cat = lambda keys: np.concatenate([logical[f"{k}@{layer}"] for k in keys])   # noqa: E731
    if cell == "LSTM":
        b = cat(f"b_{g}" for g in "ifco")
        return {"weight_ih": cat(f"W_{g}" for g in "ifco"), "weight_hh": cat(f"U_{g}" for g in "ifco"),
                "bias_ih": b, "bias_hh": np.zeros_like(b)}
    return {"weight_ih": cat(f"W_i{g}" for g in "rzn"), "weight_hh": cat(f"W_h{g}" for g in "rzn"),
            "bias_ih": cat(f"b_i{g}" for g in "rzn"), "bias_hh": cat(f"b_h{g}" for g in "rzn")}


def export_torch(path, cell: str, logical: dict, layers: int) -> list[str]:
    """torch.nn.LSTM/GRU + Linear on `logical`, one step, as ONNX; returns the state names."""
    import torch
    V, H = logical["W_y"].shape
    rnn = getattr(torch.nn, cell)(V, H, layers)
    lin = torch.nn.Linear(H, V)
    with torch.no_grad():
        for layer in range(layers):
            for name, w in _torch_weights(cell, logical, layer).items():
                getattr(rnn, f"{name}_l{layer}").copy_(torch.from_numpy(w))
        lin.weight.copy_(torch.from_numpy(logical["W_y"]))
        lin.bias.copy_(torch.from_numpy(logical["b_y"]))
    step = _torch_step(rnn, lin, V).eval()
    names = ["h", "c"] if cell == "LSTM" else ["h"]
    batch = {n: {1: "batch"} for n in names + [n + "_next" for n in names]}
    args = (torch.zeros(2, dtype=torch.long),) + tuple(torch.zeros(layers, 2, H) for _ in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the legacy exporter's deprecation and trace notes
        torch.onnx.export(step, args, str(path), dynamo=False, opset_version=17,
                          input_names=["ids", *names], output_names=["logits", *(n + "_next" for n in names)],
                          dynamic_axes={"ids": {0: "batch"}, "logits": {0: "batch"}, **batch})
    return names


def _torch_step(rnn, lin, vocab: int):
    import torch

    class TorchStep(torch.nn.Module):
        """ids (batch,) -> logits, the new state; the one-hot input is a row of an identity."""

        def __init__(self):
            super().__init__()
            self.rnn, self.lin = rnn, lin
            self.register_buffer("eye", torch.eye(vocab))

        def forward(self, ids, *state):
            out, new = self.rnn(self.eye[ids].unsqueeze(0), state if len(state) == 2 else state[0])
            return (self.lin(out[0]), *(new if isinstance(new, tuple) else (new,)))
    return TorchStep()


# --- threads --------------------------------------------------------------------------------

def _openblas():
    """(set, get) of the OpenBLAS NumPy loaded, or None when it cannot be found."""
    here = os.path.dirname(np.__file__)
    for lib in glob.glob(os.path.join(here, "..", "numpy.libs", "*openblas*")) + \
            glob.glob(os.path.join(here, ".dylibs", "*openblas*")):
        dll = ctypes.CDLL(lib)
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                s, g = f"{prefix}_set_num_threads{suffix}", f"{prefix}_get_num_threads{suffix}"
                if hasattr(dll, s) and hasattr(dll, g):
                    return getattr(dll, s), getattr(dll, g)
    return None


def ort_session(path, threads: int):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# --- the loops ------------------------------------------------------------------------------

def _ort_loop(sess, names, shapes, batch: int, n: int):
    """n greedy steps, one run a step, the state fed back."""
    def run():
        ids = np.ones(batch, np.int64)
        state = [np.zeros(s(batch), np.float32) for s in shapes]
        for _ in range(n):
            out = sess.run(None, {"ids": ids, **dict(zip(names, state))})
            ids, state = out[0].argmax(1), out[1:]
    return run


def _nn2_loop(model, batch: int, n: int):
    from nn2run.generate import generate
    from nn2run.sample import Sampler, SamplerConfig

    def run():
        for _ in generate(model, [[1]] * batch, n, Sampler(SamplerConfig(greedy=True))):
            pass
    return run


def _products_loop(model, batch: int, n: int):
    """The step's products alone: each product of the program the VM runs, same shapes and
    column blocks (`nn2run.vm.column_blocks`), in NumPy."""
    from nn2run.rewrite import PRODUCTS
    from nn2run.vm import column_blocks
    program, tensors = model.bound_program() if hasattr(model, "bound_program") else (model.program, model.tensors)
    regs, rng = program["registers"], np.random.default_rng(0)
    work = []
    for ins in program["code"]:
        if ins[0] in PRODUCTS:
            w = tensors[ins[-1][1]]                    # laid out as the VM reads it
            x = rng.standard_normal((batch, w.shape[0])).astype(np.float32)
            out = np.empty((batch, regs[ins[1]]), np.float32)
            work += [(x, w[:, lo:hi], out[:, lo:hi]) for lo, hi in column_blocks(batch, *w.shape)]

    def run():
        for _ in range(n):
            for a, w, out in work:
                np.matmul(a, w, out=out)
    return run


def _same_function(model, sessions, batch: int = 2, steps: int = 5) -> float:
    """Largest logit difference between nn2run and each ORT graph on the same ids."""
    worst, rng = 0.0, np.random.default_rng(3)
    state = model.initial_state(batch)
    feeds = [[np.zeros(s(batch), np.float32) for s in shapes] for _, _, shapes in sessions]
    for _ in range(steps):
        ids = rng.integers(0, len(model.vocab), batch)
        logits, state = model.step(ids, state)
        for k, (sess, names, _) in enumerate(sessions):
            out = sess.run(None, {"ids": ids.astype(np.int64), **dict(zip(names, feeds[k]))})
            worst, feeds[k] = max(worst, float(np.abs(out[0] - logits).max())), out[1:]
    if worst > 1e-3:
        raise AssertionError(f"the ORT graphs do not compute nn2's function: logits differ by {worst}")
    return worst


def _rows(speed, split, label, times, n, batch):
    per = {k: best(v) / n for k, v in times.items()}
    cps = {k: batch / t for k, t in per.items()}
    nn2 = cps["nn2run"]
    speed.rows.append([f"{label} (chars/s)", f"{nn2:,.0f}", f"{cps['ort torch']:,.0f}",
                       verdict(nn2 / cps["ort torch"], at_least=1.0), "≥ 1.0×", f"{cps['ort nn2']:,.0f}",
                       f"{nn2 / cps['ort nn2']:.2f}×"])
    speed.raw.append(f"{label}: µs/step per rep " + ", ".join(
        f"{k} {fmt_list([x / n for x in v], 1e6)}" for k, v in times.items()) + f" ({n} steps a rep)")
    if "products" in per:
        # the share from each rep's pair (timed back to back), so that load which comes and
        # goes between reps does not set a best product against a worse step
        share = median([1.0 - p / t for p, t in zip(times["products"], times["nn2run"])])
        mark = "✓" if 0 <= share <= 0.20 else "✗" if share > 0.20 else "(noise: the products alone took longer)"
        split.rows.append([label, f"{per['nn2run'] * 1e6:,.0f}", f"{per['products'] * 1e6:,.0f}",
                           f"{share:.0%} {mark}", "≤ 20%"])


def _steps_a_rep(fn_of_n, seconds: float) -> int:
    fn_of_n(5)()                                  # binds the VM for this batch size
    per = min(timed(fn_of_n(20)) for _ in range(3)) / 20
    return max(20, min(5000, int(seconds / per)))


def _bench_cell(tmp, cell, hidden, thread_counts, blas, reps, seconds, speed, split):
    from nn2c.compiler.export import export_onnx
    from nn2run import load
    from nn2run.threads import set_threads
    nnb, t_onnx, n_onnx = (tmp / f"ort-{cell}-{hidden}.{ext}" for ext in ("nnb", "torch.onnx", "nn2.onnx"))
    logical = build_nn2(nnb, cell, hidden, 2, 65)
    t_names = export_torch(t_onnx, cell, logical, 2)
    export_onnx(str(nnb), str(n_onnx))
    with load(nnb) as model:
        widths = model.program["registers"]
        n_names = [f"{s['name']}@{s['layer']}" for s in model.program["states"]]
        n_shapes = [lambda b, w=widths[s["prev"]]: (b, w) for s in model.program["states"]]
        t_shapes = [lambda b: (2, b, hidden)] * len(t_names)
        for threads in thread_counts:
            if blas:
                blas[0](threads)
            set_threads(threads)
            sess_t, sess_n = ort_session(t_onnx, threads), ort_session(n_onnx, threads)
            diff = _same_function(model, [(sess_t, t_names, t_shapes), (sess_n, n_names, n_shapes)])
            speed.raw.append(f"2×{hidden} {cell}, {threads} thread(s): max |logit diff| nn2run vs the ORT graphs "
                             f"{diff:.1e}")
            for batch in BATCHES:
                n = _steps_a_rep(lambda k, b=batch: _nn2_loop(model, b, k), seconds)
                fns = {"nn2run": _nn2_loop(model, batch, n),
                       "ort torch": _ort_loop(sess_t, t_names, t_shapes, batch, n),
                       "ort nn2": _ort_loop(sess_n, n_names, n_shapes, batch, n)}
                if batch == BATCHES[-1]:
                    fns["products"] = _products_loop(model, batch, n)
                for fn in fns.values():
                    fn()
                times = interleaved({k: (lambda f=f: timed(f)) for k, f in fns.items()}, reps,
                                    pause=SPIN_PAUSE if threads > 1 else 0.0)
                label = f"2×{hidden} {cell}, batch {batch}, {threads} thread{'s' if threads > 1 else ''}"
                _rows(speed, split, label, times, n, batch)


def bench_onnx(tmp, sizes, quick: bool):
    """Tables: greedy generation against ORT (two graphs), and the batch-64 step split."""
    speed = WideTable("generation, greedy: nn2run vs ONNX Runtime on the same weights",
                      ["measure", "nn2run", "ORT, torch.onnx", "ratio", "target", "ORT, nn2c export", "ratio"])
    split = WideTable(f"batch {BATCHES[-1]}: an nn2run step (greedy generation), its products alone "
                      "and everything else",
                      ["measure", "step µs (best)", "products µs (best)", "outside the products (median of reps)",
                       "target"])
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        speed.notes.append("not measured: onnx and onnxruntime are not installed (pip install onnx onnxruntime)")
        return [speed]
    blas = _openblas()
    cores = os.cpu_count() or 1
    thread_counts = [1] + ([cores] if blas and cores > 1 else [])
    from nn2run.threads import get_threads, set_threads
    before, before_nn2 = (blas[1]() if blas else None), get_threads()
    reps, seconds = (3, REP_SECONDS / 2) if quick else (5, REP_SECONDS)
    try:
        for cell in CELLS:
            for hidden in sizes:
                _bench_cell(tmp, cell, hidden, thread_counts, blas, reps, seconds, speed, split)
    finally:
        if blas:
            blas[0](before)
        set_threads(before_nn2)
    speed.notes.append(f"onnxruntime {onnxruntime.__version__}, CPU provider, intra-op threads = the row's; "
                       "the torch graphs by torch.onnx.export(dynamo=False, opset 17): ORT's fused "
                       f"LSTM/GRU; {cores} cores here; nn2run's products use the row's OpenBLAS threads, and as many "
                       "for the column-blocked products it splits itself (nn2run.threads); with threads, "
                       f"{SPIN_PAUSE} s of sleep before each timed loop lets the other side's pool stop spinning")
    if not blas:
        speed.notes.append("OpenBLAS's thread count could not be set from here: one-thread rows only")
    split.notes.append("products: each matmul of the nn2 program on arrays of the same shapes, "
                       "np.matmul(out=), timed in the same reps")
    speed.raw.append(f"best of {reps} interleaved reps; greedy decoding from token 1 on every side")
    return [speed, split]

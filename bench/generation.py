"""Generation speed: the VM's step loop against hand-written peers on the same weights.

Two loops are timed for each, like with like:
- *step only*: a fixed sequence of token ids fed one at a time (nn2: `Model.vm(1).advance`,
  the call `nn2run.generate` makes; and the public functional `Model.step`, against that loop);
- *step + sampling*: each step's logits sampled to give the next token (nn2: the public
  `nn2run.generate.generate` with a `Sampler`, as the CLI does; the NumPy peer calls the
  very same `Sampler`; the torch peer samples with softmax + torch.multinomial).
"""

from __future__ import annotations

import warnings

import numpy as np

from .common import Table, best, fmt_list, interleaved, timed, verdict
from .peers import NumpyLSTM, TorchLSTM


def _check_same_function(model, np_peer, torch_peer, tokens) -> float:
    """Largest logit difference between nn2 and the peers over a few steps (must be tiny)."""
    import torch
    vm = model.vm(1)
    vm.reset()
    np_peer.reset()
    torch_peer.reset()
    worst = 0.0
    with torch.no_grad():
        for tok in tokens[:20]:
            a = vm.advance(np.array([tok])).copy()
            b = np_peer.step(int(tok)).copy()
            c = torch_peer.step(int(tok)).numpy()
            worst = max(worst, float(np.abs(a - b).max()), float(np.abs(a - c).max()))
    if worst > 1e-3:
        raise AssertionError(f"the peers do not compute nn2's function: logits differ by {worst}")
    return worst


def _loops(model, np_peer, torch_peer, tokens, n, n_torch):
    import torch

    from nn2run.generate import generate
    from nn2run.sample import Sampler, SamplerConfig
    ids = tokens[:n].astype(np.intp).reshape(n, 1)
    toks = [int(t) for t in tokens[:n]]

    def nn2_step():
        vm = model.vm(1)
        vm.reset()
        for row in ids:
            vm.advance(row)

    def nn2_public_step():
        state = model.initial_state(1)
        for row in ids:
            _, state = model.step(row, state)

    def np_step():
        np_peer.reset()
        for t in toks:
            np_peer.step(t)

    def torch_step():
        torch_peer.reset()
        with torch.no_grad():
            for t in toks[:n_torch]:
                torch_peer.step(t)

    def nn2_gen():
        sampler = Sampler(SamplerConfig(), seed=0)
        for _ in generate(model, [[toks[0]]], n, sampler):
            pass

    def np_gen():
        sampler = Sampler(SamplerConfig(), seed=0)
        np_peer.reset()
        tok = toks[0]
        for _ in range(n):
            tok = int(sampler(np_peer.step(tok))[0])

    def torch_gen():
        torch_peer.reset()
        gen = torch.Generator().manual_seed(0)
        tok = toks[0]
        with torch.no_grad():
            for _ in range(n_torch):
                p = torch.softmax(torch_peer.step(tok), -1)
                tok = int(torch.multinomial(p, 1, generator=gen))
    def no_onednn(fn):
        # torch's CPU nn.LSTM goes through oneDNN (mkldnn_rnn_layer) by default, which costs
        # a primitive set-up per call at batch 1; with it off torch runs its native cell
        def run():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")         # torch warns about TF32 on toggling
                with torch.backends.mkldnn.flags(enabled=False):
                    fn()
        return run
    return {"nn2 step": nn2_step, "nn2 public step": nn2_public_step, "numpy step": np_step, "torch step": torch_step,
            "torch-native step": no_onednn(torch_step),
            "nn2 gen": nn2_gen, "numpy gen": np_gen, "torch gen": torch_gen,
            "torch-native gen": no_onednn(torch_gen)}


def bench_batch1(tmp, sizes, quick: bool):
    """Tables for generation at batch 1 against the NumPy and the torch peers."""
    import torch

    from nn2run import load

    from .common import build_lstm
    reps = 3 if quick else 5
    t_np = Table("generation, batch 1: nn2run vs hand-written fused NumPy LSTM (same weights)")
    t_torch = Table("generation, batch 1: nn2run vs torch eager nn.LSTM step loop (same weights)")
    t_torch.notes.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads, no_grad, "
                         "one nn.LSTM call per token + nn.Linear; one-hot rows looked up from a "
                         "precomputed eye (not built per step). 'default': torch as installed, whose CPU "
                         "nn.LSTM runs oneDNN RNN primitives; 'oneDNN off': under "
                         "torch.backends.mkldnn.flags(enabled=False), torch's native cell (the stronger peer)")
    t_np.notes.append("the NumPy peer folds layer 0's bias into its gathered rows and calls "
                      "the same nn2run Sampler in the sampling loop")
    rng = np.random.default_rng(1)
    for hidden in sizes:
        # steps a rep: ~0.1-0.5 s of nn2 time; the torch peer, ~6× slower, runs a quarter of them
        n = (500 if quick else 2000) * 256 // hidden
        n_torch = n // 4
        path, logical = build_lstm(tmp / f"gen-2x{hidden}.nnb", hidden)
        model = load(path)
        np_peer, torch_peer = NumpyLSTM(logical, 2), TorchLSTM(logical, 2)
        tokens = rng.integers(0, 65, n)
        diff = _check_same_function(model, np_peer, torch_peer, tokens)
        fns = _loops(model, np_peer, torch_peer, tokens, n, n_torch)
        for fn in fns.values():                     # warm-up
            fn()
        times = interleaved({k: (lambda f=f: timed(f)) for k, f in fns.items()}, reps)
        steps = {k: n_torch if k.startswith("torch") else n for k in times}
        rate = {k: steps[k] / best(v) for k, v in times.items()}
        size = f"2×{hidden}"
        for kind, label in (("step", "step only"), ("gen", "step + sampling")):
            nn2 = rate[f"nn2 {kind}"]
            t_np.add(f"{size}, {label} (steps/s)", f"{nn2:,.0f}", f"{rate[f'numpy {kind}']:,.0f}",
                     verdict(nn2 / rate[f"numpy {kind}"], at_least=0.90), "≥ 0.90×")
            if kind == "step":
                t_np.add(f"{size}, `Model.step` vs the VM's own loop (steps/s)", f"{rate['nn2 public step']:,.0f}",
                         f"{nn2:,.0f}", verdict(rate["nn2 public step"] / nn2, at_least=0.95), "≥ 0.95×")
            for peer, how in (("torch", "default"), ("torch-native", "oneDNN off")):
                t_torch.add(f"{size}, {label}, torch {how} (steps/s)", f"{nn2:,.0f}",
                            f"{rate[f'{peer} {kind}']:,.0f}", verdict(nn2 / rate[f"{peer} {kind}"], at_least=10.0),
                            "≥ 10×")
        for k, v in times.items():
            tbl = t_torch if k.startswith("torch") else t_np
            tbl.raw.append(f"{size} {k}: µs/step per rep {fmt_list([x / steps[k] for x in v], 1e6)}")
        t_torch.raw.append(f"{size}: {n_torch} torch steps a rep, {n} nn2 steps, best of {reps} interleaved reps")
        t_np.raw.append(f"{size}: {n} steps a rep, best of {reps} interleaved reps; "
                        f"max |logit diff| vs peers {diff:.1e}")
        model.close()
    return [t_np, t_torch]


def bench_streams(tmp, sizes, quick: bool):
    """64 streams on one VM against one stream, chars/s, same public path."""
    from nn2run import load
    from nn2run.generate import generate
    from nn2run.sample import Sampler, SamplerConfig

    from .common import build_lstm
    reps, streams = (3 if quick else 5), 64
    t = Table(f"generation, {streams} streams on one VM vs batch 1 (nn2run.generate, chars/s)")
    for hidden in sizes:
        n = (200 if quick else 1000) * 256 // hidden
        path = tmp / f"gen-2x{hidden}.nnb"
        if not path.exists():
            build_lstm(path, hidden)
        model = load(path)

        def gen(batch, model=model, n=n):
            sampler = Sampler(SamplerConfig(), seed=0)
            for _ in generate(model, [[1]] * batch, n, sampler):
                pass

        def step(batch, model=model, n=n):
            vm = model.vm(batch)
            vm.reset()
            ids = np.ones(batch, np.intp)
            for _ in range(n):
                vm.advance(ids)
        fns = {"64 gen": lambda: timed(gen, streams), "1 gen": lambda: timed(gen, 1),
               "64 step": lambda: timed(step, streams), "1 step": lambda: timed(step, 1)}
        for fn in fns.values():
            fn()
        times = interleaved(fns, reps)
        cps = {k: int(k.split()[0]) * n / best(v) for k, v in times.items()}
        for kind, label in (("gen", "step + sampling"), ("step", "step only")):
            r = cps[f"64 {kind}"] / cps[f"1 {kind}"]
            t.add(f"2×{hidden}, {label} (chars/s)", f"{cps[f'64 {kind}']:,.0f}",
                  f"{cps[f'1 {kind}']:,.0f}", verdict(r, at_least=10.0), "≥ 10×")
        for k, v in times.items():
            t.raw.append(f"2×{hidden} batch {k}: s per rep of {n} steps {fmt_list(v)}")
        model.close()
    return [t]

"""Training speed: nn2's Trainer step against torch.nn.LSTM + Linear with the same recipe.

Both sides see the same windows of the same corpus (nn2's own `Batches`), the same sizes
(2×256, seq 100, batch 32), Adam (lr 2e-3), gradient clipping at 5, cross-entropy, the
state carried (detached) from one window to the next, the same torch thread count.
nn2 is timed through `Trainer.step` (TorchNetwork forward + loss + backward + clip + Adam,
the loop `nn2c train` runs). The peer's layer-0 input is `F.one_hot(x, 65).float()` fed to
nn.LSTM (nn2's optimizer turns its one-hot product into a row gather, `F.embedding`).
chars/s = batch × seq × steps / time.
"""

from __future__ import annotations

import time

import numpy as np

from .common import SHAKESPEARE, VOCAB, Table, best, fmt_list, interleaved, verdict


def _corpus(tmp):
    from nn2c.train.corpus import read_corpus
    path = SHAKESPEARE
    if not path.exists():
        path = tmp / "random-corpus.txt"
        rng = np.random.default_rng(0)
        path.write_text("".join(np.array(list(VOCAB))[rng.integers(0, len(VOCAB), 400_000)]))
    return read_corpus(str(path))


class TorchPeer:
    def __init__(self, vocab, hidden, layers, batches, batch, lr, clip, device, autocast: bool = False):
        import torch
        import torch.nn.functional as F
        self.torch, self.F = torch, F
        torch.manual_seed(0)
        self.lstm = torch.nn.LSTM(vocab, hidden, layers).to(device)
        self.lin = torch.nn.Linear(hidden, vocab).to(device)
        self.params = list(self.lstm.parameters()) + list(self.lin.parameters())
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.batches, self.vocab, self.clip, self.k = batches, vocab, clip, 0
        self.device, self.autocast = torch.device(device), autocast      # autocast: bf16 products
        z = lambda: torch.zeros(layers, batch, hidden, device=device)   # noqa: E731
        self.state = (z(), z())

    def step(self) -> float:
        torch, F = self.torch, self.F
        x, y = self.batches[self.k % len(self.batches)]
        self.k += 1
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out, state = self.lstm(F.one_hot(x, self.vocab).float(), self.state)
            logits = self.lin(out)
            loss = F.cross_entropy(logits.reshape(-1, self.vocab).float(), y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.state = tuple(s.detach().float() for s in state)
        return loss.item()


def _trainer(tmp, cfg, corpus, native: bool):
    """A Trainer whose loops are native (when this machine can build them) or fused (torch)."""
    import os

    from nn2c.train.trainer import Trainer
    old = os.environ.get("NN2_NATIVE")
    os.environ["NN2_NATIVE"] = "1" if native else "0"
    try:
        tag = "native" if native else "fused"
        return Trainer(cfg, corpus, str(tmp / f"train-{tag}.nnb"), str(tmp / f"train-{tag}.ckpt"))
    finally:
        if old is None:
            del os.environ["NN2_NATIVE"]
        else:
            os.environ["NN2_NATIVE"] = old


def _steps(trainer, steps: int):
    box = {"state": None}

    def run():
        t0 = time.perf_counter()
        for _ in range(steps):
            _, box["state"] = trainer.step(box["state"])
            trainer.ts.step += 1
        return time.perf_counter() - t0
    return run


def _compare(tmp, device: str, steps: int, reps: int, hidden=256, layers=2, seq=100, batch=32,
             fused: bool = False, kernel: str = "lstm"):
    from nn2c.train.trainer import TrainConfig
    corpus = _corpus(tmp)
    cfg = TrainConfig(kernel=kernel, hidden=hidden, layers=layers, seq_len=seq, batch=batch, device=device,
                      val_frac=0.01, eval_every=10 ** 9)
    trainer = _trainer(tmp, cfg, corpus, native=True)
    peer = TorchPeer(trainer.vocab, hidden, layers, trainer.train, batch, cfg.lr, cfg.clip, trainer.device)
    sides = {"nn2": _steps(trainer, steps)}
    if fused:
        sides["nn2 fused loop"] = _steps(_trainer(tmp, cfg, corpus, native=False), steps)

    def peer_run():
        t0 = time.perf_counter()
        for _ in range(steps):
            peer.step()
        return time.perf_counter() - t0
    sides["torch"] = peer_run
    for run in sides.values():              # warm-up (allocator, native build, cuDNN plans)
        run()
    times = interleaved(sides, reps)
    chars = batch * seq * steps
    rates = {k: chars / best(v) for k, v in times.items()}
    rates["loop"] = trainer.net.loop_kind()
    return rates, times, trainer.vocab


def bench_train(tmp, quick: bool):
    import torch
    steps, reps = (3, 2) if quick else (6, 5)
    rate, times, vocab = _compare(tmp, "cpu", steps, reps, fused=True)
    t = Table("training 2×256, seq 100, batch 32, CPU: nn2c Trainer.step vs torch.nn.LSTM + Linear")
    t.add(f"chars/s ({rate['loop']} loop)", f"{rate['nn2']:,.0f}", f"{rate['torch']:,.0f}",
          verdict(rate["nn2"] / rate["torch"], at_least=1.0), "≥ 1.0×")
    fu = rate["nn2 fused loop"]
    t.add("chars/s (fused loop, NN2_NATIVE=0)", f"{fu:,.0f}", f"{rate['torch']:,.0f}",
          verdict(fu / rate["torch"], at_least=1.0), "—")
    t.notes.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads; peer input is "
                   f"F.one_hot(x, {vocab}).float() into nn.LSTM (no nn.Embedding); Adam lr 2e-3, clip 5; "
                   f"the native loop over the fused loop: {rate['nn2'] / fu:.2f}×")
    for k, v in times.items():
        t.raw.append(f"{k}: s per rep of {steps} steps {fmt_list(v)}; "
                     f"{best(v) / steps * 1e3:.0f} ms/step at best")
    return [t]


def bench_train_sizes(tmp, quick: bool):
    """The native loop against the fused loop at a small and a training size (2×32, 2×256),
    each against torch.nn.LSTM in the same run."""
    import torch
    t = Table("training by size, seq 100, batch 32, CPU: native loop vs fused loop vs torch.nn.LSTM + Linear")
    for hidden, steps in ((32, 10 if quick else 30), (256, 3 if quick else 6)):
        rate, times, _ = _compare(tmp, "cpu", steps, 2 if quick else 5, hidden=hidden, fused=True)
        fu = rate["nn2 fused loop"]
        t.add(f"2×{hidden} chars/s ({rate['loop']} loop)", f"{rate['nn2']:,.0f}", f"{rate['torch']:,.0f}",
              verdict(rate["nn2"] / rate["torch"], at_least=1.0), "—")
        t.add(f"2×{hidden} chars/s (fused loop)", f"{fu:,.0f}", f"{rate['torch']:,.0f}",
              verdict(fu / rate["torch"], at_least=1.0), "—")
        t.notes.append(f"2×{hidden}: the native loop over the fused loop {rate['nn2'] / fu:.2f}×")
        for k, v in times.items():
            t.raw.append(f"2×{hidden} {k}: s per rep of {steps} steps {fmt_list(v)}")
    t.notes.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    return [t]


def bench_train_gpu(tmp, quick: bool, tf32: bool = False):
    """Both sides on the GPU, the clock read only after torch.cuda.synchronize() (a step is
    queued, not done, when it returns), and TF32 set alike for both: cuDNN's LSTM follows
    cudnn.allow_tf32, nn2's products matmul.allow_tf32."""
    import torch
    t = Table("training 2×256, seq 100, batch 32, GPU: nn2c Trainer.step (cuda) vs cuDNN nn.LSTM")
    if not torch.cuda.is_available():
        t.add("chars/s", "skipped", "skipped", "—", "≥ 0.8×")
        t.notes.append("skipped: torch.cuda.is_available() is False on this machine")
        return [t]
    from nn2c.train.trainer import TrainConfig
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    steps, reps = (5, 2) if quick else (20, 3)
    hidden, layers, seq, batch = 256, 2, 100, 32
    corpus = _corpus(tmp)
    cfg = TrainConfig(hidden=hidden, layers=layers, seq_len=seq, batch=batch, device="cuda",
                      val_frac=0.01, eval_every=10 ** 9)
    trainer = _trainer(tmp, cfg, corpus, native=True)
    peer = TorchPeer(trainer.vocab, hidden, layers, trainer.train, batch, cfg.lr, cfg.clip, trainer.device)
    box = {"state": None}

    def nn2_step():
        _, box["state"] = trainer.step(box["state"])
        trainer.ts.step += 1

    def timed(one_step):
        def run():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                one_step()
            torch.cuda.synchronize()
            return time.perf_counter() - t0
        return run
    sides = {"nn2": timed(nn2_step), "torch": timed(peer.step)}
    for run in sides.values():              # warm-up (allocator, cuDNN plans)
        run()
    times = interleaved(sides, reps)
    chars = batch * seq * steps
    rate = {k: chars / best(v) for k, v in times.items()}
    trainer.read(trainer.health.loss)       # a diverged run is not a speed
    t.add(f"chars/s ({trainer.net.loop_kind()} loop)", f"{rate['nn2']:,.0f}", f"{rate['torch']:,.0f}",
          verdict(rate["nn2"] / rate["torch"], at_least=0.8), "≥ 0.8×")
    t.notes.append(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
                   f"cuDNN {torch.backends.cudnn.version()}; "
                   f"torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
                   f"torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}; "
                   "synchronized before each clock reading; the peer reads loss.item() every step, nn2 does not")
    for k, v in times.items():
        t.raw.append(f"{k}: s per rep of {steps} steps {fmt_list(v)}")
    return [t]


def bench_train_bf16(tmp, quick: bool):
    """bf16 products on the CPU (AMX/AVX-512 BF16 where the CPU has them): nn2c --precision bf16
    against torch.nn.LSTM under torch.autocast("cpu", bfloat16), and both in float32, one run."""
    import torch

    from nn2c.train.trainer import TrainConfig
    # four sides share the machine in turn: a repetition more than the other rows, so that
    # the best of each is less often one a neighbour's burst spoiled
    steps, reps = (3, 3) if quick else (6, 4)
    hidden, layers, seq, batch = 256, 2, 100, 32
    corpus = _corpus(tmp)
    sides, nets = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(hidden=hidden, layers=layers, seq_len=seq, batch=batch, device="cpu",
                          val_frac=0.01, eval_every=10 ** 9, precision=precision)
        (tmp / precision).mkdir(exist_ok=True)
        nets[precision] = trainer = _trainer(tmp / precision, cfg, corpus, native=True)
        sides[f"nn2 {precision}"] = _steps(trainer, steps)
    for name, autocast in (("torch fp32", False), ("torch autocast bf16", True)):
        peer = TorchPeer(trainer.vocab, hidden, layers, trainer.train, batch, cfg.lr, cfg.clip, "cpu", autocast)
        sides[name] = _peer_steps(peer, steps)
    for run in sides.values():              # warm-up (allocator, native build, oneDNN kernels)
        run()
    times = interleaved(sides, reps)
    rate = {k: batch * seq * steps / best(v) for k, v in times.items()}
    t = Table("training 2×256, seq 100, batch 32, CPU, bf16: nn2c --precision bf16 vs torch.nn.LSTM under autocast")
    t.add(f"chars/s bf16 ({nets['bf16'].net.loop_kind()} loop)", f"{rate['nn2 bf16']:,.0f}",
          f"{rate['torch autocast bf16']:,.0f}", verdict(rate["nn2 bf16"] / rate["torch autocast bf16"], at_least=1.0),
          "≥ 1.0×")
    t.add("chars/s fp32", f"{rate['nn2 fp32']:,.0f}", f"{rate['torch fp32']:,.0f}",
          verdict(rate["nn2 fp32"] / rate["torch fp32"], at_least=1.0), "—")
    t.notes.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads, oneDNN "
                   f"{'on' if torch.backends.mkldnn.is_available() else 'off'}; bf16 over fp32: "
                   f"nn2 {rate['nn2 bf16'] / rate['nn2 fp32']:.2f}×, "
                   f"torch {rate['torch autocast bf16'] / rate['torch fp32']:.2f}×")
    for k, v in times.items():
        t.raw.append(f"{k}: s per rep of {steps} steps {fmt_list(v)}; {best(v) / steps * 1e3:.0f} ms/step at best")
    return [t]


def _peer_steps(peer, steps: int):
    def run():
        t0 = time.perf_counter()
        for _ in range(steps):
            peer.step()
        return time.perf_counter() - t0
    return run

"""`nn2run`: the command line of the runtime. Argument handling only; the work is in
`nn2run.model`, `nn2run.generate`, `nn2run.sample` and `nn2run.dis`.

Exit status: 0 success, 1 bad input (prime, options), 2 a model that cannot be loaded
(or a usage error), 130 interrupted.
"""

from __future__ import annotations

import os
import sys
import time

import click

from . import __version__
from .codec import CodecError
from .format import NNBFormatError


class Failure(click.ClickException):
    """An error the user can fix: one line on stderr, `nn2run: ...`, then an exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.exit_code = code

    def show(self, file=None) -> None:
        click.echo(f"nn2run: {self.format_message()}", err=True)


def _open(path: str, verify: bool):
    from .model import load
    try:
        return load(path, verify=verify)
    except (NNBFormatError, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise Failure(f"cannot load {path}: {reason}", code=2) from None


def _sampler(model, temperature, top_k, top_p, greedy, seed):
    from .sample import Sampler, SamplerConfig
    t = temperature if temperature is not None else model.sampling["temperature"]
    cfg = SamplerConfig(temperature=t, top_k=top_k, top_p=top_p, greedy=greedy)
    try:
        return Sampler(cfg, seed)
    except ValueError as e:
        raise Failure(str(e)) from None


def _encode(model, text: str) -> list[int]:
    from .generate import start_token
    if any("\udc80" <= ch <= "\udcff" for ch in text):      # undecodable bytes read from stdin
        raise Failure("the prime is not UTF-8 text")
    try:
        return model.codec.encode(text) if text else [start_token(model)]
    except CodecError as e:
        raise Failure(str(e)) from None


class _Out:
    """stdout writer that flushes at most every 50 ms (and on every write to a terminal)."""

    def __init__(self):
        self.stream = sys.stdout
        self.tty = self.stream.isatty()
        self.last = time.monotonic()

    def write(self, text: str) -> None:
        self.stream.write(text)
        now = time.monotonic()
        if self.tty or now - self.last > 0.05:
            self.stream.flush()
            self.last = now


def _stream(model, prime: str, n: int, sampler) -> None:
    from .generate import generate
    ids = _encode(model, prime)
    out = _Out()
    out.write(prime)
    decode = model.codec.decoder()
    start = len(ids) - 1
    for t, nxt in generate(model, [ids], n, sampler):
        if t >= start:
            out.write(decode(int(nxt[0])))
    out.write("\n" if sys.stdout.isatty() else "")
    sys.stdout.flush()


def _lines(model, n: int, sampler) -> None:
    """One stream per stdin line, all continued at once; one output line per input line."""
    from .generate import generate
    primes = [line.rstrip("\n") for line in sys.stdin]
    if not primes:
        return
    encoded = [_encode(model, p) for p in primes]
    texts = [[] for _ in primes]
    starts = [len(e) - 1 for e in encoded]
    decoders = [model.codec.decoder() for _ in primes]
    for t, nxt in generate(model, encoded, n, sampler):
        for i, s in enumerate(starts):
            if s <= t < s + n:
                texts[i].append(decoders[i](int(nxt[i])))
    for prime, text in zip(primes, texts):
        line = prime + "".join(text)
        sys.stdout.write(line.replace("\\", "\\\\").replace("\n", "\\n") + "\n")
    sys.stdout.flush()


@click.command(context_settings={"help_option_names": ["-h", "--help"]},
               epilog="Exit status: 0 ok, 1 bad input, 2 a model that cannot be loaded, 130 interrupted.")
@click.argument("model_path", metavar="MODEL.nnb", type=click.Path(dir_okay=True))
@click.option("--prime", "-p", default="", help="Text to start from; '-' reads it from stdin.")
@click.option("-n", "length", type=int, default=500, show_default=True, help="Tokens to generate (per stream).")
@click.option("--temperature", "-t", type=float, default=None, help="Sampling temperature (default: the model's, else 1.0).")
@click.option("--top-k", type=int, default=None, help="Sample from the K most likely tokens.")
@click.option("--top-p", type=float, default=None, help="Sample from the smallest set with probability ≥ P.")
@click.option("--greedy", is_flag=True, help="Always take the most likely token.")
@click.option("--seed", type=int, default=None, help="Random seed: the same seed gives the same text.")
@click.option("--lines", is_flag=True, help="Continue every stdin line at once; one output line each (\\n escaped).")
@click.option("--info", is_flag=True, help="Print the header: equations, parameters, provenance.")
@click.option("--dis", is_flag=True, help="Disassemble the program, one instruction a line.")
@click.option("--verify", is_flag=True, help="Also verify the checksum of the tensor data.")
@click.version_option(__version__, prog_name="nn2run")
def main(model_path, prime, length, temperature, top_k, top_p, greedy, seed, lines, info, dis, verify):
    """Generate text with an nn2 model: nn2run MODEL.nnb --prime "The" -n 500"""
    if length < 0:
        raise Failure("-n must be ≥ 0")
    model = _open(model_path, verify)
    try:
        if info or dis:
            from .dis import describe, disassemble
            if info:
                click.echo(describe(model))
            if dis:
                click.echo(disassemble(model.program, model.tensors))
            return
        sampler = _sampler(model, temperature, top_k, top_p, greedy, seed)
        if lines:
            _lines(model, length, sampler)
        else:
            _stream(model, sys.stdin.read() if prime == "-" else prime, length, sampler)
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, and keep Python from complaining at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except KeyboardInterrupt:
        raise Failure("interrupted", code=130) from None


from .serve import serve_command  # noqa: E402  (`nn2run serve`, on the command group)
if isinstance(main, click.Group):
    main.add_command(serve_command)

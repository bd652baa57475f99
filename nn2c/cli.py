"""`nn2c`: the command line of the compiler. Argument handling only; the work is in
`nn2c.compiler.pipeline`, `nn2c.train.trainer` and `nn2c.compiler.report`.

Exit status: 0 success, 1 an error the user can fix (kernel, corpus, options, disk),
2 usage error, 130 interrupted (a checkpoint and the best model so far are kept).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from nn2c import __version__


class Failure(click.ClickException):
    """One line on stderr (`nn2c: ...`, or a kernel error with its caret), then exit."""

    def __init__(self, message: str, code: int = 1, raw: bool = False):
        super().__init__(message)
        self.exit_code, self.raw = code, raw

    def show(self, file=None) -> None:
        click.echo(self.format_message() if self.raw else f"nn2c: {self.format_message()}", err=True)


def failure_of(e: Exception) -> Failure:
    """The one place where a typed error of nn2c becomes what the user sees: a kernel error
    with its caret when it points into the source, every other one a `nn2c:` line; the
    status is the error class's `exit_status` (130 for an interruption), else 1."""
    from nn2c.lang.errors import KernelError
    if isinstance(e, KernelError):
        return Failure(str(e), raw=e.pos is not None and e.pos.line >= 1)
    return Failure(str(e), code=getattr(e, "exit_status", 1))


def _echo(text: str) -> None:
    """A line on stdout. A stdout that cannot be written (a full disk) is one line, not a
    traceback; a reader that went away (`| head`) is click's to end quietly."""
    try:
        click.echo(text)
    except OSError as e:
        if e.errno == errno.EPIPE:
            raise
        # what is still buffered cannot be written either: keep the exit's flush quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise Failure(f"cannot write to stdout: {e.strerror or e}") from None


def _writable(path: str) -> None:
    """Refuse an output path we could not write, before any work is done. A symlink is
    followed (its target is what gets written); an existing path that is not a regular
    file is refused rather than replaced."""
    from nn2run.atomic import not_regular
    parent = Path(path).resolve().parent
    kind = not_regular(path)
    if kind is not None:
        raise Failure(f"cannot write {path}: it is {kind}, not a regular file; give a file path")
    if not parent.is_dir():
        raise Failure(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise Failure(f"cannot write {path}: directory {parent} is not writable")


def _same_file(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve() or (
        os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def _check_paths(corpus: str | None, output: str, ckpt: str, log: str | None = None, kernels=()) -> None:
    """Refuse outputs that cannot be written, that coincide, or that are an input (the corpus,
    or a kernel given as a file)."""
    _writable(output)
    _writable(ckpt)
    if _same_file(output, ckpt):
        raise Failure(f"--checkpoint and --output are the same file ({output}); give two paths")
    if log is not None:
        _writable(log)
        for path, flag in ((output, "--output"), (ckpt, "--checkpoint")):
            if _same_file(log, path):
                raise Failure(f"--log and {flag} are the same file ({log}); give two paths")
    for path, flag in ((output, "--output"), (ckpt, "--checkpoint"), (log, "--log")):
        if path is None:
            continue
        if corpus is not None and _same_file(corpus, path):
            raise Failure(f"{flag} {path} is the corpus; writing there would destroy it")
        for kernel in kernels:
            if os.path.isfile(kernel) and _same_file(kernel, path):
                raise Failure(f"{flag} {path} is the kernel {kernel}; writing there would destroy it")


class Commands(click.Group):
    """nn2c's commands. A Ctrl-C that reaches here (training handles its own: it saves and
    says where) is one line and status 130, not click's "Aborted!" and status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Failure("interrupted", code=130) from None


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nn2c")
def main():
    """nn2c — compile recurrent cells written as equations, train them, write .nnb files."""


@main.command()
@click.argument("kernel")
@click.option("--hidden", type=int, default=None, help="Hidden size for concrete shapes.")
@click.option("--vocab", type=int, default=None, help="Vocabulary size for concrete shapes.")
@click.option("--layers", type=int, default=1, show_default=True)
@click.option("--no-opt", is_flag=True, help="Show the program before optimization.")
def check(kernel, hidden, vocab, layers, no_opt):
    """Parse and check KERNEL (a sample name or a .eq file); show what it compiles to.

    Example: nn2c check samples/kernels/lstm.eq --hidden 128 --vocab 65
    """
    from nn2c.compiler.report import describe_kernel
    from nn2c.lang.errors import KernelError
    from nn2run.model import MAX_LAYERS
    for name, v in (("--hidden", hidden), ("--vocab", vocab), ("--layers", layers)):
        if v is not None and v <= 0:
            raise Failure(f"{name} must be > 0")
    if layers > MAX_LAYERS:         # the program of 100,000 layers takes minutes to build
        raise Failure(f"--layers must be ≤ {MAX_LAYERS} (the most nn2run loads), got {layers}")
    try:
        _echo(describe_kernel(kernel, hidden, vocab, layers, optimized=not no_opt))
    except KernelError as e:
        raise failure_of(e) from None


@main.command()
@click.argument("corpus", required=False)
@click.option("-o", "--output", default="model.nnb", show_default=True, help="The .nnb file to write.")
@click.option("--kernel", "-k", default="lstm", show_default=True,
              help="Sample name (lstm, gru, rnn, …) or a .eq file.")
@click.option("--hidden", type=int, default=128, show_default=True)
@click.option("--layers", type=int, default=2, show_default=True)
@click.option("--seq-len", type=int, default=64, show_default=True, help="Truncated-BPTT window.")
@click.option("--batch", type=int, default=32, show_default=True)
@click.option("--steps", type=int, default=None, help="Optimizer steps [default: 2000, or --epochs].")
@click.option("--epochs", type=float, default=None, help="Passes over the training split (instead of --steps).")
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--clip", type=float, default=5.0, show_default=True, help="Gradient-norm clipping.")
@click.option("--eval-every", type=int, default=200, show_default=True, help="Validate every N steps.")
@click.option("--val-frac", type=float, default=0.05, show_default=True, help="Tail of the corpus held out.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--codec", default="char", show_default=True, type=click.Choice(["char", "byte"]))
@click.option("--codec-service", default=None, metavar="HOST:PORT",
              help="Tokenize with the codec service at HOST:PORT (instead of --codec); needs nn2[grpc].")
@click.option("--checkpoint", "ckpt", default=None, help="Checkpoint file [default: OUTPUT.ckpt].")
@click.option("--dropout", type=float, default=0.0, show_default=True,
              help="Dropout on each layer's output (training only).")
@click.option("--max-minutes", type=float, default=None,
              help="Stop after this much training time (then validate and write).")
@click.option("--checkpoint-every", type=int, default=None, help="Checkpoint every N steps [default: --eval-every].")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint (same corpus).")
@click.option("--sample", "sample_len", type=int, default=0, help="Print N generated characters when done.")
@click.option("--log", "log", default=None, help="Append one JSON line per evaluation to this file (see nn2c plot).")
@click.option("--precision", default="fp32", show_default=True, metavar="fp32|bf16",
              help="bf16: products in bfloat16 (float32 sums, weights and the rest float32).")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Train in N processes on this machine (torch.distributed: gloo on CPU, NCCL on CUDA).")
@click.option("--task", default="lm", show_default=True, type=click.Choice(["lm", "seq2seq"]),
              help="lm: a language model on a text; seq2seq: source→target on a TSV of pairs.")
@click.option("--encoder", default="gru", show_default=True, help="--task seq2seq: the encoder's cell kernel.")
@click.option("--decoder", default="seq2seq/bahdanau", show_default=True,
              help="--task seq2seq: the decoder kernel.")
def train(corpus, output, kernel, hidden, layers, seq_len, batch, steps, epochs, lr, clip, eval_every,
          val_frac, seed, device, codec, codec_service, dropout, max_minutes, ckpt, checkpoint_every, resume,
          sample_len, log, nproc, precision, task, encoder, decoder):
    """Train a character model on CORPUS (default: a small bundled corpus, or the checkpoint's
    corpus with --resume) and write a .nnb; with --task seq2seq, CORPUS is a TSV of
    source<TAB>target lines.

    Example: nn2c train corpus.txt -o model.nnb --kernel gru --hidden 256 --steps 5000
    """
    if steps is not None and epochs is not None:
        raise Failure("give --steps or --epochs, not both")
    if task == "seq2seq":
        _train_seq2seq(click.get_current_context(), corpus, output, ckpt, resume)
        return
    ctx = click.get_current_context()
    for name in ("encoder", "decoder"):
        if ctx.get_parameter_source(name) != ParameterSource.DEFAULT:
            raise Failure(f"--{name} is for --task seq2seq; a language model has one --kernel")
    if sample_len < 0:
        raise Failure(f"--sample must be ≥ 0, got {sample_len}")
    if codec_service is not None:
        if ctx.get_parameter_source("codec") != ParameterSource.DEFAULT:
            raise Failure("give --codec or --codec-service, not both")
        codec = "service"
    ckpt = ckpt or output + ".ckpt"
    _check_paths(corpus, output, ckpt, log, [kernel])
    if _launching(ctx, nproc, batch, device):
        from nn2c.train.distributed import launch
        code, line = launch(_forwarded(ctx), nproc, ckpt)
        if line is not None:
            raise Failure(line, code=code)
        ctx.exit(code)
    options = dict(
        kernel=kernel, hidden=hidden, layers=layers, seq_len=seq_len, batch=batch,
        steps=steps if steps is not None or epochs is not None else 2000, epochs=epochs, lr=lr, clip=clip,
        eval_every=eval_every, val_frac=val_frac, seed=seed, device=device, codec=codec,
        checkpoint_every=checkpoint_every, dropout=dropout, max_minutes=max_minutes, precision=precision)
    given = frozenset(name for name in options if ctx.get_parameter_source(name) != ParameterSource.DEFAULT
                      and not (name == "codec" and codec_service is not None))
    try:
        from nn2c.train.session import EXPECTED, TrainRequest, run_training
    except KeyboardInterrupt:
        raise Failure("interrupted before training started; nothing was written", code=130) from None
    try:
        run_training(TrainRequest(corpus, output, ckpt, resume, options, given, codec_service, log), sample_len)
    except EXPECTED as e:
        from nn2c.train.distributed import World
        world = World.from_env()
        if world is not None and world.rank != 0:    # in a job only rank 0 speaks; all fail alike
            raise SystemExit(failure_of(e).exit_code) from None
        raise failure_of(e) from None


@main.command()
@click.argument("model")
@click.option("--dtype", required=True, type=click.Choice(["f16", "int8"]),
              help="f16: every tensor half precision; int8: matrices int8 with a float32 scale per output row.")
@click.option("-o", "--output", required=True, help="The smaller .nnb file to write (atomically).")
def quantize(model, dtype, output):
    """Write a smaller copy of MODEL (a float32 .nnb) with f16 or int8 weights.

    Example: nn2c quantize model.nnb --dtype int8 -o model.int8.nnb
    """
    from nn2c.compiler.quantize import QuantizeError, quantize_file
    try:
        _echo(quantize_file(model, output, dtype))
    except QuantizeError as e:
        raise failure_of(e) from None


@main.command()
@click.argument("logs", nargs=-1, required=True)
@click.option("-o", "--output", default="loss.png", show_default=True, help="The PNG to write.")
@click.option("--x", "x_axis", default="step", show_default=True, type=click.Choice(["step", "time"]),
              help="Horizontal axis: optimizer steps, or training time in seconds.")
def plot(logs, output, x_axis):
    """Draw the loss curves of training logs (nn2c train --log) into a PNG.

    Example: nn2c plot run.jsonl other.jsonl -o loss.png
    """
    from nn2c.train.plot import PlotError, plot_logs
    _writable(output)
    for log in logs:
        if _same_file(log, output):
            raise Failure(f"-o {output} is the log {log}; writing there would destroy it")
    try:
        plot_logs(list(logs), output, x_axis)
    except PlotError as e:
        raise failure_of(e) from None
    click.echo(f"wrote {output}: {len(logs)} run{'' if len(logs) == 1 else 's'}", err=True)


# Options of a language model's training that a seq2seq run has no use for: refused if given.
LM_ONLY = ("kernel", "seq_len", "codec", "codec_service", "dropout", "sample_len", "log", "nproc", "precision")
SEQ2SEQ_OPTIONS = ("encoder", "decoder", "hidden", "layers", "batch", "steps", "epochs", "lr", "clip", "eval_every",
                   "val_frac", "seed", "device", "checkpoint_every", "max_minutes")


def _train_seq2seq(ctx, pairs, output, ckpt, resume) -> None:
    given = {name for name in ctx.params if ctx.get_parameter_source(name) != ParameterSource.DEFAULT}
    for name in LM_ONLY:
        if name in given:
            flag = {"sample_len": "--sample"}.get(name, "--" + name.replace("_", "-"))
            raise Failure(f"{flag} does not apply to --task seq2seq")
    if pairs is None and not resume:
        raise Failure("--task seq2seq needs the pairs file: nn2c train --task seq2seq PAIRS.tsv")
    ckpt = ckpt or output + ".ckpt"
    _check_paths(pairs, output, ckpt, kernels=[ctx.params["encoder"], ctx.params["decoder"]])
    options = {name: ctx.params[name] for name in SEQ2SEQ_OPTIONS}
    options["layers"] = options["layers"] if "layers" in given else 1       # one layer, 64 pairs: the
    options["batch"] = options["batch"] if "batch" in given else 64          # seq2seq defaults
    if options["steps"] is None and options["epochs"] is None:
        options["steps"] = 2000
    from nn2c.train.seq2seq.session import EXPECTED, Seq2SeqRequest, run_seq2seq
    try:
        run_seq2seq(Seq2SeqRequest(pairs, output, ckpt, resume, options, frozenset(given & set(options))))
    except EXPECTED as e:
        raise failure_of(e) from None


@main.command()
@click.argument("task", type=click.Choice(["copy", "reverse", "dates"]))
@click.option("-n", "count", type=int, default=10000, show_default=True, help="How many pairs.")
@click.option("-o", "--output", required=True, help="The TSV file to write (source<TAB>target lines).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--min-len", type=int, default=1, show_default=True, help="copy, reverse: shortest string.")
@click.option("--max-len", type=int, default=12, show_default=True, help="copy, reverse: longest string.")
def tasks(task, count, output, seed, min_len, max_len):
    """Write generated pairs for --task seq2seq: copy or reverse random strings, or dates in
    several formats -> ISO 8601 (the same file for the same seed).

    Example: nn2c tasks dates -n 20000 -o dates.tsv && nn2c train --task seq2seq dates.tsv
    """
    from nn2c.train.tasks import TaskError, generate, tsv
    _writable(output)
    try:
        text = tsv(generate(task, count, seed, min_len, max_len))
    except TaskError as e:
        raise failure_of(e) from None
    from nn2run.atomic import write_atomic
    try:
        write_atomic(output, [text.encode("utf-8")])
    except OSError as e:
        raise Failure(f"cannot write {output}: {e.strerror or e}") from None
    click.echo(f"wrote {output}: {count:,} {task} pairs (seed {seed})", err=True)


def _launching(ctx, nproc: int, batch: int, device: str) -> bool:
    """Whether this is `--nproc N` asking for a job to be started here; its options checked."""
    from nn2c.train.distributed import World, split_error
    if nproc < 1:
        raise Failure(f"--nproc must be ≥ 1, got {nproc}")
    world = World.from_env()
    if world is not None:               # already a rank of a job (torchrun's, or ours)
        if ctx.get_parameter_source("nproc") != ParameterSource.DEFAULT and nproc != world.size:
            raise Failure(f"--nproc {nproc} differs from the job's WORLD_SIZE {world.size}; leave --nproc out "
                          "under torchrun")
        return False
    if nproc == 1:
        return False
    if ctx.get_parameter_source("batch") != ParameterSource.DEFAULT and split_error(batch, nproc):
        raise Failure(split_error(batch, nproc))
    if device == "cuda":
        import torch
        if torch.cuda.device_count() < nproc:
            raise Failure(f"--nproc {nproc} --device cuda needs {nproc} GPUs; this machine has "
                          f"{torch.cuda.device_count()}")
    return True


def _forwarded(ctx) -> list[str]:
    """The train command's arguments as the user gave them, less --nproc: each rank parses
    them itself (so --resume sees the same given options)."""
    args = []
    for param in ctx.command.params:
        if param.name == "nproc" or ctx.get_parameter_source(param.name) == ParameterSource.DEFAULT:
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            args.append(str(value))
        elif getattr(param, "is_flag", False):
            args += [param.opts[-1]] if value else []
        else:
            args += [param.opts[-1], str(value)]
    return args


@main.command()
def samples():
    """List the sample kernels shipped with nn2c."""
    import shutil
    import textwrap

    from nn2c.lang.kernels import description, sample_names, samples_dir
    width = max(60, shutil.get_terminal_size((88, 24)).columns)
    for name in sample_names():
        text = description((samples_dir() / f"{name}.eq").read_text(encoding="utf-8"))
        _echo(textwrap.fill(text, width, initial_indent=f"{name:<10} ", subsequent_indent=" " * 11))


@main.command()
@click.argument("model")
@click.option("--onnx", "onnx_path", required=True, help="The ONNX file to write (one step of the model).")
def export(model, onnx_path):
    """Write MODEL's step as an ONNX graph: ids and states in, logits and new states out.

    Example: nn2c export model.nnb --onnx model.onnx
    """
    from nn2c.compiler.export import ExportError, export_onnx
    _writable(onnx_path)
    try:
        _echo(export_onnx(model, onnx_path))
    except ExportError as e:
        raise failure_of(e) from None


if __name__ == "__main__":      # pragma: no cover
    sys.exit(main())

"""`nn2run`: the command line of the runtime. Argument handling and stdin/stdout only; the
work is in `nn2run.model`, `nn2run.generate`, `nn2run.score`, `nn2run.sample` and `nn2run.dis`.

`nn2run MODEL.nnb [options]` is `nn2run generate MODEL.nnb [options]`: a first argument
that is not a command name goes to the default command. Other commands are registered
on `main` with one line each: `main.add_command(cmd)`, or, imported only when used,
`main.add_lazy_command("NAME", "module:attribute")`.

Data: a char (text) model reads and writes UTF-8 text; a byte model reads and writes raw
bytes (its codec's `binary`), so binary data round-trips.

Exit status: 0 success, 1 bad input (prime, options) or output that cannot be written,
2 a model that cannot be loaded (or a usage error), 130 interrupted.
"""

from __future__ import annotations

import errno
import os
import sys
import time

import click

from . import __version__
from .codec import CodecError
from .format import NNBFormatError

EXIT_HELP = ("Exit status: 0 ok, 1 bad input or unwritable output, 2 a usage error or a model that cannot be loaded, "
             "130 interrupted.")
USAGE = 2              # the status click gives a bad option, for the checks it cannot make


class Failure(click.ClickException):
    """An error the user can fix: one line on stderr, `nn2run: ...`, then an exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.exit_code = code

    def show(self, file=None) -> None:
        click.echo(f"nn2run: {self.format_message()}", err=True)


class DefaultGroup(click.Group):
    """A group whose first argument, when it is not a command name (nor a group option),
    is handed to the default command, so `nn2run MODEL.nnb ...` keeps working."""

    def __init__(self, *args, default: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.default = default
        self._lazy: dict[str, str] = {}

    def add_lazy_command(self, name: str, target: str) -> None:
        """Register `name` as the click command at "module:attribute", imported on first use."""
        self._lazy[name] = target

    def list_commands(self, ctx) -> list[str]:
        return sorted(set(self.commands) | set(self._lazy))

    def get_command(self, ctx, name):
        if name not in self.commands and name in self._lazy:
            import importlib
            module, _, attr = self._lazy[name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return self.commands.get(name)

    def invoke(self, ctx):
        # a Ctrl-C outside a command's own handling (e.g. while the model is loaded and
        # verified): one line and status 130, not click's "Aborted!" and status 1
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Failure("interrupted", code=130) from None

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in self._lazy \
                and args[0] not in ("-h", "--help", "--version"):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


class Output:
    """stdout as bytes (text is written as UTF-8): flushed at most every 50 ms, and on every
    write to a terminal. A write that fails raises OutputError."""

    def __init__(self):
        if sys.stdout is None:              # started with stdout closed (`>&-`)
            raise Failure("cannot write to stdout: it is closed")
        self.stream = sys.stdout.buffer
        self.tty = sys.stdout.isatty()
        self.last = time.monotonic()

    def write(self, piece: str | bytes) -> None:
        try:
            self.stream.write(piece.encode("utf-8") if isinstance(piece, str) else piece)
            now = time.monotonic()
            if self.tty or now - self.last > 0.05:
                self.stream.flush()
                self.last = now
        except OSError as e:
            raise OutputError(e) from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            raise OutputError(e) from None


class OutputError(Exception):
    """Writing to stdout failed (a full disk, a closed pipe)."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror or str(error))
        self.errno = error.errno


def _silence_stdout() -> None:
    # whatever is still buffered cannot be written: point stdout at /dev/null so that the
    # interpreter's last flush does not print a second error
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _guarded(body):
    """Run a command body: output errors, a closed pipe and Ctrl-C become one line or none."""
    try:
        body()
    except OutputError as e:
        _silence_stdout()
        if e.errno != errno.EPIPE:          # the reader went away (`| head`): stop quietly
            raise Failure(f"cannot write to stdout: {e}") from None
    except KeyboardInterrupt:
        raise Failure("interrupted", code=130) from None


# --- input ------------------------------------------------------------------------------
def _open(path: str, verify: bool, codec_service: str | None = None):
    from .model import load
    if codec_service is not None:
        from .grpc import needs_extra
        if needs_extra("--codec-service"):
            raise Failure(needs_extra("--codec-service"))
    try:
        model = load(path, verify=verify)
    except (NNBFormatError, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise Failure(f"cannot load {path}: {reason}", code=2) from None
    if codec_service is not None:
        if not hasattr(model.codec, "attach"):
            raise Failure(f"--codec-service: {path} has the {model.codec.name} codec, not a codec service")
        try:
            model.codec.attach(codec_service)
        except CodecError as e:
            raise Failure(str(e)) from None
    return model


def _stdin():
    """stdin as bytes; a stdin closed at start (`<&-`) is a Failure."""
    if sys.stdin is None:
        raise Failure("cannot read stdin: it is closed")
    return sys.stdin.buffer


def _read_stdin() -> bytes:
    try:
        return _stdin().read()
    except OSError as e:
        raise Failure(f"cannot read stdin: {e.strerror or e}") from None


def _stdin_lines(binary: bool):
    """stdin's lines without their terminators (LF or CRLF), as bytes for a binary codec
    and as text otherwise; yields (line number, line)."""
    try:
        for number, raw in enumerate(_stdin(), 1):
            line = raw[:-1] if raw.endswith(b"\n") else raw
            line = line[:-1] if raw.endswith(b"\r\n") else line
            if binary:
                yield number, line
                continue
            try:
                yield number, line.decode("utf-8")
            except UnicodeDecodeError:
                raise Failure(f"line {number} is not UTF-8 text") from None
    except OSError as e:
        raise Failure(f"cannot read stdin: {e.strerror or e}") from None


def _prime_data(model, prime: str) -> str | bytes:
    """The prime as the codec takes it. From stdin (`-`): raw bytes for a binary codec; UTF-8
    text for a text codec, without one trailing line terminator (`echo "The" | ...`)."""
    binary = model.codec.binary
    if prime != "-":
        # argv bytes that were not UTF-8 arrive as surrogate escapes: a byte model takes them back
        return prime.encode("utf-8", "surrogateescape") if binary else prime
    data = _read_stdin()
    if binary:
        return data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Failure("the prime is not UTF-8 text") from None
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _encode(model, data, where: str = "") -> list[int]:
    from .generate import start_token
    if isinstance(data, str) and any("\udc80" <= ch <= "\udcff" for ch in data):
        raise Failure(f"{where}the prime is not UTF-8 text")
    try:
        return model.codec.encode(data) if data else [start_token(model)]
    except CodecError as e:
        raise Failure(f"{where}{e}") from None


def _sampler(model, temperature, top_k, top_p, greedy, seed):
    from .sample import Sampler, SamplerConfig
    if greedy and (temperature, top_k, top_p) != (None, None, None):
        raise Failure("--greedy always takes the most likely token: give it without -t, --top-k and --top-p",
                      code=USAGE)
    t = temperature if temperature is not None else model.sampling["temperature"]
    try:
        return Sampler(SamplerConfig(temperature=t, top_k=top_k, top_p=top_p, greedy=greedy), seed)
    except ValueError as e:
        raise Failure(str(e), code=USAGE) from None


# --- output -----------------------------------------------------------------------------
# what a file's strings (its kernel source, provenance, names) may not send to a terminal raw:
# C0 controls but tab and newline, DEL and C1 (escape sequences), zero-width and bidi controls
_UNSHOWN = None


def _shown(text: str) -> str:
    """`text` with the characters a terminal would act on written as escapes (\\x1b, \\u202e)."""
    global _UNSHOWN
    if _UNSHOWN is None:
        import re
        _UNSHOWN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
    return _UNSHOWN.sub(lambda m: (f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}"), text)


def _join(model, pieces) -> str | bytes:
    return b"".join(pieces) if model.codec.binary else "".join(pieces)


def _escape(line: str | bytes) -> str | bytes:
    """One output line per input line: backslash, LF and CR escaped as \\\\, \\n and \\r."""
    if isinstance(line, bytes):
        return line.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
    return line.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _json_line(obj: dict, binary: bool) -> str:
    """One JSON object and a newline. A byte model's bytes are read as UTF-8 with undecodable
    bytes as U+DC80..U+DCFF escapes (Python's surrogateescape), so nothing is lost."""
    import json
    if binary:
        obj = {k: v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for k, v in obj.items()}
    return json.dumps(obj, ensure_ascii=binary) + "\n"


def _stream(model, data, n: int, sampler, out: Output, jsonl: bool) -> None:
    from .generate import generate
    ids = _encode(model, data)
    decode = _step_decoder(model, [ids])
    start, pieces = len(ids) - 1, []
    if not jsonl:
        out.write(data)
    try:
        for t, nxt in generate(model, [ids], n, sampler):
            if t >= start:
                piece = decode([0], nxt, [t == start])[0]
                if jsonl:
                    pieces.append(piece)
                else:
                    out.write(piece)
    finally:                                     # Ctrl-C: what was made is still written
        if jsonl:
            out.write(_json_line({"prime": data, "text": _join(model, pieces)}, model.codec.binary))
        elif out.tty:
            out.write("\n")                      # so the shell prompt starts on a line of its own
        out.flush()


LINES_BATCH = 256      # --lines streams run together: memory stays bounded, output comes as it is made


def _lines(model, n: int, sampler, out: Output, jsonl: bool) -> None:
    """One stream per stdin line, LINES_BATCH lines at once; one output line per input line."""
    chunk = []
    for item in _stdin_lines(model.codec.binary):
        chunk.append(item)
        if len(chunk) == LINES_BATCH:
            _lines_batch(model, chunk, n, sampler, out, jsonl)
            chunk = []
    if chunk:
        _lines_batch(model, chunk, n, sampler, out, jsonl)


def _lines_batch(model, chunk, n: int, sampler, out: Output, jsonl: bool) -> None:
    from .generate import generate
    encoded = [_encode(model, p, f"line {number}: ") for number, p in chunk]
    texts = [[] for _ in chunk]
    starts = [len(e) - 1 for e in encoded]
    decode = _step_decoder(model, encoded)
    try:
        for t, nxt in generate(model, encoded, n, sampler):
            live = [i for i, s in enumerate(starts) if s <= t < s + n]
            for i, piece in zip(live, decode(live, nxt, [t == starts[i] for i in live])):
                texts[i].append(piece)
    finally:                                     # Ctrl-C: every line of the batch as far as it got
        for (number, prime), text in zip(chunk, texts):
            if jsonl:
                out.write(_json_line({"line": number, "prime": prime, "text": _join(model, text)},
                                     model.codec.binary))
            else:
                out.write(_escape(prime + _join(model, text)))
                out.write(b"\n")
        out.flush()


def _step_decoder(model, primes):
    """decode(streams, ids, first) -> each stream's text for this step: per-stream decoders,
    or one call for all streams to a codec that decodes a step at once (a codec service),
    which is told each stream's prime before its first token."""
    if not hasattr(model.codec, "step_decoder"):
        decoders = [model.codec.decoder() for _ in primes]
        return lambda live, ids, first: [decoders[i](int(ids[i])) for i in live]
    try:
        step = model.codec.step_decoder()
    except CodecError as e:                 # e.g. a codec service's model run without its address
        raise Failure(str(e)) from None

    def decode(live, ids, first):
        for i, new in zip(live, first):
            if new:
                step.start(i, primes[i])
        return step([(i, int(ids[i])) for i in live]) if live else []
    return decode


def _score(model, out: Output, jsonl: bool, batch: int = 256) -> None:
    from .score import score
    chunk = []

    def flush_chunk():
        encoded, refused = [], None
        for number, line in chunk:          # the lines before a refused one are still scored
            try:
                encoded.append(_encode(model, line, f"line {number}: ") if line else [])
            except Failure as e:
                refused = e
                break
        for (number, line), (bits, count) in zip(chunk, score(model, encoded)):
            if jsonl:
                out.write(_json_line({"line": number, "bits_per_token": None if count == 0 else round(bits, 6),
                                      "tokens": count, "text": line}, model.codec.binary))
            else:
                out.write(f"{bits:.4f}\t")
                out.write(_escape(line))
                out.write(b"\n")
        chunk.clear()
        if refused is not None:
            raise refused
    for item in _stdin_lines(model.codec.binary):
        chunk.append(item)
        if len(chunk) == batch:
            flush_chunk()
    flush_chunk()
    out.flush()


# --- commands ---------------------------------------------------------------------------
CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(cls=DefaultGroup, default="generate", context_settings=CONTEXT, epilog=EXIT_HELP)
@click.version_option(__version__, prog_name="nn2run")
def main():
    """The nn2 runtime. `nn2run MODEL.nnb [options]` generates text (the `generate` command);
    `nn2run score MODEL.nnb < lines` scores lines."""


def _model_options(fn):
    fn = click.option("--codec-service", default=None, metavar="HOST:PORT",
                      help="The codec service of a model trained with one (needs nn2[grpc]).")(fn)
    fn = click.option("--verify/--no-verify", default=True, show_default=True,
                      help="Check the SHA-256 of the tensor data before running (the header's is always checked).")(fn)
    return click.argument("model_path", metavar="MODEL.nnb", type=click.Path(dir_okay=True))(fn)


@main.command(context_settings=CONTEXT, epilog=EXIT_HELP)
@_model_options
@click.option("--prime", "-p", default="",
              help="Text to start from; '-' reads it from stdin (a text model drops one trailing newline; "
                   "a byte model takes the bytes exactly).")
@click.option("-n", "length", type=int, default=500, show_default=True, help="Tokens to generate (per stream).")
@click.option("--temperature", "-t", type=float, default=None,
              help="Sampling temperature (default: the model's, else 1.0).")
@click.option("--top-k", type=int, default=None, help="Sample from the K most likely tokens.")
@click.option("--top-p", type=float, default=None, help="Sample from the smallest set with probability ≥ P.")
@click.option("--greedy", is_flag=True, help="Always take the most likely token (not with -t, --top-k, --top-p).")
@click.option("--seed", type=int, default=None, help="Random seed: the same seed gives the same text.")
@click.option("--lines", is_flag=True,
              help="Continue every stdin line at once; one output line each (\\, LF and CR escaped as \\\\, \\n, "
                   "\\r). Each line is its own prime: --prime is refused with --lines.")
@click.option("--jsonl", is_flag=True,
              help="Print one JSON object per stream: {prime, text} (with --lines, also line).")
@click.option("--info", is_flag=True, help="Print the header: equations, parameters, provenance.")
@click.option("--dis", is_flag=True, help="Disassemble the program, one instruction a line.")
def generate(model_path, verify, codec_service, prime, length, temperature, top_k, top_p, greedy, seed, lines, jsonl,
             info, dis):
    """Generate text with an nn2 model: nn2run MODEL.nnb --prime "The" -n 500"""
    if length < 0:
        raise Failure("-n must be ≥ 0", code=USAGE)
    if lines and prime:
        raise Failure("--prime cannot be used with --lines: each stdin line is a prime of its own", code=USAGE)
    model = _open(model_path, verify, None if info or dis else codec_service)
    seq2seq = hasattr(model, "translate")
    if seq2seq and not (info or dis):
        raise Failure(f"{model_path} is a seq2seq model: use nn2run translate {model_path}", code=USAGE)
    out = Output()

    def body():
        if info or dis:
            from . import dis as views
            if info:
                out.write(_shown((views.describe_seq2seq if seq2seq else views.describe)(model)) + "\n")
            if dis:
                out.write(_shown(views.disassemble_seq2seq(model) if seq2seq
                                 else views.disassemble(*model.bound_program(), bound=True)))
                out.write("\n")
            out.flush()
            return
        sampler = _sampler(model, temperature, top_k, top_p, greedy, seed)
        if lines:
            _lines(model, length, sampler, out, jsonl)
        else:
            _stream(model, _prime_data(model, prime), length, sampler, out, jsonl)
    _guarded(body)


@main.command(context_settings=CONTEXT, epilog=EXIT_HELP)
@_model_options
@click.option("--jsonl", is_flag=True, help="Print one JSON object per line: {line, bits_per_token, tokens, text}.")
def score(model_path, verify, codec_service, jsonl):
    """Score stdin lines: for each, its mean bits per character (per token), a tab, the line.

    A line is scored as if it followed a newline; an empty line scores nan.
    `nn2run score m.nnb < log.txt | sort -rn | head` shows the most surprising lines."""
    model = _open(model_path, verify, codec_service)
    if hasattr(model, "translate"):
        raise Failure(f"{model_path} is a seq2seq model: use nn2run translate {model_path}", code=USAGE)
    out = Output()
    _guarded(lambda: _score(model, out, jsonl))


main.add_lazy_command("serve", "nn2run.serve:serve_command")
main.add_lazy_command("translate", "nn2run.translate:translate_command")

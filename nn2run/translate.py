"""`nn2run translate MODEL.nnb`: one stdin line in, one stdout line out, in order.

Lines are read as they arrive: whatever is already waiting (up to a few batches) is
translated together, sorted by length into batches of --batch and put back in order, and
each output line is flushed as soon as it is written, so the command works inside a
pipeline that writes a line and waits for the answer. An empty line gives an empty line. A
line the model cannot take (characters it does not know, or longer than its limit) gives
an empty line and one message on stderr naming the line; the rest is translated and the
exit status is 1 at the end.

Output: the best translation; with --n-best N the N best, tab-separated; with --with-score
each followed by a tab and its average log-probability per token. Backslash, tab, LF and
CR in a translation are written as \\\\, \\t, \\n and \\r.
"""

from __future__ import annotations

import os
import select

import click

from .cli import CONTEXT, EXIT_HELP, USAGE, Failure, Output, _guarded, _open, _stdin
from .seq2seq import MAX_PENALTY

CHUNK_BATCHES = 4         # lines waiting together are sorted by length over this many batches


class Lines:
    """stdin's lines as they arrive: `take(n)` waits for one line (or the end), then returns
    it with up to n - 1 more that are already there, without waiting for them."""

    def __init__(self, fd: int):
        self.fd, self.eof, self.number = fd, False, 0
        self.buffer, self.at = b"", 0          # unread bytes start at self.at

    def _fill(self, wait: bool) -> bool:
        if self.eof or not wait and not select.select([self.fd], [], [], 0)[0]:
            return False
        try:
            data = os.read(self.fd, 1 << 16)
        except OSError as e:
            raise Failure(f"cannot read stdin: {e.strerror or e}") from None
        self.eof = not data
        self.buffer, self.at = self.buffer[self.at:] + data, 0
        return bool(data)

    def _next(self) -> tuple[int, bytes] | None:
        end = self.buffer.find(b"\n", self.at)
        if end < 0:
            return None
        line, self.at = self.buffer[self.at:end], end + 1
        return self._line(line)

    def take(self, n: int) -> list[tuple[int, bytes]]:
        while self.buffer.find(b"\n", self.at) < 0 and self._fill(wait=True):
            pass
        out = []
        while len(out) < n:
            item = self._next()
            if item is None and self._fill(wait=False):
                continue
            if item is None:
                break
            out.append(item)
        if not out and self.eof and self.at < len(self.buffer):     # a last line without a newline
            out.append(self._line(self.buffer[self.at:]))
            self.buffer, self.at = b"", 0
        return out

    def _line(self, raw: bytes) -> tuple[int, bytes]:
        self.number += 1
        return self.number, raw[:-1] if raw.endswith(b"\r") else raw


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _problem(model, number: int, raw: bytes):
    """(text, None), or (None, the one-line message of a line the model cannot take)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"line {number}: not UTF-8 text"
    unknown = model.unknown(text)
    if unknown:
        return None, f"line {number}: characters the model does not know: {' '.join(map(repr, unknown))}"
    if len(text) > model.limits["source"] and len(model.codec.encode(text)) > model.limits["source"]:
        return None, f"line {number}: {len(text)} characters, longer than the model's limit of {model.limits['source']}"
    return text, None


def _format(model, hyps, n_best: int, with_score: bool) -> str:
    fields = []
    for h in hyps[:n_best]:
        fields.append(_escape(model.detokenize(h.tokens)))
        if with_score:
            fields.append(f"{h.score:.4f}")
    return "\t".join(fields)


def _chunk(model, items, options) -> tuple[list[str], int]:
    """Output lines for a chunk of (number, raw) lines, in their order, and how many of them
    could not be translated (each named on stderr)."""
    beam, n_best, with_score, alpha, max_len, batch = options
    out = [""] * len(items)
    texts, failed = {}, 0
    for i, (number, raw) in enumerate(items):
        text, message = _problem(model, number, raw)
        if message:
            click.echo(f"nn2run: {message}", err=True)
            failed += 1
        elif text:
            texts[i] = model.codec.encode(text)
    order = sorted(texts, key=lambda i: len(texts[i]))
    for at in range(0, len(order), batch):
        group = order[at:at + batch]
        try:
            found = model.search([texts[i] for i in group], beam, alpha, max_len)
        except ValueError as e:             # the rows (lines × beam) need more memory than a batch may
            raise Failure(f"--beam {beam} with --batch {batch}: {e}", code=USAGE) from None
        for i, hyps in zip(group, found):
            out[i] = _format(model, hyps, n_best, with_score)
    return out, failed


@click.command(context_settings=CONTEXT, epilog=EXIT_HELP)
@click.argument("model_path", metavar="MODEL.nnb", type=click.Path(dir_okay=True))
@click.option("--beam", type=int, default=1, show_default=True, help="Beam width (1: greedy).")
@click.option("--n-best", type=int, default=1, show_default=True,
              help="Print the N best translations, tab-separated (N ≤ --beam).")
@click.option("--with-score", is_flag=True, help="Follow each translation with a tab and its average log-probability.")
@click.option("--length-penalty", type=float, default=1.0, show_default=True,
              help="Beams are ranked by log-probability / length ** A.")
@click.option("--max-len", type=int, default=None, help="At most N output tokens (never more than the model's limit).")
@click.option("--batch", type=int, default=32, show_default=True, help="Lines translated together.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the SHA-256 of the tensor data before running (the header's is always checked).")
def translate_command(model_path, beam, n_best, with_score, length_penalty, max_len, batch, verify):
    """Translate stdin with a seq2seq model: one line in, one line out, in order.

    printf 'abc\\n' | nn2run translate m.nnb --beam 4"""
    for name, value in (("--beam", beam), ("--n-best", n_best), ("--batch", batch)) + \
            ((("--max-len", max_len),) if max_len is not None else ()):
        if value < 1:
            raise Failure(f"{name} must be ≥ 1", code=USAGE)
    if n_best > beam:
        raise Failure(f"--n-best {n_best} needs --beam {n_best} or more", code=USAGE)
    if not 0 <= length_penalty <= MAX_PENALTY:
        raise Failure(f"--length-penalty must be a number from 0 to {MAX_PENALTY}", code=USAGE)
    model = _open(model_path, verify)
    if not hasattr(model, "translate"):
        raise Failure(f"{model_path} is a language model, not a seq2seq model: use nn2run generate", code=USAGE)
    out = Output()
    options = (beam, n_best, with_score, length_penalty, max_len, batch)
    failed = []

    def body():
        lines = Lines(_stdin().fileno())
        while True:
            items = lines.take(batch * CHUNK_BATCHES)
            if not items:
                break
            done, bad = _chunk(model, items, options)
            failed.append(bad)
            for line in done:
                out.write(line + "\n")
                out.flush()
    _guarded(body)
    if sum(failed):                 # each line was named on stderr as it was met
        click.get_current_context().exit(1)

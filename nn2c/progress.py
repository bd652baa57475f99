"""Training progress on stderr: a rich progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time


def fmt_value(v, spec=".4f") -> str:
    return "—" if v is None else format(v, spec)


class Progress:
    """Shows step, train loss, val loss, chars/s and ETA. Use as a context manager."""

    def __init__(self, total: int, start: int = 0, stream=None, every: int = 50, seconds: float | None = None):
        self.total, self.start, self.every = total, start, every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self.train, self.val, self.rate = None, None, 0.0
        self._bar = None
        self.deadline = self.t0 + seconds if seconds else None     # a time limit shortens the ETA

    def __enter__(self):
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn
            self._bar = Bar(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                            console=Console(file=self.stream), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def info(self) -> str:
        return (f"loss {fmt_value(self.train)}  val {fmt_value(self.val)}  {self.rate:,.0f} chars/s")

    def update(self, step: int, train: float | None = None, val: float | None = None,
               chars: int = 0, force: bool = False) -> None:
        self.train = train if train is not None else self.train
        self.val = val if val is not None else self.val
        elapsed = time.monotonic() - self.t0
        done = step - self.start
        self.rate = chars * done / elapsed if elapsed > 0 else 0.0
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=self.info())
        elif force or step % self.every == 0 or step == self.total:
            eta = (self.total - step) * elapsed / done if done else 0.0
            if self.deadline is not None:
                eta = min(eta, max(0.0, self.deadline - time.monotonic()))
            print(f"step {step}/{self.total}  {self.info()}  eta {eta:,.0f}s", file=self.stream, flush=True)

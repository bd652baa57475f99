"""Training progress on stderr: a rich progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import json
import os
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
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar
            self._bar = Bar(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                            console=Console(file=self.stream), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def info(self) -> str:
        return (f"loss {fmt_value(self.train)}  val {fmt_value(self.val)}  {self.rate:,.0f} chars/s")

    def update(self, step: int, train: float | None = None, val: float | None = None,
               chars: int = 0, force: bool = False) -> None:
        self.train = train if train is not None else self.train
        self.val = val if val is not None else self.val
        elapsed = self.elapsed
        done = step - self.start
        self.rate = chars * done / elapsed if elapsed > 0 else 0.0
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=self.info())
        elif force or step % self.every == 0 or step == self.total:
            eta = (self.total - step) * elapsed / done if done else 0.0
            if self.deadline is not None:
                eta = min(eta, max(0.0, self.deadline - time.monotonic()))
            print(f"step {step}/{self.total}  {self.info()}  eta {eta:,.0f}s", file=self.stream, flush=True)


# One JSON object a line, one line per evaluation; `nn2c plot` draws them.
LOG_FIELDS = ("step", "train_loss", "val_loss", "chars_per_s", "elapsed_s", "lr")


class LogError(Exception):
    """A training log that cannot be read or continued; the message names the file and line."""


def parse_log(text: str, path: str, torn_tail: bool = False) -> list[dict]:
    """The records of a training log. With `torn_tail`, a last line cut short (a run killed
    while writing it) is dropped instead of refused."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    records = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or isinstance(rec["step"], bool):
                raise ValueError("no integer \"step\"")
            for key in ("train_loss", "val_loss"):
                value = rec.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise ValueError(f"\"{key}\" is not a number")
        except ValueError as e:
            if torn_tail and n == len(lines) and not text.endswith("\n"):
                break
            what = "not JSON" if isinstance(e, json.JSONDecodeError) else str(e)
            raise LogError(f"{path}:{n}: not a training-log record ({what})") from None
        records.append(rec)
    return records


def read_log(path: str) -> list[dict]:
    """The records of a training log file, each checked; LogError in one line otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise LogError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LogError(f"{path} is a directory, not a training log") from None
    except UnicodeDecodeError:
        raise LogError(f"{path} is not a training log (not UTF-8 text)") from None
    except OSError as e:
        raise LogError(f"cannot read {path}: {e.strerror or e}") from None
    records = parse_log(text, path)
    if not records:
        raise LogError(f"{path} holds no training-log records (is the run still before its first evaluation?)")
    return records


class TrainLog:
    """`--log FILE`: one JSON line per evaluation, written and flushed as it happens. A new
    run starts the file afresh; a resumed one continues it from the checkpoint's step (lines
    past it, written after the checkpoint by the run that stopped, are dropped, since the
    resumed run writes them again)."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError:
                raise LogError(f"--log {path} is not a training log (not UTF-8 text); give another path") from None
            records = parse_log(text, path, torn_tail=True)
            kept = [r for r in records if r["step"] <= resume_step]
            if len(kept) < len(records) or (text and not text.endswith("\n")):
                from nn2run.atomic import write_atomic
                write_atomic(path, ["".join(json.dumps(r) + "\n" for r in kept).encode("utf-8")])
            self._file = open(path, "a", encoding="utf-8")
        else:
            self._file = open(path, "w", encoding="utf-8")

    def write(self, **record) -> None:
        self._file.write(json.dumps({k: record[k] for k in LOG_FIELDS}, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

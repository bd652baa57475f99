"""Generated seq2seq tasks, deterministic by seed, written as source<TAB>target lines:

    copy      a random string -> itself
    reverse   a random string -> it reversed
    dates     a date in one of several formats -> ISO 8601 (YYYY-MM-DD)
"""

from __future__ import annotations

import datetime as _dt
import random

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIRST, LAST = _dt.date(1900, 1, 1).toordinal(), _dt.date(2099, 12, 31).toordinal()


class TaskError(Exception):
    """A task that cannot be generated as asked."""


def _string(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(lo, hi)))


def _date_text(rng: random.Random, d: _dt.date) -> str:
    month, day = MONTHS[d.month - 1], DAYS[d.weekday()]
    forms = [f"{month} {d.day}, {d.year}", f"{d.day} {month} {d.year}", f"{month[:3]} {d.day} {d.year}",
             f"{d.day} {month[:3]} {d.year}", f"{d.month:02d}/{d.day:02d}/{d.year}",
             f"{d.day}.{d.month}.{d.year}", f"{day}, {month} {d.day}, {d.year}",
             f"{day[:3]} {d.day} {month[:3].upper()} {d.year}", f"{d.year}/{d.month}/{d.day}"]
    return rng.choice(forms)


def generate(task: str, n: int, seed: int = 0, min_len: int = 1, max_len: int = 8) -> list[tuple[str, str]]:
    """`n` pairs of `task`; the strings of copy and reverse have min_len..max_len characters."""
    if n <= 0:
        raise TaskError(f"-n must be > 0, got {n}")
    if not 1 <= min_len <= max_len:
        raise TaskError(f"lengths must satisfy 1 <= --min-len <= --max-len, got {min_len} and {max_len}")
    rng = random.Random(f"{task}/{seed}")
    if task in ("copy", "reverse"):
        pairs = []
        for _ in range(n):
            s = _string(rng, min_len, max_len)
            pairs.append((s, s if task == "copy" else s[::-1]))
        return pairs
    if task == "dates":
        out = []
        for _ in range(n):
            d = _dt.date.fromordinal(rng.randint(FIRST, LAST))
            out.append((_date_text(rng, d), d.isoformat()))
        return out
    raise TaskError(f"unknown task {task!r}: use copy, reverse or dates")


def tsv(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"{s}\t{t}\n" for s, t in pairs)

"""Building a native loop: the C compiled once with the system compiler (`$CC`, default
`cc`) into a shared library, cached under `$NN2_CACHE` (default `~/.cache/nn2`) keyed by
the source, the compiler, the flags and the CPU, and loaded with ctypes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from nn2c.backend.native.plan import NativeUnavailable

CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")


def cache_dir() -> Path:
    root = os.environ.get("NN2_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "nn2"


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def build(source: str) -> ctypes.CDLL:
    """Compile `source` into a shared library (cached) and load it. The cache is
    `cache_dir()`, or a folder in the system's temporary directory when that is not writable."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([source, cc, " ".join(CFLAGS), _cpu_key()]).encode()).hexdigest()[:24]
    name = f"loop-{key}.so"
    for where in (cache_dir(), Path(tempfile.gettempdir()) / "nn2-cache"):
        target = where / name
        if not target.exists():
            try:
                where.mkdir(parents=True, exist_ok=True)
                _compile(cc, source, target)
            except OSError:
                continue            # not writable: try the next place
        try:
            return ctypes.CDLL(str(target))
        except OSError as e:
            raise NativeUnavailable(f"cannot load {target}: {e}") from None
    raise NativeUnavailable(f"no writable folder for the native loop ({cache_dir()})")


def _compile(cc: str, source: str, target: Path) -> None:
    """cc the source into `target`, atomically (a temporary file in the same folder, renamed)."""
    if not shutil.which(cc):
        raise NativeUnavailable(f"no C compiler ({cc}) on PATH")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".nn2-build-") as d:
        src, out = Path(d) / "loop.c", Path(d) / "loop.so"
        src.write_text(source)
        try:
            proc = subprocess.run([cc, *CFLAGS, "-o", str(out), str(src), "-lm"],
                                  capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise NativeUnavailable(f"{cc} took over 120 s") from None
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise NativeUnavailable(f"{cc} failed: {last[0]}")
        os.replace(out, target)

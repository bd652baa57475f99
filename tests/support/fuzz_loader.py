#!/usr/bin/env python3
"""Fuzz the .nnb loader: mutate a valid file many ways; only NNBFormatError may escape.

    python tests/fuzz_loader.py --inputs 100000 [--seed S] [--model FILE]

Starts from a real model (--model) or a small synthetic one built with dumps,
and feeds the loader mutated copies: bit flips, "interesting" bytes, cuts,
insertions, deletions, overwrites, duplicated slices, rewritten prefix fields
and JSON tokens (re-sealed, so they get past the checksum), and the handcrafted
cases of tests/hostile.py, alone or stacked. The loader (--loader auto) is
nn2run.model.loads_model when that exists and accepts the start file, else
nn2run.format.loads (verify_data on for even-length inputs). An input
that raises anything but NNBFormatError, raises one with an empty or multi-line
message, takes over --slow seconds, or runs out of memory (the address space is
capped at --mem-mb above the start) is a crash: its bytes are saved under
--crash-dir and the script exits 1. Not a pytest test (no test_ prefix).
"""
import argparse
import hashlib
import importlib
import importlib.util
import os
import random
import re
import resource
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]  # the repo, tests/

import numpy as np  # noqa: E402

from nn2run import format as nnb  # noqa: E402
from support import hostile  # noqa: E402

INTERESTING_BYTES = [0x00, 0x01, 0x20, 0x22, 0x2C, 0x3A, 0x5B, 0x7B, 0x7F, 0x80, 0xFF]
INTERESTING_INTS = [0, 1, 63, 64, 65, 127, 128, 2**15, 2**16 - 1, 2**31 - 1, 2**31,
                    2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
JSON_TOKENS = ["-1", "0", "1", "63", "64", "2.0", "1e999", "-0", "NaN", "Infinity", "true",
               "false", "null", '""', '"x"', '"f32"', '"u8"', "[]", "{}", "[0]", "[-1]",
               "18446744073709551616", "1" * 120, '"\\ud800"', '"\\u0000"', "[[[[[[[[",
               '"tensors"', '"w"', '"i8"', '"Q#scale"', '"w#scale"', "[3]", "[2,3]"]
TOKEN = re.compile(r'-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|"(?:[^"\\]|\\.)*"|true|false|null|[\[\]{}:,]')
REASONS = None  # reason -> count, with --reasons
FIELDS = [(8, 2), (10, 2), (12, 4), (16, 8), (24, 8), (32, 1)]  # (offset, size) in the prefix


def synthetic_model() -> bytes:
    tensors = {"embed": np.linspace(-1, 1, 24, dtype=np.float32).reshape(6, 4),
               "W": np.arange(20, dtype=np.float32).reshape(4, 5) / 3,
               "b": np.zeros(5, np.float16), "ids": np.array([1, -2, 3], np.int32),
               "none": np.zeros((0, 4), np.float32), "steps": np.array([7], np.int64),
               "vocab": np.frombuffer(b"abcdef", np.uint8),
               "Q": np.array([[-127, 3, 0], [64, -128, 127]], np.int8),
               "Q#scale": np.array([0.125, 2.0, 0.0], np.float32)}
    header = {"program": [["matmul", "embed", "W", "h"], ["tanh", "h", "h"]],
              "codec": {"name": "char", "alphabet": "abcdef"},
              "provenance": {"nn2c": "0.1.0", "steps": 300, "loss": [2.5, 1.75]}}
    return nnb.dumps(header, tensors)


# ----------------------------------------------------------------- mutators
def flip_bits(rng, b):
    out = bytearray(b)
    for _ in range(rng.randint(1, 8)):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def interesting_byte(rng, b):
    out = bytearray(b)
    if out:
        out[rng.randrange(len(out))] = rng.choice(INTERESTING_BYTES)
    return bytes(out)


def cut(rng, b):
    return b[:rng.randint(0, len(b))]


def insert(rng, b):
    at = rng.randint(0, len(b))
    return b[:at] + rng.randbytes(rng.randint(1, 64)) + b[at:]


def delete(rng, b):
    at = rng.randint(0, len(b))
    return b[:at] + b[at + rng.randint(1, 64):]


def overwrite(rng, b):
    at, chunk = rng.randint(0, len(b)), rng.randbytes(rng.randint(1, 32))
    return b[:at] + chunk + b[at + len(chunk):]


def duplicate(rng, b):
    start = rng.randint(0, len(b))
    chunk = b[start:start + rng.randint(1, 128)]
    at = rng.randint(0, len(b))
    return b[:at] + chunk + b[at:]


def _split(b):
    """(header bytes, data bytes) of a file with a plausible prefix, else None."""
    if len(b) < nnb.PREFIX_SIZE:
        return None
    end = min(hostile.header_end(b), len(b))
    return b[nnb.PREFIX_SIZE:end], b[end:]


def prefix_field(rng, b):
    """Set one prefix field to an interesting value, then fix the header digest."""
    parts = _split(b)
    if parts is None:
        return flip_bits(rng, b)
    offset, size = rng.choice(FIELDS)
    value = rng.choice(INTERESTING_INTS) % (1 << 8 * size)
    if rng.random() < 0.3:  # near the real value
        value = (int.from_bytes(b[offset:offset + size], "little") + rng.randint(-70, 70))
        value %= 1 << 8 * size
    fixed = bytearray(b[:64])
    fixed[offset:offset + size] = value.to_bytes(size, "little")
    return _digest(bytes(fixed), parts[0], b[96:128]) + parts[0] + parts[1]


def _digest(fixed, header, data_digest):
    return fixed + hashlib.sha256(fixed + header).digest() + data_digest


def json_token(rng, b):
    """Replace, delete or duplicate one JSON token of the header, re-sealed."""
    parts = _split(b)
    if parts is None:
        return cut(rng, b)
    text = parts[0].decode("utf-8", "replace")
    tokens = list(TOKEN.finditer(text))
    if not tokens:
        return b
    tok = rng.choice(tokens)
    how = rng.random()
    new = "" if how < 0.15 else tok.group() * 2 if how < 0.3 else rng.choice(JSON_TOKENS)
    text = text[:tok.start()] + new + text[tok.end():]
    return _reseal(rng, text.encode("utf-8", "surrogatepass"), parts[1], b)


def header_bytes(rng, b):
    """Byte-level damage inside the header, re-sealed."""
    parts = _split(b)
    if parts is None:
        return b
    return _reseal(rng, rng.choice(BYTE_MUTATORS)(rng, parts[0]), parts[1], b)


def data_bytes(rng, b):
    """Damage the data section and fix its digest: loads, or fails on padding/length."""
    parts = _split(b)
    if parts is None or not parts[1]:
        return b
    data = rng.choice([flip_bits, interesting_byte, overwrite])(rng, parts[1])
    return _reseal(rng, parts[0], data, b)


def _reseal(rng, header, data, old):
    out = hostile.seal(header.rstrip(b" "), data)
    if rng.random() < 0.1 and len(old) >= 64:  # keep the old prefix fields sometimes
        fixed = old[:16] + out[16:64]
        out = _digest(fixed, out[128:hostile.header_end(out)], out[96:128]) + out[128:]
    return out


BYTE_MUTATORS = [flip_bits, interesting_byte, cut, insert, delete, overwrite, duplicate]
MUTATORS = BYTE_MUTATORS + [prefix_field, prefix_field, json_token, json_token, json_token,
                            json_token, header_bytes, header_bytes, data_bytes]


def make_input(rng, seed_file, hostile_files):
    """1-3 mutations of the start file, or 0-3 of a handcrafted hostile one."""
    if rng.random() < 0.1:
        b, rounds = rng.choice(hostile_files), rng.choice([0, 1, 1, 2, 3])
    else:
        b, rounds = seed_file, rng.randint(1, 3)
    for _ in range(rounds):
        b = rng.choice(MUTATORS)(rng, b)
    return b


# ----------------------------------------------------------------- running
def pick_loader(choice, seed_file):
    """auto: nn2run.model.loads_model if it exists and accepts the start file."""
    fmt_loader = ("nn2run.format.loads",
                  lambda b: nnb.loads(b, verify_data=len(b) % 2 == 0))  # both paths, reproducibly
    if choice == "format" or importlib.util.find_spec("nn2run.model") is None:
        return fmt_loader
    model = importlib.import_module("nn2run.model")
    if not hasattr(model, "loads_model"):
        return fmt_loader
    if choice == "auto" and run_one(model.loads_model, seed_file, 60) != "loaded":
        print("fuzz: the start file is not a model; fuzzing the container only",
              file=sys.stderr)
        return fmt_loader
    return "nn2run.model.loads_model", model.loads_model


def cap_memory(extra_mb):
    if extra_mb <= 0:
        return
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = used + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def run_one(loader, data, slow):
    """'loaded', 'rejected' or a crash description."""
    start = time.perf_counter()
    try:
        result = loader(data)
    except nnb.NNBFormatError as exc:
        message = str(exc)
        outcome = "rejected" if message and "\n" not in message else f"bad message {message!r}"
        if REASONS is not None and outcome == "rejected":
            reason = re.sub(r"'[^']*'|0x[0-9a-f]+|\d+", "_", message)[:60]
            REASONS[reason] = REASONS.get(reason, 0) + 1
    except BaseException as exc:  # noqa: BLE001 - anything else is what we look for
        if isinstance(exc, KeyboardInterrupt):
            raise
        outcome = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        outcome += "\n" + "".join(traceback.format_tb(exc.__traceback__)[-3:])
    else:
        outcome = "loaded"
        if hasattr(result, "close"):
            result.close()
    if time.perf_counter() - start > slow:
        outcome = f"slow: {time.perf_counter() - start:.2f} s ({outcome.splitlines()[0]})"
    return outcome


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--model", help="a valid .nnb to start from (default: synthetic)")
    parser.add_argument("--loader", choices=["auto", "format", "model"], default="auto")
    parser.add_argument("--crash-dir", default=None)
    parser.add_argument("--slow", type=float, default=1.0, help="seconds that count as a hang")
    parser.add_argument("--mem-mb", type=int, default=2048,
                        help="address space allowed above the start (0: no cap)")
    parser.add_argument("--reasons", action="store_true", help="print a histogram of refusals")
    args = parser.parse_args(argv)
    global REASONS
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    seed_file = open(args.model, "rb").read() if args.model else synthetic_model()
    name, loader = pick_loader(args.loader, seed_file)
    if run_one(loader, seed_file, 60) != "loaded":
        print(f"fuzz: the starting file does not load with {name}", file=sys.stderr)
        return 2
    hostile_files = [built[0] for case in hostile.CASES.values()
                     if (built := case(seed_file)) is not None]
    crash_dir = args.crash_dir or os.path.join(tempfile.gettempdir(), f"nn2-fuzz-{seed}")
    print(f"fuzz: loader {name}, seed {seed}, start file {len(seed_file)} bytes", file=sys.stderr)
    cap_memory(args.mem_mb)
    REASONS = {} if args.reasons else None
    counts, crashes, start = {"loaded": 0, "rejected": 0}, [], time.perf_counter()
    for _ in range(args.inputs):
        data = make_input(rng, seed_file, hostile_files)
        outcome = run_one(loader, data, args.slow)
        if outcome in counts:
            counts[outcome] += 1
            continue
        os.makedirs(crash_dir, exist_ok=True)
        path = os.path.join(crash_dir, f"crash-{len(crashes):04d}.nnb")
        with open(path, "wb") as f:
            f.write(data)
        crashes.append((path, outcome))
    elapsed = time.perf_counter() - start
    for reason, count in sorted((REASONS or {}).items(), key=lambda kv: -kv[1]):
        print(f"{count:8d}  {reason}", file=sys.stderr)
    for path, outcome in crashes[:5]:
        print(f"crash: {path}\n  " + outcome.replace("\n", "\n  "), file=sys.stderr)
    print(f"fuzz: {args.inputs} inputs, {counts['loaded']} loaded, {counts['rejected']} "
          f"rejected, {len(crashes)} crashes in {elapsed:.1f} s")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())

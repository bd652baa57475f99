"""Build an AWS Lambda deployment zip that runs a model with nn2run.

    python tools/lambda_bundle.py MODEL.nnb --arch x86_64|arm64 [--python 3.11|3.12] [-o OUT.zip]

The zip holds, at its root: the nn2run package of this checkout, click, NumPy's wheels
for the target (manylinux2014, which both Python runtimes' Amazon Linux accept) and the
model. Lambda unpacks it into /var/task, which is on the path, so the handler is
`nn2run.aws.handler` and NN2_MODEL names the model there. Prints the zipped and unzipped
sizes against Lambda's limits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))       # bundle this checkout's runtime, whatever is installed

import nn2run  # noqa: E402  (after the path is set)

# The runtime's dependencies, as pyproject.toml's [project] dependencies (a test keeps them equal).
RUNTIME_REQUIREMENTS = ("click>=8.1", "numpy>=1.24")
PLATFORMS = {"x86_64": "manylinux2014_x86_64", "arm64": "manylinux2014_aarch64"}
PYTHONS = ("3.11", "3.12")
TASK_ROOT = "/var/task"               # where Lambda unpacks a zip deployment
HANDLER = "nn2run.aws.handler"
MiB = 1 << 20
ZIPPED_LIMIT = 50 * MiB               # a direct upload (larger zips go through S3)
UNZIPPED_LIMIT = 250 * MiB            # everything unpacked, layers included
FIXED_TIME = (1980, 1, 1, 0, 0, 0)    # the same inputs give the same zip


class BundleError(Exception):
    """One line for the user, then exit status `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def check_model(path: Path) -> None:
    if not path.is_file():
        raise BundleError(f"cannot read model {path}: no such file", 2)
    try:
        with nn2run.load(path, verify=True):
            pass
    except (nn2run.NNBFormatError, OSError) as e:
        raise BundleError(f"cannot load {path}: {e}", 2) from None


def install_dependencies(target: Path, arch: str, python: str) -> None:
    """NumPy and click as wheels built for the target platform, unpacked into `target`."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--target", str(target), "--platform", PLATFORMS[arch], "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "--no-compile", *RUNTIME_REQUIREMENTS]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR")] or r.stderr.splitlines()
        last = errors[-1] if errors else f"exit status {r.returncode}"
        raise BundleError(f"pip could not fetch {', '.join(RUNTIME_REQUIREMENTS)} for {arch}: {last}")
    shutil.rmtree(target / "bin", ignore_errors=True)      # console scripts (f2py …) have no use there
    for cache in list(target.rglob("__pycache__")):         # bytecode for one interpreter version only
        shutil.rmtree(cache)


def copy_runtime(target: Path) -> None:
    source = Path(nn2run.__file__).resolve().parent
    shutil.copytree(source, target / "nn2run", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def write_zip(tree: Path, out: Path) -> int:
    """Zip `tree` into `out` (atomically: a temp file, then a rename); returns the
    unzipped size in bytes. Entries are sorted, dated 1980 and world-readable: Lambda
    runs the code as a user other than the zip's owner."""
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    tmp = out.with_name(f".{out.name}.tmp")
    total = 0
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for p in files:
            info = zipfile.ZipInfo(p.relative_to(tree).as_posix(), FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            mode = 0o755 if os.access(p, os.X_OK) or p.suffix == ".so" else 0o644
            info.external_attr = (0o100000 | mode) << 16
            data = p.read_bytes()
            total += len(data)
            z.writestr(info, data, compresslevel=9)
    os.replace(tmp, out)
    return total


def _versions(tree: Path) -> str:
    dists = sorted(d.name[: -len(".dist-info")] for d in tree.glob("*.dist-info"))
    return ", ".join(d.replace("-", " ", 1) for d in dists)


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB / 10 else f"{n / 1024:.1f} KiB"


def _against(size: int, limit: int, what: str) -> str:
    over = "" if size <= limit else "  OVER"
    return f"{size / MiB:5.1f} MiB of the {limit // MiB} MiB limit{what}{over}"


def build(model: Path, arch: str, python: str, out: Path) -> tuple[int, int]:
    """Write the bundle; returns (zipped, unzipped) bytes."""
    check_model(model)
    if not out.parent.is_dir():
        raise BundleError(f"cannot write {out}: directory {out.parent} does not exist", 2)
    with tempfile.TemporaryDirectory(prefix="nn2-lambda-") as tmp:
        tree = Path(tmp) / "bundle"
        install_dependencies(tree, arch, python)
        copy_runtime(tree)
        shutil.copyfile(model, tree / model.name)
        unzipped = write_zip(tree, out)
        versions = _versions(tree)
    zipped = out.stat().st_size
    print(f"wrote {out}: AWS Lambda bundle for Python {python} on {arch}")
    print(f"  zipped   {_against(zipped, ZIPPED_LIMIT, ' for a direct upload')}")
    print(f"  unzipped {_against(unzipped, UNZIPPED_LIMIT, '')}")
    print(f"  handler   {HANDLER}")
    print(f"  env       NN2_MODEL={TASK_ROOT}/{model.name}")
    print(f"  contents  nn2run {nn2run.__version__}, {versions}, {model.name} ({_size(model.stat().st_size)})")
    if unzipped > UNZIPPED_LIMIT:
        raise BundleError(f"{out} unpacks to {unzipped / MiB:.1f} MiB, over Lambda's {UNZIPPED_LIMIT // MiB} MiB: "
                          "use a container image for a model this large")
    if zipped > ZIPPED_LIMIT:
        print(f"  {out.name} is over {ZIPPED_LIMIT // MiB} MiB: upload it to S3 and point the function at it")
    return zipped, unzipped


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (--help for usage)\n")


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="lambda_bundle", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="the .nnb to serve")
    ap.add_argument("--arch", choices=sorted(PLATFORMS), default="x86_64", help="the function's architecture")
    ap.add_argument("--python", choices=PYTHONS, default="3.11", help="the function's Python runtime")
    ap.add_argument("-o", "--output", type=Path, help="the zip to write (default lambda-ARCH.zip)")
    args = ap.parse_args(argv)
    out = args.output or Path(f"lambda-{args.arch}.zip")
    try:
        build(args.model, args.arch, args.python, out)
    except BundleError as e:
        print(f"lambda_bundle: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

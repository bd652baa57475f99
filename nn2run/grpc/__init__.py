"""gRPC for nn2run, the `grpc` extra (`pip install "nn2[grpc]"`): the Generator service beside
HTTP on the same scheduler (`nn2run.grpc.server`), and codecs served over gRPC
(`nn2run.grpc.codec`, `nn2run.grpc.client`). The interface is `nn2run/proto/nn2.proto`.

This package imports the standard library only; grpcio is imported by the modules that
talk gRPC, when they are used. `missing()` says what of the extra is not installed.
"""

from __future__ import annotations

import importlib.util
import os

# grpcio's C core logs its own lines on stderr (a failed bind, a lost connection) after the
# one-line messages nn2run gives; set before any module of this package imports grpc
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

INSTALL = 'pip install "nn2[grpc]"'
NEEDS = (("grpc", "grpcio"), ("google.protobuf", "protobuf"), ("grpc_health", "grpcio-health-checking"))


def missing() -> list[str]:
    """The distributions of the grpc extra that cannot be imported here."""
    out = []
    for module, dist in NEEDS:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(dist)
    return out


def needs_extra(what: str) -> str | None:
    """The one line to show when `what` cannot run for want of the extra, else None."""
    lack = missing()
    if not lack:
        return None
    return f"{what} needs {', '.join(lack)}, not installed here; install with: {INSTALL}"

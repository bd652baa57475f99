"""The generated code in nn2run/proto is what `make proto` makes from nn2.proto today."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest

from support.models import ROOT

pytest.importorskip("grpc_tools")
pytest.importorskip("google.protobuf")


def test_the_committed_messages_match_the_proto(tmp_path):
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc
    out = tmp_path / "nn2.desc"
    assert protoc.main(["protoc", f"-I{ROOT}", f"--descriptor_set_out={out}",
                        str(ROOT / "nn2run" / "proto" / "nn2.proto")]) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _without_json_names(fresh.message_type)          # a descriptor set has them, generated code not
    # the committed module registers nn2.v1 in the process's descriptor pool: read it in another
    r = subprocess.run([sys.executable, "-c", "import base64; from nn2run.proto import nn2_pb2; "
                        "print(base64.b64encode(nn2_pb2.DESCRIPTOR.serialized_pb).decode())"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    committed = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(r.stdout))
    assert committed == fresh, "nn2run/proto is out of date with nn2.proto: run `make proto`"


def test_the_committed_services_are_those_of_the_proto():
    text = (ROOT / "nn2run" / "proto" / "nn2_pb2_grpc.py").read_text()
    for rpc in ("Generate", "Tokenize", "Detokenize", "Translate", "Info", "Encode", "DecodeStep"):
        assert f"def {rpc}(self, request, context)" in text


def _without_json_names(messages) -> None:
    for m in messages:
        for f in m.field:
            f.ClearField("json_name")
        _without_json_names(m.nested_type)

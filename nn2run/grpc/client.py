"""The runtime's client of a codec service (service Codec in nn2run/proto/nn2.proto).

Every failure is a CodecError with one line: the service's own message for text it cannot
encode (INVALID_ARGUMENT), else what went wrong and where.
"""

from __future__ import annotations

import itertools
import random

import grpc

from ..codec import CodecError
from ..proto import nn2_pb2, nn2_pb2_grpc

MAX_MESSAGE = 64 << 20      # a corpus piece's ids, a long prompt's
CALL_TIMEOUT = 60.0
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


class CodecClient:
    def __init__(self, address: str):
        self.address = address
        self._channel = grpc.insecure_channel(address, options=OPTIONS)
        self._stub = nn2_pb2_grpc.CodecStub(self._channel)
        # stream ids are unique among the service's clients: counted from a random start
        self._streams = itertools.count(random.SystemRandom().getrandbits(62))

    def new_stream(self) -> int:
        return next(self._streams)

    def _call(self, method, request, what: str):
        try:
            return method(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise CodecError(details) from None
            if code == grpc.StatusCode.UNAVAILABLE:
                raise CodecError(f"the codec service at {self.address} is not reachable ({details})") from None
            raise CodecError(f"the codec service at {self.address} failed to {what}: "
                             f"{code.name}{': ' + details if details else ''}") from None

    def info(self):
        return self._call(self._stub.Info, nn2_pb2.InfoRequest(), "describe itself")

    def encode(self, text: str, vocab_size: int) -> list[int]:
        ids = list(self._call(self._stub.Encode, nn2_pb2.EncodeRequest(text=text), "encode").ids)
        bad = next((i for i in ids if i >= vocab_size), None)
        if bad is not None:
            raise CodecError(f"the codec service at {self.address} gave token id {bad}, outside the model's "
                             f"vocabulary [0, {vocab_size})")
        return ids

    def step_decoder(self) -> StepDecoder:
        return StepDecoder(self)


class StepDecoder:
    """Decodes one step of many streams in one DecodeStep call. The caller names streams by
    its own keys; each started stream gets a stream id no other stream of the client has.
    `start` and `end` go with the next call."""

    def __init__(self, client: CodecClient):
        self._client = client
        self._ids: dict = {}
        self._started: list = []
        self._ended: list = []

    def start(self, key, prompt) -> None:
        sid = self._ids[key] = self._client.new_stream()
        self._started.append(nn2_pb2.StreamStart(stream_id=sid, prompt=[int(i) for i in prompt]))

    def end(self, key) -> None:
        sid = self._ids.pop(key, None)
        if sid is not None:
            self._ended.append(sid)

    def flush(self) -> None:
        """Send the ends not yet sent (a caller that makes no more steps)."""
        if self._ended or self._started:
            self([])

    def __call__(self, pairs) -> list[str]:
        rows = [nn2_pb2.DecodeRow(stream_id=self._ids[k], id=int(t)) for k, t in pairs]
        request = nn2_pb2.DecodeStepRequest(started=self._started, rows=rows, ended=self._ended)
        self._started, self._ended = [], []
        reply = self._client._call(self._client._stub.DecodeStep, request, "decode")
        if [r.stream_id for r in reply.rows] != [r.stream_id for r in rows]:
            raise CodecError(f"the codec service at {self._client.address} answered DecodeStep with "
                             f"{len(reply.rows)} rows for {len(rows)}, or out of order")
        return [r.text for r in reply.rows]

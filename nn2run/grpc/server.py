"""`nn2run serve --grpc-port P`: the Generator service of nn2run/proto/nn2.proto (for a
seq2seq model its Translator instead) and the standard grpc.health.v1.Health, beside HTTP,
submitting to the same scheduler (or translation worker), so gRPC and HTTP requests share
the batched VM.

The server is grpcio's asyncio server on a thread of its own: a stream waiting for tokens
is a coroutine, not a thread, and it sends what came every STREAM_INTERVAL (the first
token and the end at once), as the HTTP streamer does. Requests are checked by the same rules as
/v1/completions (`nn2run.completions.parse_completion`) and /v1/translations
(`nn2run.translations.parse_translation`), so both transports refuse the same things with
the same words.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..codec import CodecError
from ..completions import ApiError, parse_completion
from ..proto import nn2_pb2, nn2_pb2_grpc
from ..scheduler import QueueFull, Request
from ..translations import Job, failure_error, hypotheses, parse_translation

STREAM_INTERVAL = 0.02      # seconds between replies of one stream (what came meanwhile goes in one)
WAIT_TICK = 0.05            # longest sleep of a stream waiting for its first token
FINISH = {"stop": nn2_pb2.FINISH_REASON_STOP, "length": nn2_pb2.FINISH_REASON_LENGTH}
SERVICE = "nn2.v1.Generator"
TRANSLATOR = "nn2.v1.Translator"


class _Abort(Exception):
    def __init__(self, code, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _f32(value: float) -> float:
    # a float field holds the float32 nearest to what the client wrote (0.7 -> 0.69999999):
    # its shortest decimal is that number again, so gRPC samples exactly as HTTP's 0.7 does
    return float(str(np.float32(value)))


def completion_body(request) -> bytes:
    """A GenerateRequest as the JSON body /v1/completions would get, present fields only."""
    obj = {"prompt": request.prompt}
    for name in ("max_tokens", "seed", "top_k"):
        if request.HasField(name):
            obj[name] = getattr(request, name)
    for name in ("temperature", "top_p"):
        if request.HasField(name):
            obj[name] = _f32(getattr(request, name))
    if request.stop:
        obj["stop"] = list(request.stop)
    return json.dumps(obj).encode()


def _status_for(event: tuple, req: Request) -> _Abort:
    if event[0] == "timeout":
        return _Abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                      f"the request ran past its deadline ({req.deadline - req.arrival:.3g} s after it came)")
    if event[0] == "shutdown":
        return _Abort(grpc.StatusCode.UNAVAILABLE, "the server stopped before the request finished")
    return _Abort(grpc.StatusCode.INTERNAL, "internal error")


class Generator(nn2_pb2_grpc.GeneratorServicer):
    def __init__(self, app):
        self.app = app
        self.model = app.model

    async def _encode(self, text: str) -> list[int]:
        codec = self.model.codec
        try:
            if getattr(codec, "remote", False):       # a call to the codec service: off the event loop
                return await asyncio.get_running_loop().run_in_executor(None, codec.encode, text)
            return codec.encode(text)
        except CodecError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None

    async def _request(self, request, context) -> tuple[Request, int]:
        from ..generate import start_token
        try:
            c = parse_completion(completion_body(request), self.app.settings, self.app.name)
        except ApiError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, e.message) from None
        if self.app.draining:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        prime = await self._encode(request.prompt) if request.prompt else [start_token(self.model)]
        now = time.monotonic()
        until = now + self.app.settings.request_timeout
        left = context.time_remaining()
        if left is not None:
            until = min(until, now + left)
        temperature = c.temperature if c.temperature is not None else self.model.sampling["temperature"]
        req = Request([prime], c.max_tokens, temperature, c.top_k, c.top_p, c.seed, c.stop, until,
                      [self.model.codec.text_decoder()])
        return req, len(prime) if request.prompt else 0

    async def Generate(self, request, context):
        try:
            req, prompt_tokens = await self._request(request, context)
        except _Abort as e:
            await context.abort(e.code, e.message)
        if req.max_tokens == 0:
            yield nn2_pb2.GenerateReply(finish_reason=nn2_pb2.FINISH_REASON_LENGTH, prompt_tokens=prompt_tokens)
            return
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        req.wake = lambda: loop.call_soon_threadsafe(woken.set)     # the first token, and the end
        try:
            self.app.scheduler.submit(req)
        except QueueFull:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full; retry later")
        try:
            async for reply in self._replies(req, woken, prompt_tokens):
                yield reply
        except _Abort as e:
            await context.abort(e.code, e.message)
        finally:
            req.cancelled = True        # a client that cancelled or left: its row leaves at the next step

    async def _replies(self, req: Request, woken: asyncio.Event, prompt_tokens: int):
        while True:
            events = _drain(req)
            if not events:
                try:
                    await asyncio.wait_for(woken.wait(), WAIT_TICK)
                except asyncio.TimeoutError:
                    pass
                woken.clear()
                continue
            text, finish = [], None
            for ev in events:
                if isinstance(ev[0], str):
                    raise _status_for(ev, req)
                text.append(ev[1])
                finish = ev[2] or finish
            if finish:
                yield nn2_pb2.GenerateReply(text="".join(text), finish_reason=FINISH[finish],
                                            prompt_tokens=prompt_tokens, completion_tokens=req.generated)
                return
            yield nn2_pb2.GenerateReply(text="".join(text))
            try:                    # what comes in the next interval goes in one reply, the end at once
                await asyncio.wait_for(woken.wait(), STREAM_INTERVAL)
            except asyncio.TimeoutError:
                pass
            woken.clear()

    async def Tokenize(self, request, context):
        try:
            return nn2_pb2.TokenizeReply(ids=await self._encode(request.text))
        except _Abort as e:
            await context.abort(e.code, e.message)

    async def Detokenize(self, request, context):
        codec = self.model.codec
        try:
            ids = self.model.check_ids(list(request.ids)).tolist()
            if hasattr(codec, "decode"):
                text = await asyncio.get_running_loop().run_in_executor(None, codec.decode, ids)
            else:
                decode = codec.text_decoder()
                text = "".join(decode(t) for t in ids)
        except (ValueError, CodecError) as e:       # CodecError is a ValueError too
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return nn2_pb2.DetokenizeReply(text=text)


def translation_body(request) -> bytes:
    """A TranslateRequest as the JSON body /v1/translations would get, present fields only."""
    obj = {"texts": list(request.texts)}
    for name in ("beam", "n_best", "max_len"):
        if request.HasField(name):
            obj[name] = getattr(request, name)
    if request.HasField("length_penalty"):
        obj["length_penalty"] = _f32(request.length_penalty)
    return json.dumps(obj).encode()


GRPC_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.INVALID_ARGUMENT,
               500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE,
               504: grpc.StatusCode.DEADLINE_EXCEEDED}


class Translator(nn2_pb2_grpc.TranslatorServicer):
    """Translate: the request checked as /v1/translations checks it, then a job for the
    app's translation worker, awaited without a thread."""

    def __init__(self, app):
        self.app = app

    async def Translate(self, request, context):
        try:
            _, sources, options = parse_translation(translation_body(request), self.app.model, self.app.name)
        except ApiError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        if self.app.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        now = time.monotonic()
        until = now + self.app.settings.request_timeout
        left = context.time_remaining()
        job = Job(sources, options, until if left is None else min(until, now + left))
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        job.on_done = lambda: loop.call_soon_threadsafe(done.set)
        try:
            self.app.scheduler.submit(job)
        except QueueFull:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full; retry later")
        try:
            await asyncio.wait_for(done.wait(), max(job.deadline - time.monotonic(), 0) + WAIT_TICK)
        except asyncio.TimeoutError:
            job.finish("timeout")
        finally:
            job.cancelled = True        # a client that cancelled or left: the worker skips what is left
        if job.failure is not None:
            e = failure_error(job)
            await context.abort(GRPC_STATUS.get(e.status, grpc.StatusCode.INTERNAL), e.message)
        return self._reply(job)

    def _reply(self, job: Job):
        found = hypotheses(self.app.model, job, job.options.n_best or 1)
        return nn2_pb2.TranslateReply(translations=[
            nn2_pb2.Translation(hypotheses=[nn2_pb2.Hypothesis(text=t, score=s) for t, s in pairs])
            for pairs in found])


def _drain(req: Request) -> list:
    out = []
    try:
        while True:
            out.append(req.events.get_nowait())
    except queue.Empty:
        return out


class _ParsedHere(grpc.aio.ServerInterceptor):
    """nn2's own methods get their requests as bytes and parse them here, so one that does not
    parse (a string field holding bad UTF-8) is INVALID_ARGUMENT saying why, not grpcio's
    UNKNOWN "Unexpected DecodeError"."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith("/nn2."):
            return handler
        parse = handler.request_deserializer

        async def parsed(raw, context):
            try:
                return parse(raw)
            except DecodeError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse: {e}")
        if handler.response_streaming:
            streams = handler.unary_stream

            async def stream(raw, context):
                async for reply in streams(await parsed(raw, context), context):
                    yield reply
            return grpc.unary_stream_rpc_method_handler(stream, response_serializer=handler.response_serializer)
        answers = handler.unary_unary

        async def unary(raw, context):
            return await answers(await parsed(raw, context), context)
        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=handler.response_serializer)


class GrpcServer:
    """The gRPC server on its own thread and event loop: `start()` binds (raising OSError
    when the port cannot be had), `set_draining()` turns health to NOT_SERVING, `stop()`."""

    def __init__(self, app, host: str, port: int, max_rpcs: int):
        self.app, self.host, self.port, self.max_rpcs = app, host, port, max_rpcs
        self._loop = None
        self._ready = threading.Event()
        self._error = None
        self._stop = None
        self._thread = threading.Thread(target=self._main, name="nn2-grpc", daemon=True)

    def start(self) -> GrpcServer:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:        # noqa: BLE001 — reported to start(), which raises it
            self._error = self._error or e
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = grpc.aio.server(maximum_concurrent_rpcs=self.max_rpcs, interceptors=[_ParsedHere()])
        if self.app.seq2seq:
            nn2_pb2_grpc.add_TranslatorServicer_to_server(Translator(self.app), server)
        else:
            nn2_pb2_grpc.add_GeneratorServicer_to_server(Generator(self.app), server)
        self.health = health.aio.HealthServicer()
        await self.health.set(TRANSLATOR if self.app.seq2seq else SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            self._error = OSError(f"cannot listen on {address} for gRPC: the port is in use or not allowed")
        if self._error is not None:
            self._ready.set()
            return
        await server.start()
        self._ready.set()
        await self._stop.wait()
        await server.stop(self._grace)

    def set_draining(self) -> None:
        """Health NOT_SERVING; new Generate (Translate) calls are refused (the app's draining flag)."""
        asyncio.run_coroutine_threadsafe(self.health.enter_graceful_shutdown(), self._loop).result(5)

    def stop(self, grace: float = 1.0) -> None:
        """Stop; calls still running get `grace` seconds to finish."""
        self._grace = grace
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(grace + 5)

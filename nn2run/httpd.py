"""The HTTP transport of `nn2run serve`, on the standard library's ThreadingHTTPServer.

One thread per connection reads the request and hands it to `nn2run.routes.App`; one
scheduler thread (`nn2run.scheduler`) runs every live request in each VM step. This
module owns the transport only: body limits decided from Content-Length before the body
is read, chunked server-sent events, noticing a client that went away, and the drain.

Imports the standard library only.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import __version__

BACKLOG = 1024
STREAM_INTERVAL = 0.02      # seconds between writes to each stream (what came meanwhile goes in one)
STREAM_BUFFER = 1 << 20     # bytes a client may leave unread before its stream is dropped


class _Stream:
    __slots__ = ("sock", "events", "chunked", "out", "finished", "ok")

    def __init__(self, sock, events, chunked: bool):
        self.sock, self.events, self.chunked = sock, events, chunked
        self.out = b""
        self.finished = threading.Event()
        self.ok = True


class Streamer:
    """One thread writes every streamed response: each tick, and at once when a request's
    first token is out or a choice ends, it polls every stream's events and sends what
    came with a non-blocking send. Per-connection threads would each wake
    for every few tokens and contend for the interpreter with the scheduler; a client that
    reads slowly keeps its unsent bytes here and cannot stall the others."""

    def __init__(self, interval: float = STREAM_INTERVAL):
        self.interval = interval
        self._streams: list[_Stream] = []
        self._lock = threading.Lock()
        self._kick = threading.Event()
        threading.Thread(target=self._run, name="nn2-streamer", daemon=True).start()

    def add(self, sock, events, chunked: bool = True) -> _Stream:
        """Hand a connection (headers already sent) and its EventStream to the writer;
        not `chunked`: the body is the events as they are, ended by closing."""
        stream = _Stream(sock, events, chunked)
        sock.settimeout(0)      # non-blocking: a socket with a timeout would wait for room to send
        events.req.wake = self._kick.set       # the first token, and each choice's end, go at once
        with self._lock:
            self._streams.append(stream)
        self._kick.set()
        return stream

    def _run(self) -> None:
        while True:
            self._kick.wait(self.interval if self._streams else None)     # idle: sleep until a stream comes
            self._kick.clear()
            with self._lock:
                streams = list(self._streams)
            for st in streams:
                self._serve(st)
                if st.finished.is_set():
                    with self._lock:
                        self._streams.remove(st)

    def _serve(self, st: _Stream) -> None:
        ev = st.events
        if not ev.done:
            piece = ev.poll()
            if piece:
                st.out += b"%x\r\n%s\r\n" % (len(piece), piece) if st.chunked else piece
            if ev.done and st.chunked:
                st.out += b"0\r\n\r\n"
        try:
            if st.out:
                sent = st.sock.send(st.out)
                st.out = st.out[sent:]
            elif not _connected(st.sock):
                raise ConnectionResetError()
            if len(st.out) > STREAM_BUFFER:
                raise ConnectionResetError()
        except BlockingIOError:
            return
        except OSError:
            st.ok = False
            ev.close()
            st.finished.set()
            return
        if ev.done and not st.out:
            ev.close()
            st.finished.set()


def _connected(sock) -> bool:
    """False once the peer has closed its end (readable with nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return True
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = BACKLOG        # the listen backlog: a burst of clients is queued, not reset

    def __init__(self, address, app, log: bool = True):
        if ":" in address[0]:       # an IPv6 address (--host ::1, or :: for every address)
            self.address_family = socket.AF_INET6
        self.app, self.log = app, log
        self.in_flight = 0
        self._lock = threading.Lock()
        self.streamer = Streamer()
        super().__init__(address, Handler)

    def track(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"nn2run/{__version__}"
    disable_nagle_algorithm = True      # each event goes out at once, not after the next one
    timeout = 300                       # an idle keep-alive connection is closed after this

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def _dispatch(self) -> None:
        app = self.server.app
        try:
            body = self._read_body(app.settings.max_body)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if body is None:
            return
        # in flight (what the drain waits for) from here: a body still coming is not a request yet
        self.server.track(1)
        try:
            headers = {k.lower(): v for k, v in self.headers.items()}
            resp = app.handle(self.command, self.path, headers, body, alive=self._alive)
            self._send(resp)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.server.track(-1)

    def handle_expect_100(self):
        # a body that will be refused is refused now, in place of 100 Continue: the client
        # then does not send it (the whole of it, maybe, for a reset to lose the answer)
        if self._body_problem(self.server.app.settings.max_body) is not None:
            return True
        return super().handle_expect_100()

    def _body_problem(self, limit: int) -> tuple | None:
        """(status, message, code) when the body is to be refused unread, else None."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return 411, "send the body with a Content-Length", "length_required"
        given = {v.strip(" \t") for v in self.headers.get_all("Content-Length", [])}
        if len(given) > 1:      # which one a proxy in front used is unknown: the next request would be too
            return 400, "Content-Length is given twice, with different values", "invalid_length"
        raw = self.headers.get("Content-Length", "0").strip(" \t")
        # ASCII digits only: str.isdigit also takes '²', which int() refuses
        if not (raw.isascii() and raw.isdigit()):
            return 400, "Content-Length must be a number of bytes", "invalid_length"
        digits = raw.lstrip("0") or "0"
        # compared by length first: int() refuses strings of more than a few thousand digits
        if len(digits) > len(str(limit)) or int(digits) > limit:
            return 413, f"the body is over {limit} bytes", "body_too_large"
        return None

    def _read_body(self, limit: int) -> bytes | None:
        """The body, or None once an error has been sent (413 decided from Content-Length)."""
        problem = self._body_problem(limit)
        if problem is not None:
            return self._refuse(*problem)
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _refuse(self, status: int, message: str, code: str) -> None:
        from .completions import ApiError
        from .routes import error_response
        self.close_connection = True        # the body (if any) is not read: the connection cannot go on
        resp = error_response(ApiError(status, message, code=code))
        resp.headers["Connection"] = "close"
        if self.server.app.settings.cors:       # as App.handle's answers: a browser may read why
            resp.headers["Access-Control-Allow-Origin"] = self.server.app.settings.cors
        self.server.app.count(status)
        self._send(resp)
        self._linger()

    def _linger(self) -> None:
        # closing with unread bytes makes the kernel send a reset that can destroy the answer
        # before the client reads it; stop writing, then drop what arrives for a moment
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            end = time.monotonic() + 1.0
            while time.monotonic() < end and self.connection.recv(65536):
                pass
        except OSError:
            pass

    def _alive(self) -> bool:
        return _connected(self.connection)

    def _send(self, resp) -> None:
        if resp.status == 499:          # the client left: nothing to say, nobody to say it to
            self.close_connection = True
            return
        self.send_response(resp.status)
        for k, v in resp.headers.items():
            self.send_header(k, v)
        if resp.stream is None:
            self.send_header("Content-Length", str(len(resp.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(resp.body)
            return
        # HTTP/1.0 has no chunked encoding: the stream's end is the connection's
        chunked = self.request_version != "HTTP/1.0"
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
            self.send_header("Connection", "close")
        try:
            self.end_headers()
        except OSError:
            resp.stream.close()
            raise
        stream = self.server.streamer.add(self.connection, resp.stream, chunked)
        stream.finished.wait()          # this thread sleeps; the streamer writes
        self.connection.settimeout(self.timeout)
        if not stream.ok:
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """Errors raised by http.server itself (a bad request line, …), in the API's shape."""
        body = json.dumps({"error": {"message": message or "bad request", "type": "invalid_request_error",
                                     "param": None, "code": None}}).encode()
        self.close_connection = True
        if self.request_version == "HTTP/0.9":      # a line too broken to parse: still answer with a status
            self.request_version = "HTTP/1.0"
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, format, *args):
        if self.server.log:
            sys.stderr.write(f"nn2run: {self.address_string()} {format % args}\n")


def drain(server: Server, timeout: float) -> bool:
    """Health turns 503, new completions are refused; waits for the in-flight ones. Those
    still running at the timeout are ended with 503 (a stream: an error event, [DONE]),
    given a second to reach their clients. Returns whether all had finished in time."""
    app = server.app
    app.draining = True
    if _wait_idle(server, timeout):
        return True
    app.scheduler.abort()
    _wait_idle(server, 1.0)
    return False


def _wait_idle(server: Server, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while (server.in_flight > 0 or not server.app.scheduler.idle()) and time.monotonic() < end:
        time.sleep(0.05)
    return server.in_flight == 0 and server.app.scheduler.idle()

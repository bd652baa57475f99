"""`nn2run serve MODEL.nnb`: the model behind an HTTP server (see `nn2run.httpd` for the
transport, `nn2run.routes` for the API, `nn2run.scheduler` for continuous batching), and
with --grpc-port a gRPC server beside it on the same scheduler (`nn2run.grpc.server`).
A seq2seq model is served by a batching worker instead (`nn2run.translations`): POST
/v1/translations, and gRPC's Translator.

SIGTERM or Ctrl-C drains: health turns 503 (gRPC health NOT_SERVING), in-flight requests
finish (up to --drain-timeout), then the process exits 0. Imports click and the standard library
only at import time (the command line stays fast to start).
"""

from __future__ import annotations

import os
import sys

import click


def run_server(model, name: str, host: str, port: int, max_batch: int, max_queue: int, settings,
               drain_timeout: float, log: bool = True, grpc_port: int | None = None) -> int:
    import signal
    import threading

    from .httpd import Server, drain
    from .routes import App
    from .scheduler import Scheduler
    from .translations import TranslationWorker
    runner = TranslationWorker if hasattr(model, "translate") else Scheduler
    scheduler = runner(model, max_batch=max_batch, max_queue=max_queue).start()
    app = App(model, name, scheduler, settings)
    server = Server((host, port), app, log=log)
    rpc = None
    if grpc_port is not None:
        from .cli import Failure
        from .grpc.server import GrpcServer
        try:
            rpc = GrpcServer(app, host, grpc_port, max_rpcs=max_batch + max_queue + 16).start()
        except OSError as e:
            server.server_close()
            scheduler.stop()
            raise Failure(str(e)) from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    if ":" in bound_host:
        bound_host = f"[{bound_host}]"
    click.echo(f"nn2run: serving {name} on http://{bound_host}:{bound_port} "
               f"(max batch {max_batch}, queue {max_queue})", err=True)
    if rpc is not None:
        click.echo(f"nn2run: serving {name} over gRPC on {bound_host}:{rpc.port}", err=True)
    while not stop.wait(0.5):
        pass
    click.echo(f"nn2run: draining (up to {drain_timeout:g} s)", err=True)
    server.app.draining = True                 # before gRPC health says so: no call slips in between
    if rpc is not None:
        rpc.set_draining()
    clean = drain(server, drain_timeout)       # waits for the scheduler too: gRPC's requests included
    server.shutdown()
    server.server_close()
    if rpc is not None:
        rpc.stop(grace=1.0)
    scheduler.stop()
    click.echo("nn2run: stopped" if clean else "nn2run: stopped with requests still running", err=True)
    return 0


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_path", metavar="MODEL.nnb", type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 picks a free port.")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Rows (choices; a seq2seq model: texts × beam) stepped together.")
@click.option("--max-queue", type=click.IntRange(0, 1 << 20), default=256, show_default=True,
              help="Requests waiting for rows; past it: 429.")
@click.option("--max-tokens-limit", type=click.IntRange(1, 1 << 24), default=4096, show_default=True,
              help="The largest max_tokens accepted (language models).")
@click.option("--max-tokens-default", type=click.IntRange(0, 1 << 24), default=256, show_default=True,
              help="max_tokens when a request does not say (language models).")
@click.option("--max-body", type=click.IntRange(1, 1 << 30), default=1 << 20, show_default=True,
              help="Largest request body in bytes; past it: 413.")
@click.option("--timeout", "request_timeout", type=click.FloatRange(min=0.001), default=120.0,
              show_default=True, help="Seconds a request may take, queue included; past it: 504.")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM, seconds to let in-flight requests finish.")
@click.option("--api-key", default=None, envvar="NN2_API_KEY", help="Require 'Authorization: Bearer KEY'.")
@click.option("--cors", default=None, metavar="ORIGIN", help="Allow browser requests from ORIGIN ('*' for any).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the SHA-256 of the tensor data at load.")
@click.option("--quiet", is_flag=True, help="No line per request on stderr.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=None,
              help="Also serve gRPC (nn2run/proto/nn2.proto) on this port; needs the grpc extra.")
@click.option("--codec-service", default=None, metavar="HOST:PORT",
              help="The codec service of a model trained with one; needs the grpc extra.")
def serve_command(model_path, host, port, max_batch, max_queue, max_tokens_limit, max_tokens_default,
                  max_body, request_timeout, drain_timeout, api_key, cors, verify, quiet, grpc_port, codec_service):
    """Serve a model over HTTP: OpenAI's /v1/completions, /health, /metrics, a playground at /;
    with --grpc-port, over gRPC too (nn2run/proto/nn2.proto).

    A seq2seq model gets POST /v1/translations instead, {"texts": [...], "beam": 1,
    "n_best": null, "length_penalty": 1.0, "max_len": null} -> {"translations": [...]},
    queued requests translated together (gRPC: nn2.v1.Translator/Translate)."""
    from .cli import USAGE, Failure, _open
    from .grpc import needs_extra
    from .routes import Settings
    if max_tokens_default > max_tokens_limit:
        raise Failure("--max-tokens-default is over --max-tokens-limit", code=USAGE)
    if grpc_port is not None and needs_extra("--grpc-port"):
        raise Failure(needs_extra("--grpc-port"))
    model = _open(model_path, verify, codec_service)
    settings = Settings(max_tokens_default=max_tokens_default, max_tokens_limit=max_tokens_limit,
                        max_body=max_body, request_timeout=request_timeout, api_key=api_key, cors=cors)
    try:
        name = os.path.splitext(os.path.basename(model_path))[0]
        code = run_server(model, name, host, port, max_batch, max_queue, settings,
                          drain_timeout, log=not quiet, grpc_port=grpc_port)
    except OSError as e:
        raise Failure(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sys.exit(code)


if __name__ == "__main__":
    serve_command()

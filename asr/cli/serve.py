"""``asr-serve``: a streaming recognition server (WebSocket, HTTP) and its browser page.

    asr-serve [--model PATH] [--host 127.0.0.1] [--port 2700] [--int8] [--tick 0.1] [--max-streams 200]
              [--token T] [--allow-origin URL ...] [--threads N] [--workers N] ...

One process, one model: every stream is stepped with the others as one batch
(:mod:`asr.serve.engine`); with ``--workers N``, N such processes behind the one port
(:mod:`asr.serve.workers`). ``ws://HOST:PORT/`` speaks Vosk's protocol, ``ws://HOST:PORT/stream``
this project's richer one, ``POST /transcribe`` takes whole files, ``GET /`` is the microphone
page, ``GET /health`` and ``GET /metrics`` report. It binds 127.0.0.1 unless told otherwise:
put it behind a TLS-terminating proxy before exposing it (browsers give the microphone only to
https pages and localhost).

Failures to start (unreadable model, port in use, missing aiohttp) end with one line on stderr and
exit status 1 (2 for bad options). Ctrl-C or SIGTERM closes every stream with code 1001 and exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import signal
import sys
from typing import Callable, Optional

PROG = "asr-serve"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Streaming speech recognition server: Vosk-compatible "
                                "WebSocket, a richer JSON protocol, file transcription and a browser page.")
    p.add_argument("--model", metavar="PATH", help="checkpoint file or training folder (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=2700, help="port (default 2700, Vosk's; 0 picks a free one)")
    p.add_argument("--int8", action="store_true", help="int8 block weights (CPU): cheaper steps, outputs within ~1%%")
    p.add_argument("--compile", action="store_true",
                   help="compile the streaming step (needs a C++ compiler; a minute or two the first time)")
    p.add_argument("--lm", metavar="ARPA", default=None, help="word n-gram LM for final segments "
                   "(default: the LM the model carries; streams may turn it off)")
    p.add_argument("--no-lm", action="store_true", help="no language model: greedy finals")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads of the batched step (default 1: with more, each of the step's "
                        "~1,000 parallel regions waits for a thread the event loop or another process has "
                        "preempted: 2 threads made the step ~5x slower than 1 on two cores)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="server processes behind the one port, each with its own model copy and one step thread; "
                        "the port's process hands each connection to the one with the fewest (default 1; "
                        "use one per core for many streams, README 'Scaling')")
    p.add_argument("--tick", type=float, default=0.1, metavar="S",
                   help="seconds between batched steps (default 0.1; 0.04-0.16 sensible)")
    p.add_argument("--max-streams", type=int, default=200, help="concurrent streams; more are refused (default 200)")
    p.add_argument("--max-stream-seconds", type=float, default=3600.0,
                   help="audio per stream; at the limit the stream gets its final result and is closed (default 3600)")
    p.add_argument("--max-message-bytes", type=int, default=1 << 20, help="largest WebSocket message (default 1 MiB)")
    p.add_argument("--max-upload-bytes", type=int, default=200 << 20, help="largest POST /transcribe body (default 200 MiB)")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="close a stream silent this long (default 60 s)")
    p.add_argument("--send-timeout", type=float, default=10.0,
                   help="drop a client that does not read its replies this long (default 10 s)")
    p.add_argument("--token", default=os.environ.get("ASR_SERVE_TOKEN"),
                   help="require 'Authorization: Bearer TOKEN' (or ?token=TOKEN); default $ASR_SERVE_TOKEN")
    p.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="browser Origin allowed besides the server's own (repeatable; '*' allows any)")
    p.add_argument("--default-sample-rate", type=int, default=None, metavar="HZ",
                   help="rate of audio sent without a config (default: none, such audio is refused; "
                        "Vosk's server assumes 8000)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def _check(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    for name in ("max_streams", "max_message_bytes", "max_upload_bytes"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("tick", "max_stream_seconds", "idle_timeout", "send_timeout"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.port <= 65535:
        ap.error("--port must be in 0..65535")
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    if args.lm is not None and args.no_lm:
        ap.error("--lm and --no-lm contradict each other")
    if args.default_sample_rate is not None and args.default_sample_rate <= 0:
        ap.error("--default-sample-rate must be positive")


def main(argv: Optional[list[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    _check(args, ap)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if importlib.util.find_spec("aiohttp") is None:
        print(f"{PROG}: error: aiohttp is not installed: pip install 'rwkv-asr[serve]'", file=sys.stderr)
        return 1
    if args.workers > 1:
        return _run_workers(args)
    try:
        engine, options = _build(args, args.max_streams)
    except Exception as err:  # CheckpointError, a missing compiler, an unreadable LM: one line
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    from asr.serve import make_app

    try:
        asyncio.run(_serve(make_app(engine, options), args.host, args.port))
    except OSError as err:  # the port is taken, the address is not ours
        print(f"{PROG}: error: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


def _build(args: argparse.Namespace, max_streams: int, worker: int = 0):  # noqa: ANN202 (lazy imports)
    """The model loaded as the options say, its Engine and the ServerOptions (raises on failure)."""
    import torch

    torch.set_num_threads(args.threads)
    from asr.api import load_model
    from asr.serve import Engine, Limits, ServerOptions
    from asr.stream import tune_for_streaming

    lm = None if args.no_lm else (args.lm if args.lm is not None else "auto")
    model = load_model(args.model, int8=args.int8, compile=args.compile, lm=lm)
    tune_for_streaming()
    engine = Engine(model, Limits(max_streams=max_streams, max_stream_seconds=args.max_stream_seconds,
                                  tick_seconds=args.tick), worker=worker)
    options = ServerOptions(max_message_bytes=args.max_message_bytes, idle_timeout=args.idle_timeout,
                            send_timeout=args.send_timeout, token=args.token or None,
                            allow_origins=tuple(args.allow_origin), default_sample_rate=args.default_sample_rate,
                            max_upload_bytes=args.max_upload_bytes)
    return engine, options


def _listening(host: str, port: int) -> None:
    url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    print(f"{PROG}: listening on {url} (page {url}/, Vosk WebSocket ws{url[4:]}/, rich WebSocket "
          f"ws{url[4:]}/stream); Ctrl-C to stop", file=sys.stderr, flush=True)


def _run_workers(args: argparse.Namespace) -> int:
    """--workers N: this process binds the port and hands connections to N forked workers."""
    import socket

    from asr.serve import workers

    why = workers.supported()
    if why is not None:
        print(f"{PROG}: error: {why}", file=sys.stderr)
        return 1
    try:
        listener = socket.create_server((args.host, args.port), family=_family(args.host), backlog=1024)
    except OSError as err:
        print(f"{PROG}: error: cannot listen on {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 1
    per_worker = -(-args.max_streams // args.workers)
    front = workers.Front(listener, args.workers, lambda i, channel: _worker(args, per_worker, i, channel))
    failed = front.wait_ready()
    if failed is not None:
        front.stop()
        print(f"{PROG}: error: {' '.join(failed.split())}", file=sys.stderr)
        return 1
    host, port = listener.getsockname()[:2]
    _listening(host, port)
    status = front.serve()
    print(f"{PROG}: stopping", file=sys.stderr, flush=True)
    return status


def _family(host: str) -> int:
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _worker(args: argparse.Namespace, max_streams: int, index: int, channel) -> None:  # noqa: ANN001
    """One forked worker: load the model, serve the connections the front hands over."""
    from asr.serve import workers

    try:
        engine, options = _build(args, max_streams, index)
    except Exception as err:
        workers.tell(channel, workers.FAILED + " ".join(str(err).split()).encode()[:3000])
        sys.exit(1)
    from asr.serve import make_app

    asyncio.run(_serve_worker(make_app(engine, options), channel))


async def _serve_worker(app, channel) -> None:  # noqa: ANN001 (aiohttp imported lazily)
    from asr.serve import workers

    async def take_connections(runner, stop: asyncio.Event) -> None:  # noqa: ANN001
        workers.receive_connections(asyncio.get_running_loop(), channel, runner.server, stop.set)
        workers.tell(channel, workers.READY)

    await _run_app(app, take_connections)


async def _serve(app, host: str, port: int) -> None:  # noqa: ANN001 (aiohttp imported lazily)
    from aiohttp import web

    async def listen(runner, stop: asyncio.Event) -> None:  # noqa: ANN001, ARG001
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0]
        _listening(str(bound[0]), bound[1])

    await _run_app(app, listen, on_stop=lambda: print(f"{PROG}: stopping", file=sys.stderr, flush=True))


async def _run_app(app, start, on_stop: Optional[Callable[[], None]] = None) -> None:  # noqa: ANN001
    """Serve ``app`` (aiohttp, imported lazily) until SIGINT or SIGTERM: its runner set up,
    ``await start(runner, stop)`` to begin taking connections (setting the event ``stop`` ends the
    run too), then ``on_stop()`` once stopping begins, and the runner cleaned up (its streams closed
    with 1001)."""
    from aiohttp import web

    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await start(runner, stop)
        await stop.wait()
        if on_stop is not None:
            on_stop()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())

"""``asr-serve``'s HTTP and WebSocket front (aiohttp): routes, limits, authentication.

Routes (:func:`make_app`):

* ``GET /``: the browser page, or, for a WebSocket upgrade, the Vosk-compatible stream;
* ``GET /stream``: the rich WebSocket protocol (:mod:`asr.serve.protocol`);
* ``POST /transcribe``: a whole file (raw body or multipart field ``file``), answered with
  ``asr-transcribe -f json``'s JSON (``?format=txt|srt|vtt|tsv`` for the others);
* ``GET /health`` (JSON), ``GET /metrics`` (Prometheus text format), ``GET /static/...``.

Safety: a bearer token (``Authorization: Bearer T``, or ``?token=T`` since browsers cannot set
headers on a WebSocket) when one is configured; a browser's ``Origin`` must be the server's own or
an allowed one (clients that send no Origin, i.e. not browsers, pass); both are refused before the
upgrade with HTTP 401/403 and a JSON body. A stream's bad input ends only that stream, with
``{"error", "code"}`` and a close code (:mod:`asr.serve.protocol`); the tick goes on for the rest.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from aiohttp import WSMsgType, web

import asr.serve.protocol as P
from asr.serve.engine import Engine, StepResult, Stream
from asr.version import __version__

log = logging.getLogger("asr.serve")

STATIC = Path(__file__).resolve().parent / "static"
#: aiohttp refuses messages over this multiple of ``max_message_bytes`` by itself (close 1009
#: without a JSON error); messages between the two get the JSON error.
HARD_LIMIT_FACTOR = 4
#: at shutdown, how long each WebSocket's close handshake may take (all run at once)
SHUTDOWN_CLOSE_SECONDS = 2.0


@dataclass
class ServerOptions:
    """Per-connection limits and access rules (``asr-serve`` options of the same names)."""

    max_message_bytes: int = 1 << 20
    idle_timeout: float = 60.0
    send_timeout: float = 10.0
    token: Optional[str] = None
    allow_origins: tuple[str, ...] = ()
    default_sample_rate: Optional[int] = None
    max_upload_bytes: int = 200 << 20
    #: kernel send buffer per WebSocket (SO_SNDBUF): replies are small, and a client that stops
    #: reading then blocks its writer after this (plus asyncio's 64 KiB) rather than after the
    #: megabytes Linux would otherwise grow the buffer to; bounds kernel memory per connection too.
    send_buffer_bytes: int = 64 << 10


ENGINE = web.AppKey("engine", Engine)
OPTIONS = web.AppKey("options", ServerOptions)
SOCKETS = web.AppKey("sockets", weakref.WeakSet)
TICK = web.AppKey("tick", asyncio.Task)


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _refusal(request: web.Request) -> Optional[web.Response]:
    """HTTP 401 for a missing or wrong token, 403 for a foreign browser Origin; else None."""
    opts = request.app[OPTIONS]
    if opts.token:
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else request.query.get("token", "")
        if not hmac.compare_digest(given.encode(), opts.token.encode()):
            return _json_error(401, "missing or wrong bearer token")
    origin = request.headers.get("Origin")
    if origin and "*" not in opts.allow_origins:
        own = f"{request.scheme}://{request.host}"
        if origin != own and origin not in opts.allow_origins:
            return _json_error(403, f"origin {origin} is not allowed (see --allow-origin)")
    return None


class Connection:
    """One WebSocket stream: reads audio into the engine, writes the tick's results back."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, rich: bool) -> None:
        self.ws = ws
        self.request = request
        self.engine = request.app[ENGINE]
        self.opts = request.app[OPTIONS]
        self.rich = rich
        self.stream: Optional[Stream] = None
        self.writer: Optional[asyncio.Task] = None
        self.renderer: Optional[P.RichRenderer] = None

    async def run(self) -> None:
        try:
            await self._read()
            if self.writer is not None:  # ended by eof or the length limit: let the final out
                await self.writer
        except P.ProtocolError as err:
            await self._fail(err)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a server bug: this stream ends, the others go on
            log.exception("stream failed")
            await self._fail(P.ProtocolError(f"internal error: {type(err).__name__}", P.CLOSE_INTERNAL))
        finally:
            if self.writer is not None and not self.writer.done():
                self.writer.cancel()
            if self.stream is not None:
                self.engine.close(self.stream)

    async def _read(self) -> None:
        while self.stream is None or not self.stream.ending:
            try:
                msg = await self.ws.receive(timeout=self.opts.idle_timeout)
            except asyncio.TimeoutError:
                raise P.ProtocolError(f"idle for {self.opts.idle_timeout:g} s (idle_timeout)", P.CLOSE_POLICY) from None
            if msg.type == WSMsgType.TEXT:
                self._on_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                self._on_audio(msg.data)
            else:  # CLOSE, CLOSED, ERROR (aiohttp closed an oversized message with 1009 itself)
                if self.writer is not None:
                    self.writer.cancel()
                self.writer = None
                return

    def _on_text(self, text: str) -> None:
        if len(text) > self.opts.max_message_bytes:
            raise P.ProtocolError(f"message of {len(text)} bytes is over max_message_bytes "
                                  f"({self.opts.max_message_bytes})", P.CLOSE_TOO_BIG)
        msg = P.parse_text(text)
        if msg.kind == "config":
            if self.stream is not None:
                raise P.ProtocolError("config after the stream started: send it first, once", P.CLOSE_POLICY)
            parse = P.parse_rich_config if self.rich else P.parse_vosk_config
            self._open(parse(msg.config or {}, self.opts.default_sample_rate))
        else:  # eof
            if self.stream is None:
                self._open(P.StreamConfig(sample_rate=self.opts.default_sample_rate or 16000))
            self.stream.finish()  # type: ignore[union-attr]

    def _on_audio(self, data: bytes) -> None:
        if len(data) > self.opts.max_message_bytes:
            raise P.ProtocolError(f"message of {len(data)} bytes is over max_message_bytes "
                                  f"({self.opts.max_message_bytes})", P.CLOSE_TOO_BIG)
        if self.stream is None:
            if self.opts.default_sample_rate is None:
                raise P.ProtocolError('audio before config: send {"config": {"sample_rate": N}} first', P.CLOSE_POLICY)
            self._open(P.StreamConfig(sample_rate=self.opts.default_sample_rate))
        self.stream.feed(P.pcm_samples_bytes(data))  # type: ignore[union-attr]

    def _open(self, config: P.StreamConfig) -> None:
        self.stream = self.engine.open(config)
        if self.rich:
            self.renderer = P.RichRenderer(config)
            self.writer = asyncio.create_task(self._write(initial=[self.renderer.ready(self.stream.id, config)]))
        else:
            self.writer = asyncio.create_task(self._write())

    # ------------------------------------------------------------------ writing
    def _render(self, res: StepResult) -> list[str]:
        cfg = self.stream.config  # type: ignore[union-attr]
        if self.renderer is not None:
            if res.final:
                return self.renderer.done(res.segments + res.end_segments, res.duration, res.reason)
            return self.renderer.step(res.segments, res.text, res.words)
        if not res.final:
            return P.vosk_replies(res.messages, res.segments, res.text, cfg)
        head = res.messages + (res.reason == "eof") - 1  # replies before the final one
        if head <= 0:
            return [P.vosk_final(res.segments + res.end_segments, cfg)]
        return P.vosk_replies(head, res.segments, res.text, cfg) + [P.vosk_final(res.end_segments, cfg)]

    async def _write(self, initial: Sequence[str] = ()) -> None:
        """Send each tick's replies; close after the final one. A client that does not take them
        within send_timeout is too slow: it is dropped. A client gone away ends the writer."""
        assert self.stream is not None
        pending = list(initial)
        try:
            while True:
                for text in pending:
                    await asyncio.wait_for(self.ws.send_str(text), self.opts.send_timeout)
                res = await self.stream.results.get()
                if res.error is not None:
                    self.engine.totals["errors"] += 1
                    await self._send_error(P.ProtocolError(res.error, P.CLOSE_INTERNAL))
                    return
                pending = self._render(res)
                if res.final:
                    for text in pending:
                        await asyncio.wait_for(self.ws.send_str(text), self.opts.send_timeout)
                    reason = "end of stream" if res.reason == "eof" else f"stream reached {res.reason}"
                    await self.ws.close(code=P.CLOSE_NORMAL, message=reason.encode())
                    return
        except asyncio.TimeoutError:
            await self._drop_slow()
        except ConnectionError:
            pass

    async def _drop_slow(self) -> None:
        self.engine.totals["errors"] += 1
        log.warning("stream %s: client too slow to read (send_timeout %g s): dropped",
                    self.stream.id if self.stream else "-", self.opts.send_timeout)
        err = P.ProtocolError(f"client too slow to read replies (send_timeout {self.opts.send_timeout:g} s)",
                              P.CLOSE_POLICY)
        try:
            await asyncio.wait_for(self._send_error(err), 1.0)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        if self.request.transport is not None:
            self.request.transport.abort()

    async def _send_error(self, err: P.ProtocolError) -> None:
        if self.ws.closed:
            return
        try:
            await self.ws.send_str(err.to_json())
            await self.ws.close(code=err.code, message=str(err)[:120].encode())
        except ConnectionError:
            pass

    async def _fail(self, err: P.ProtocolError) -> None:
        """A client error: log it, tell the client, close with the error's code."""
        if err.code != P.CLOSE_TRY_LATER:
            self.engine.totals["errors"] += 1
        log.info("stream %s: %s (close %d)", self.stream.id if self.stream else "-", err, err.code)
        if self.writer is not None and not self.writer.done():
            self.writer.cancel()
        try:
            await asyncio.wait_for(self._send_error(err), self.opts.send_timeout)
        except asyncio.TimeoutError:
            if self.request.transport is not None:
                self.request.transport.abort()


# ------------------------------------------------------------------------------------ handlers
async def _websocket(request: web.Request, rich: bool) -> web.StreamResponse:
    refused = _refusal(request)
    if refused is not None:
        return refused
    opts = request.app[OPTIONS]
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None and opts.send_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, opts.send_buffer_bytes)
    ws = web.WebSocketResponse(max_msg_size=HARD_LIMIT_FACTOR * opts.max_message_bytes)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    await Connection(ws, request, rich).run()
    return ws


async def index(request: web.Request) -> web.StreamResponse:
    """The page, or the Vosk WebSocket when the request is an upgrade."""
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _websocket(request, rich=False)
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def rich_stream(request: web.Request) -> web.StreamResponse:
    return await _websocket(request, rich=True)


async def transcribe(request: web.Request) -> web.Response:
    """POST /transcribe: body = an audio file (or multipart with a ``file`` field)."""
    refused = _refusal(request)
    if refused is not None:
        return refused
    fmt = request.query.get("format", "json")
    from asr.formats import FORMATS, format_transcript

    if fmt not in FORMATS:
        return _json_error(400, f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    try:
        audio, name = await _upload(request)
    except web.HTTPRequestEntityTooLarge:
        return _json_error(413, f"upload over max_upload_bytes ({request.app[OPTIONS].max_upload_bytes})")
    except ValueError as err:
        return _json_error(400, str(err))
    from asr.audio import AudioError

    try:
        result = await request.app[ENGINE].transcribe(audio, name)
    except AudioError as err:
        return _json_error(400, " ".join(str(err).split()))
    ctype = "application/json" if fmt == "json" else "text/plain"
    return web.Response(text=format_transcript(result, fmt), content_type=ctype, charset="utf-8")


async def _upload(request: web.Request) -> tuple[bytes, Optional[str]]:
    if request.content_type.startswith("multipart/"):
        form = await request.post()
        field = form.get("file")
        if field is None:
            field = next((v for v in form.values() if isinstance(v, web.FileField)), None)
        if not isinstance(field, web.FileField):
            raise ValueError("multipart upload without a file field ('file')")
        return field.file.read(), field.filename
    body = await request.read()
    if not body:
        raise ValueError("empty body: POST the audio file as the body, or as multipart field 'file'")
    return body, request.query.get("name")


async def health(request: web.Request) -> web.Response:
    m = request.app[ENGINE].metrics()
    return web.json_response({"status": "ok", "version": __version__, "active_streams": m["active_streams"],
                              "max_streams": m["max_streams"], "uptime_seconds": round(m["uptime_seconds"], 1)})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of Engine.metrics (gauges; *_total are counters)."""
    lines = []
    for key, value in request.app[ENGINE].metrics().items():
        name = f"asr_serve_{key}"
        lines.append(f"# TYPE {name} {'counter' if key.endswith('_total') else 'gauge'}")
        lines.append(f"{name} {float(value):.6g}")
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


# ------------------------------------------------------------------------------------ the app
async def _start_tick(app: web.Application) -> None:
    app[TICK] = asyncio.create_task(app[ENGINE].run())


async def _close_sockets(app: web.Application) -> None:
    """Close every WebSocket at once (1001), each waiting at most SHUTDOWN_CLOSE_SECONDS for its
    client's answer: clients that vanished do not hold the shutdown up one after another."""
    closing = [asyncio.wait_for(ws.close(code=P.CLOSE_GOING_AWAY, message=b"server shutting down"),
                                SHUTDOWN_CLOSE_SECONDS) for ws in list(app[SOCKETS])]
    await asyncio.gather(*closing, return_exceptions=True)


async def _stop_tick(app: web.Application) -> None:
    app[TICK].cancel()
    try:
        await app[TICK]
    except asyncio.CancelledError:
        pass
    app[ENGINE].shutdown()


def make_app(engine: Engine, options: Optional[ServerOptions] = None) -> web.Application:
    """The aiohttp application serving ``engine`` (its tick starts and stops with the app)."""
    opts = options or ServerOptions()
    app = web.Application(client_max_size=opts.max_upload_bytes)
    app[ENGINE] = engine
    app[OPTIONS] = opts
    app[SOCKETS] = weakref.WeakSet()
    app.router.add_get("/", index)
    app.router.add_get("/stream", rich_stream)
    app.router.add_post("/transcribe", transcribe)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_static("/static/", STATIC)
    app.on_startup.append(_start_tick)
    app.on_shutdown.append(_close_sockets)
    app.on_cleanup.append(_stop_tick)
    return app

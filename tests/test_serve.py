"""asr-serve: Vosk and rich WebSocket protocols against offline transcription, every bad input,
limits and access checks, files over HTTP, a 10-client load, and 1,000 connection cycles.

Servers run in the test's own event loop on 127.0.0.1 (port 0). Model: ``tests/data/stream_tiny.pt``
(no LM; overfit on the test recordings with pauses between them, so it recognises them and its
endpoints fall between utterances); streaming equals offline for any model, so final text is
compared with ``model.transcribe`` of the same samples.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

aiohttp = pytest.importorskip("aiohttp", reason="asr-serve needs aiohttp: pip install -e '.[serve]'")
from aiohttp import WSMsgType, web  # noqa: E402

import asr  # noqa: E402
from asr.audio import load_audio, resample  # noqa: E402
from asr.formats import to_json  # noqa: E402
from asr.serve import Engine, Limits, ServerOptions, make_app  # noqa: E402
from asr.serve.client import VoskRun, vosk_stream  # noqa: E402

DATA = Path(__file__).parent / "data"
FILES = {"goforward": "audio/pocketsphinx_goforward.flac", "cards": "audio/pocketsphinx_cards_001.flac",
         "seven": "audio/fsdd_7_jackson_00.flac"}
TEXTS = {"goforward": "go forward ten meters", "cards": "ten of clubs", "seven": "seven"}
SR = 16000


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return asr.load_model(DATA / "stream_tiny.pt")


@pytest.fixture(scope="module")
def pcm() -> dict[tuple[str, int], np.ndarray]:
    """int16 samples of each test recording at 16 kHz and at 8 kHz."""
    out = {}
    for name, f in FILES.items():
        wave = load_audio(DATA / f)
        for rate in (SR, 8000):
            w = wave if rate == SR else resample(wave, SR, rate)
            out[name, rate] = (w.clamp(-1, 1) * 32767).round().to(torch.int16).numpy()
    return out


@dataclass
class Served:
    http: str
    ws: str
    port: int
    engine: Engine


@contextlib.asynccontextmanager
async def serving(model, limits: Limits | None = None, **options):
    engine = Engine(model, limits or Limits(tick_seconds=0.02))
    runner = web.AppRunner(make_app(engine, ServerOptions(**options)))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        yield Served(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", port, engine)
    finally:
        await runner.cleanup()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def check_vosk_messages(got: VoskRun, n_blocks: int, duration: float) -> None:
    """Field by field: one reply per audio message, each a partial or a result in Vosk's shape."""
    assert len(got.replies) == n_blocks
    for msg in got.replies:
        if "partial" in msg:
            assert set(msg) == {"partial"} and isinstance(msg["partial"], str)
        else:
            check_vosk_result(msg, duration)
    check_vosk_result(got.final, duration)
    assert got.close_code == 1000


def check_vosk_result(msg, duration: float) -> None:
    assert set(msg) <= {"result", "text"} and isinstance(msg["text"], str)
    words = msg.get("result", [])
    assert (not words) == (msg["text"] == "")
    assert " ".join(w["word"] for w in words) == msg["text"]
    for w in words:
        assert set(w) == {"conf", "end", "start", "word"}
        assert 0.0 <= w["start"] <= w["end"] <= duration + 1e-3 and 0.0 <= w["conf"] <= 1.0


def vosk_words(got: VoskRun) -> list[tuple[str, float, float]]:
    return [(w["word"], w["start"], w["end"]) for r in got.results for w in r.get("result", [])]


# ------------------------------------------------------------------------------------ parity
def test_vosk_clients_at_8_and_16_khz_paced_and_fast_equal_offline(model, pcm):
    """Four clients at once: 16 and 8 kHz, real-time pace and full speed; final text and word
    times equal model.transcribe of the same samples."""
    cases = [(rate, paced) for rate in (SR, 8000) for paced in (True, False)]

    async def body():
        async with serving(model) as srv, aiohttp.ClientSession() as session:
            return await asyncio.gather(*(vosk_stream(session, srv.ws + "/", pcm["goforward", rate], rate,
                                                      realtime=paced) for rate, paced in cases))

    for (rate, paced), got in zip(cases, run(body())):
        samples = pcm["goforward", rate]
        offline = model.transcribe(samples, sample_rate=rate)
        assert got.text == offline.text, f"{rate} Hz, paced={paced}"
        assert vosk_words(got) == [(w.word, round(w.start, 3), round(w.end, 3)) for w in offline.words]
        check_vosk_messages(got, -(-samples.size // int(0.1 * rate)), samples.size / rate)
        if rate == SR:
            assert got.text == TEXTS["goforward"]


def test_vosk_results_come_at_endpoints(model, pcm):
    """A recording with pauses: one result message per utterance, mid-stream."""
    tiny = model
    gap = np.zeros(int(2.5 * SR), dtype=np.int16)
    samples = np.concatenate([gap[:8000], pcm["goforward", SR], gap, pcm["cards", SR], gap, pcm["seven", SR], gap])

    async def body():
        async with serving(tiny) as srv, aiohttp.ClientSession() as session:
            return await vosk_stream(session, srv.ws + "/", samples, SR, block_seconds=0.25)

    got = run(body())
    mid = [r["text"] for r in got.replies if "text" in r]
    assert mid == [TEXTS["goforward"], TEXTS["cards"], TEXTS["seven"]]
    assert got.final == {"text": ""}
    assert got.text == tiny.transcribe(samples, sample_rate=SR).text
    check_vosk_messages(got, len(got.replies), samples.size / SR)


def test_vosk_words_off_and_alternatives(model, pcm):
    async def body():
        async with serving(model) as srv, aiohttp.ClientSession() as session:
            plain = await vosk_stream(session, srv.ws + "/", pcm["cards", SR], SR, config={"words": False})
            alts = await vosk_stream(session, srv.ws + "/", pcm["cards", SR], SR,
                                     config={"max_alternatives": 3, "phrase_list": ["ten of clubs"], "nlsml": 1})
            return plain, alts

    plain, alts = run(body())
    assert plain.final == {"text": TEXTS["cards"]}
    (alt,) = alts.final["alternatives"]
    assert set(alt) == {"confidence", "result", "text"} and alt["text"] == TEXTS["cards"]
    assert [w["word"] for w in alt["result"]] == TEXTS["cards"].split() and set(alt["result"][0]) == {"word", "start", "end"}


def test_rich_protocol_segments_and_options(model, pcm):
    tiny = model
    gap = np.zeros(int(2.0 * SR), dtype=np.int16)
    samples = np.concatenate([pcm["goforward", SR], gap, pcm["cards", SR], gap[:4000]])

    async def body():
        async with serving(tiny) as srv, aiohttp.ClientSession() as session:
            async with session.ws_connect(srv.ws + "/stream") as ws:
                await ws.send_str(json.dumps({"config": {"sample_rate": SR, "lm": False,
                                                         "endpoint": {"rule2_min_trailing_silence": 1.0}}}))
                for i in range(0, samples.size, 3200):
                    await ws.send_bytes(samples[i : i + 3200].tobytes())
                await ws.send_str('{"eof": 1}')
                msgs = [json.loads(m.data) async for m in ws if m.type == WSMsgType.TEXT]
                return msgs, ws.close_code

    msgs, code = run(body())
    assert code == 1000
    assert msgs[0]["type"] == "ready" and msgs[0]["sample_rate"] == SR
    finals = [m for m in msgs if m["type"] == "final"]
    assert [(m["segment"], m["text"], m["is_final"]) for m in finals] == [
        (0, TEXTS["goforward"], True), (1, TEXTS["cards"], True)]
    for m in finals:
        assert [w["word"] for w in m["words"]] == m["text"].split()
        assert set(m["words"][0]) == {"word", "start", "end", "confidence"}
        assert m["start"] == m["words"][0]["start"] and m["end"] == m["words"][-1]["end"]
    partials = [m for m in msgs if m["type"] == "partial"]
    assert partials and all(m["is_final"] is False for m in partials)
    assert all(a["text"] != b["text"] for a, b in zip(partials, partials[1:]) if a["segment"] == b["segment"])
    assert msgs[-1] == {"type": "done", "segments": 2, "duration": round(samples.size / SR, 3), "reason": "eof"}


# ------------------------------------------------------------------------------------ bad input
async def _bad(srv, path: str, steps, headers=None) -> tuple[list, int | None]:
    """Run ``steps`` (("text"|"bytes", payload) or ("wait", s)); return the JSON messages and close code."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(srv.ws + path, headers=headers or {}, max_msg_size=0) as ws:
            for kind, payload in steps:
                if kind == "text":
                    await ws.send_str(payload)
                elif kind == "bytes":
                    await ws.send_bytes(payload)
            msgs = [json.loads(m.data) async for m in ws if m.type == WSMsgType.TEXT]
            return msgs, ws.close_code


CONFIG = ("text", json.dumps({"config": {"sample_rate": SR}}))
BAD = {  # name -> (path, steps, close code, words of the error message)
    "not json": ("/", [("text", "hello")], 1007, "not JSON"),
    "not an object": ("/", [("text", "[1, 2]")], 1007, "JSON object"),
    "unknown message": ("/", [("text", '{"foo": 1}')], 1007, "unknown message"),
    "rate it cannot resample": ("/", [("text", '{"config": {"sample_rate": 11127}}')], 1003, "unsupported sample rate"),
    "negative rate": ("/", [("text", '{"config": {"sample_rate": -16000}}')], 1003, "out of range"),
    "rate not a number": ("/", [("text", '{"config": {"sample_rate": "fast"}}')], 1007, "expected a number"),
    "negative beam": ("/stream", [("text", '{"config": {"sample_rate": 16000, "beam_size": -2}}')], 1003,
                      "out of range"),
    "unknown rich key": ("/stream", [("text", '{"config": {"sample_rate": 16000, "beem": 2}}')], 1007, "unknown keys"),
    "negative endpoint": ("/stream", [("text", '{"config": {"sample_rate": 16000, "endpoint": '
                                      '{"rule2_min_trailing_silence": -1}}}')], 1003, "out of range"),
    "odd-length pcm": ("/", [CONFIG, ("bytes", b"\x00\x01\x02")], 1007, "even number of bytes"),
    "audio before config": ("/", [("bytes", b"\x00\x00" * 800)], 1008, "audio before config"),
    "binary garbage": ("/", [CONFIG, ("bytes", os.urandom(1001))], 1007, "even number of bytes"),
    "config twice": ("/", [CONFIG, CONFIG], 1008, "config after"),
    "message too big": ("/", [CONFIG, ("bytes", b"\x00" * 70_000)], 1009, "max_message_bytes"),
    "idle client": ("/", [CONFIG], 1008, "idle for"),
}


def test_every_bad_input_gets_its_error_while_a_good_client_goes_on(model, pcm):
    async def body():
        async with serving(model, max_message_bytes=65_536, idle_timeout=1.0) as srv, \
                aiohttp.ClientSession() as session:
            good = asyncio.create_task(vosk_stream(session, srv.ws + "/", pcm["goforward", SR], SR, realtime=True))
            bad = await asyncio.gather(*(_bad(srv, path, steps) for path, steps, _, _ in BAD.values()))
            huge = await _bad(srv, "/", [CONFIG, ("bytes", b"\x00" * 300_000)])  # over aiohttp's own limit
            vanished = await _vanish(srv, pcm["cards", SR])
            return await good, bad, huge, vanished, srv.engine.metrics()

    good, bad, huge, vanished, metrics = run(body())
    for (name, (_, _, code, words)), (msgs, got_code) in zip(BAD.items(), bad):
        assert got_code == code, name
        assert msgs[-1]["code"] == code and words in msgs[-1]["error"], (name, msgs)
    assert huge == ([], 1009)
    assert vanished == 0
    assert good.text == TEXTS["goforward"] and good.close_code == 1000
    assert metrics["active_streams"] == 0


def test_a_stream_failing_inside_the_step_ends_alone(model, pcm, monkeypatch):
    """A failure in the batched step falls back to stepping streams one by one: the failing stream
    gets an error and 1011, a stream stepped with it goes on to its exact final."""
    import asr.serve.engine as engine_module

    batched = engine_module.step_batch
    failed_batches = []

    def step_batch(recognizers, blocks, rates, **options):
        if any(getattr(r, "poisoned", False) for r in recognizers):
            failed_batches.append(len(recognizers))
            raise RuntimeError("batched step failed")
        return batched(recognizers, blocks, rates, **options)

    def broken(*_):
        raise RuntimeError("this stream's state is broken")

    monkeypatch.setattr(engine_module, "step_batch", step_batch)

    async def body():  # ticks of 0.3 s: the good client's 0.1 s messages are in every one
        async with serving(model, Limits(tick_seconds=0.3)) as srv, aiohttp.ClientSession() as session:
            async with session.ws_connect(srv.ws + "/") as ws:
                await ws.send_str(CONFIG[1])
                await _until(lambda: srv.engine.streams)
                (stream,) = srv.engine.streams.values()
                stream.recognizer.poisoned = True
                stream.recognizer.accept_waveform = broken
                good = asyncio.create_task(vosk_stream(session, srv.ws + "/", pcm["goforward", SR], SR, realtime=True))
                await _until(lambda: good_started(srv))
                await ws.send_bytes(pcm["cards", SR][:1600].tobytes())
                msgs = [json.loads(m.data) async for m in ws if m.type == WSMsgType.TEXT]
            return msgs, ws.close_code, await good

    msgs, code, good = run(body())
    assert failed_batches == [2]
    assert code == 1011 and "this stream's state is broken" in msgs[-1]["error"]
    assert good.text == TEXTS["goforward"] and good.close_code == 1000


def good_started(srv) -> bool:
    """The second stream has audio queued or stepped."""
    return len(srv.engine.streams) == 2 and max(srv.engine.streams.values(), key=lambda s: s.id).recognizer.duration > 0


async def _until(condition, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def _vanish(srv, samples) -> int:
    """A client that drops its connection mid-stream (no close handshake); returns the streams
    still open on the server shortly after."""
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(srv.ws + "/")
        await ws.send_str(CONFIG[1])
        await ws.send_bytes(samples[:1600].tobytes())
        await ws.receive()
        await ws.send_bytes(samples[1600:3200].tobytes())
        ws._response.connection.transport.abort()  # the client's side of the socket vanishes
    await _until_no_streams(srv)
    return len(srv.engine.streams)


async def _until_no_streams(srv, seconds: float = 5.0) -> None:
    """Wait (up to ``seconds``) for the server's handlers to forget their streams."""
    for _ in range(int(seconds / 0.02)):
        if not srv.engine.streams:
            return
        await asyncio.sleep(0.02)


def test_a_client_too_slow_to_read_is_dropped(model, pcm):
    """A client that sends without reading its replies is cut off after send_timeout; others go on."""

    async def body():
        async with serving(model, send_timeout=0.5) as srv, aiohttp.ClientSession() as session:
            good = asyncio.create_task(vosk_stream(session, srv.ws + "/", pcm["goforward", SR], SR, realtime=True))
            sock = await _raw_websocket(srv.port)
            loop = asyncio.get_running_loop()
            frame = b"\x82\x82\x00\x00\x00\x00\x00\x00"  # binary, masked (zero key), one sample
            await loop.sock_sendall(sock, b"\x81\xa1\x00\x00\x00\x00" + CONFIG[1].encode().ljust(33))
            dropped = False
            for _ in range(400):  # ~1.2 MB of replies at most; the server must give up well before
                try:
                    await asyncio.wait_for(loop.sock_sendall(sock, frame * 2000), 2.0)
                except (ConnectionError, asyncio.TimeoutError):
                    dropped = True
                    break
                await asyncio.sleep(0.01)
                if srv.engine.totals["errors"]:
                    dropped = True
                    break
            sock.close()
            return dropped, await good, srv.engine.totals["errors"]

    dropped, good, errors = run(body())
    assert dropped and errors == 1
    assert good.text == TEXTS["goforward"] and good.close_code == 1000


async def _raw_websocket(port: int) -> socket.socket:
    """A WebSocket opened by hand on a socket with a tiny receive buffer (it is never read)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(sock, (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await loop.sock_recv(sock, 4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


# ------------------------------------------------------------------------------------ limits
def test_max_streams_refuses_clearly_and_frees_slots(model):
    async def body():
        async with serving(model, Limits(max_streams=2, tick_seconds=0.02)) as srv, \
                aiohttp.ClientSession() as session:
            a = await session.ws_connect(srv.ws + "/")
            b = await session.ws_connect(srv.ws + "/stream")
            await a.send_str(CONFIG[1])
            await b.send_str(CONFIG[1])
            await b.receive()  # ready: both slots are taken
            refused = await _bad(srv, "/", [CONFIG])
            await a.send_str('{"eof": 1}')
            final = json.loads((await a.receive()).data)
            await a.receive()
            for _ in range(50):
                if len(srv.engine.streams) < 2:
                    break
                await asyncio.sleep(0.02)
            accepted = await _bad(srv, "/", [CONFIG, ("text", '{"eof": 1}')])
            await b.close()
            return refused, final, accepted, srv.engine.metrics()

    refused, final, accepted, metrics = run(body())
    assert refused[1] == 1013 and "server full" in refused[0][0]["error"]
    assert final == {"text": ""}
    assert accepted == ([{"text": ""}], 1000)
    assert metrics["refused_total"] == 1


def test_max_stream_seconds_ends_the_stream_with_its_final(model, pcm):
    samples = pcm["goforward", SR]

    async def body():
        async with serving(model, Limits(max_stream_seconds=1.5, tick_seconds=0.02)) as srv, \
                aiohttp.ClientSession() as session:
            async with session.ws_connect(srv.ws + "/") as ws:
                await ws.send_str(CONFIG[1])
                replies = []
                for i in range(0, samples.size, 4000):
                    await ws.send_bytes(samples[i : i + 4000].tobytes())
                    msg = await ws.receive()
                    if msg.type != WSMsgType.TEXT:
                        break
                    replies.append(json.loads(msg.data))
                await ws.receive()
            await _until_no_streams(srv)
            return replies, ws.close_code, srv.engine.metrics()

    replies, code, metrics = run(body())
    assert code == 1000 and len(replies) == 6  # 1.5 s = 6 blocks of 0.25 s; the sixth gets the final
    assert "text" in replies[-1] and all("partial" in r for r in replies[:-1])
    assert replies[-1]["text"] == model.transcribe(samples[: int(1.5 * SR)], sample_rate=SR).text
    assert metrics["active_streams"] == 0


def test_token_and_origin_are_checked_before_the_upgrade(model):
    async def status(srv, path, **kw):
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(srv.ws + path, **kw) as ws:
                    await ws.close()
                    return 101
            except aiohttp.WSServerHandshakeError as err:
                return err.status

    async def body():
        async with serving(model, token="s3cret", allow_origins=("https://app.example",)) as srv:
            own = {"Origin": srv.http}
            return [
                await status(srv, "/"),
                await status(srv, "/", headers={"Authorization": "Bearer wrong"}),
                await status(srv, "/", headers={"Authorization": "Bearer s3cret"}),
                await status(srv, "/stream?token=s3cret"),
                await status(srv, "/?token=s3cret", headers={"Origin": "https://evil.example"}),
                await status(srv, "/?token=s3cret", headers=own),
                await status(srv, "/?token=s3cret", headers={"Origin": "https://app.example"}),
            ]

    assert run(body()) == [401, 401, 101, 101, 403, 101, 101]


# ------------------------------------------------------------------------------------ HTTP
def test_transcribe_health_metrics_and_page(model):
    path = DATA / FILES["goforward"]

    async def body():
        async with serving(model) as srv, aiohttp.ClientSession() as session:
            out = {}
            async with session.post(srv.http + "/transcribe", data=path.read_bytes()) as r:
                out["raw"] = (r.status, await r.text())
            form = aiohttp.FormData()
            form.add_field("file", path.read_bytes(), filename="goforward.flac")
            async with session.post(srv.http + "/transcribe?format=srt", data=form) as r:
                out["srt"] = (r.status, await r.text())
            async with session.post(srv.http + "/transcribe", data=b"not audio at all") as r:
                out["bad"] = (r.status, await r.json())
            async with session.post(srv.http + "/transcribe?format=doc", data=b"x") as r:
                out["format"] = r.status
            async with session.get(srv.http + "/health") as r:
                out["health"] = await r.json()
            async with session.get(srv.http + "/metrics") as r:
                out["metrics"] = await r.text()
            async with session.get(srv.http + "/") as r:
                out["page"] = await r.text()
            async with session.get(srv.http + "/static/app.js") as r:
                out["js"] = r.status
            return out

    out = run(body())
    want = model.transcribe(path.read_bytes())
    want.source = None  # a raw body has no name (?name=... gives one; multipart uploads carry theirs)
    assert out["raw"] == (200, to_json(want))  # what asr-transcribe -f json writes
    assert out["srt"][0] == 200 and out["srt"][1].startswith("1\n00:00:00,") and TEXTS["goforward"] in out["srt"][1]
    assert out["bad"][0] == 400 and "not a readable audio file" in out["bad"][1]["error"]
    assert out["format"] == 400
    assert out["health"]["status"] == "ok" and out["health"]["active_streams"] == 0
    assert "asr_serve_files_total 2" in out["metrics"] and "asr_serve_real_time_factor" in out["metrics"]
    assert 'id="start"' in out["page"] and out["js"] == 200


# ------------------------------------------------------------------------------------ load, leaks
def test_ten_clients_at_real_time_are_batched_and_all_exact(model, pcm):
    """10 concurrent real-time clients (three recordings, 8 and 16 kHz): every final equals the
    offline transcript, and the tick stepped several streams per call."""
    jobs = [(name, rate) for name in FILES for rate in (SR, 8000)]
    jobs = (jobs * 2)[:10]

    async def body():
        async with serving(model, Limits(tick_seconds=0.1)) as srv, aiohttp.ClientSession() as session:
            runs = await asyncio.gather(*(vosk_stream(session, srv.ws + "/", pcm[j], j[1], realtime=True) for j in jobs))
            return runs, srv.engine.metrics()

    runs, metrics = run(body())
    for (name, rate), got in zip(jobs, runs):
        assert got.text == model.transcribe(pcm[name, rate], sample_rate=rate).text, (name, rate)
    assert metrics["streams_per_tick"] > 2


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to read the resident size")
def test_thousand_connection_cycles_leak_nothing(model, pcm):
    """1,000 connect/stream/disconnect cycles (one in five vanishes without eof): no stream,
    socket or task left behind, and the resident size is flat after the first 200."""
    samples = pcm["cards", SR][:3200]

    async def cycle(session, url, vanish: bool):
        async with session.ws_connect(url) as ws:
            await ws.send_str(CONFIG[1])
            await ws.send_bytes(samples.tobytes())
            await ws.receive()
            if vanish:
                ws._response.connection.transport.abort()
                return
            await ws.send_str('{"eof": 1}')
            await ws.receive()

    async def body():
        async with serving(model, Limits(tick_seconds=0.01)) as srv, aiohttp.ClientSession() as session:
            async def worker(k: int, n: int):
                for i in range(n):
                    await cycle(session, srv.ws + "/", vanish=(k + i) % 5 == 0)

            await asyncio.gather(*(worker(k, 10) for k in range(20)))
            for _ in range(50):
                await asyncio.sleep(0.02)
            gc.collect()
            rss0, tasks0 = _rss_mb(), len(asyncio.all_tasks())
            await asyncio.gather(*(worker(k, 40) for k in range(20)))
            await _until_no_streams(srv)
            gc.collect()
            await asyncio.sleep(0.1)
            return rss0, _rss_mb(), tasks0, len(asyncio.all_tasks()), srv.engine.metrics()

    rss0, rss1, tasks0, tasks1, metrics = run(body())
    assert metrics["streams_total"] == 1000 and metrics["active_streams"] == 0
    assert tasks1 <= tasks0
    assert rss1 - rss0 < 20, f"resident size grew {rss1 - rss0:.1f} MB over 800 cycles"


# ------------------------------------------------------------------------------------ command line
def test_command_line_errors_are_one_line():
    """Bad options exit 2; a port already taken exits 1 with one line, no traceback (one process
    or --workers 2)."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(DATA.parents[1]), os.environ.get("PYTHONPATH")])))
    bad = subprocess.run([sys.executable, "-m", "asr.cli.serve", "--tick", "0"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--tick must be positive" in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            busy = subprocess.run([sys.executable, "-m", "asr.cli.serve", "--model", str(DATA / "stream_tiny.pt"),
                                   "--port", str(port), "--workers", workers], capture_output=True, text=True,
                                  env=env, timeout=120)
            assert busy.returncode == 1
            assert busy.stderr.strip().splitlines() == [busy.stderr.strip()] and "cannot listen on" in busy.stderr
    bad = subprocess.run([sys.executable, "-m", "asr.cli.serve", "--workers", "0"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--workers must be at least 1" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "asr.cli.serve", "--model", "/nonexistent.pt", "--port", "0",
                              "--workers", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0 and "error" in missing.stderr


# ------------------------------------------------------------------------------------ several workers
def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the workers' ids from /proc")
def test_workers_share_one_port_survive_a_dead_worker_and_stop_together(model, pcm):
    """asr-serve --workers 2: connections are spread over both workers (finals exact), a killed
    worker leaves the other serving, SIGTERM stops the front and every worker (exit 0)."""
    import signal
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(DATA.parents[1]), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "asr.cli.serve", "--model", str(DATA / "stream_tiny.pt"), "--port",
                             "0", "--workers", "2", "--tick", "0.02", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in proc.stderr:  # type: ignore[union-attr]
            if "listening on" in line:
                url = line.split("listening on ")[1].split()[0]
                break
        assert url is not None, "the server did not start"
        jobs = [("goforward", SR), ("goforward", 8000), ("cards", SR), ("cards", 8000)]

        async def streams(jobs):
            async with aiohttp.ClientSession() as session:
                return await asyncio.gather(*(vosk_stream(session, url.replace("http", "ws", 1) + "/", pcm[j], j[1])
                                              for j in jobs))

        async def metrics():
            seen = {}
            async with aiohttp.ClientSession() as session:
                for _ in range(20):
                    async with session.get(url + "/metrics", headers={"Connection": "close"}) as r:
                        m = dict(line.split() for line in (await r.text()).splitlines() if not line.startswith("#"))
                    seen[m["asr_serve_worker"]] = float(m["asr_serve_streams_total"])
            return seen

        for (name, rate), got in zip(jobs, run(streams(jobs))):
            assert got.close_code == 1000 and got.text == model.transcribe(pcm[name, rate], sample_rate=rate).text
        served = run(metrics())
        assert len(served) == 2 and sum(served.values()) == 4 and min(served.values()) >= 1, served
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        again = run(streams(jobs[:2]))
        assert [g.text for g in again] == [model.transcribe(pcm[j], sample_rate=j[1]).text for j in jobs[:2]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert all(not Path(f"/proc/{w}").exists() or "Z" in Path(f"/proc/{w}/stat").read_text().split()[2]
                   for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""A small asyncio client for ``asr-serve``'s Vosk protocol (for tests, the load benchmark, scripts).

    import asyncio, aiohttp
    from asr.serve.client import vosk_stream
    async def main():
        async with aiohttp.ClientSession() as session:
            run = await vosk_stream(session, "ws://127.0.0.1:2700/", samples_int16, 16000)
            print(run.text, run.latencies)
    asyncio.run(main())

It sends a config, then the samples in blocks, then eof, and reads the one reply each block gets,
the final result (the reply to eof) and the close. At real-time pace (``realtime=True``) each block is sent when its
last sample would have been recorded, whether or not earlier replies have come (a microphone does
not wait), and the replies are read as they come; otherwise each block is sent once the previous
one's reply is in (as fast as the server answers).
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


@dataclass
class VoskRun:
    """What a client saw. ``replies``: the parsed reply to each audio message, in order;
    ``final``: the reply to eof; ``latencies``: seconds from sending each block to its reply;
    ``final_latency``: seconds from sending eof to the final result; ``close_code``: the server's
    close code (None if the connection broke)."""

    replies: list[dict[str, Any]] = field(default_factory=list)
    final: Optional[dict[str, Any]] = None
    latencies: list[float] = field(default_factory=list)
    final_latency: Optional[float] = None
    close_code: Optional[int] = None

    @property
    def results(self) -> list[dict[str, Any]]:
        """Every result message, the final one included, in order."""
        out = [r for r in self.replies if "result" in r or "text" in r or "alternatives" in r]
        return out + ([self.final] if self.final is not None else [])

    @property
    def text(self) -> str:
        """The transcript: the texts of all results, joined."""
        return " ".join(r["text"] for r in self.results if r.get("text"))


async def vosk_stream(
    session: Any, url: str, samples: np.ndarray, sample_rate: int, *, block_seconds: float = 0.1,
    realtime: bool = False, config: Optional[dict[str, Any]] = None, headers: Optional[dict[str, str]] = None,
) -> VoskRun:
    """Stream int16 ``samples`` at ``sample_rate`` to a Vosk-protocol server (``session``: an
    aiohttp.ClientSession). ``realtime``: send each block when its last sample would have been
    recorded, not waiting for replies (module docstring). Raises RuntimeError if a reply is not a
    text message, or the connection ends before every block got its reply."""
    run = VoskRun()
    pcm = np.asarray(samples, dtype="<i2")
    block = max(1, int(round(block_seconds * sample_rate)))
    blocks = [pcm[offset : offset + block] for offset in range(0, pcm.size, block)]
    loop = asyncio.get_running_loop()
    async with session.ws_connect(url, headers=headers or {}, max_msg_size=0) as ws:
        await ws.send_str(json.dumps({"config": {"sample_rate": sample_rate, **(config or {})}}))
        sent: asyncio.Queue[float] = asyncio.Queue()  # send times of the messages not answered yet, eof's last
        if realtime:
            reader = asyncio.create_task(_read_replies(ws, run, sent, len(blocks), final=True))
            try:
                start, done = loop.time(), 0
                for chunk in blocks:
                    done += chunk.size
                    await asyncio.sleep(max(0.0, start + done / sample_rate - loop.time()))
                    if reader.done():  # the server closed or broke the connection: the reader says why
                        break
                    sent.put_nowait(loop.time())
                    await ws.send_bytes(chunk.tobytes())
                if not reader.done():
                    sent.put_nowait(loop.time())
                    await ws.send_str('{"eof" : 1}')
                await reader
            finally:
                reader.cancel()
        else:
            for chunk in blocks:
                sent.put_nowait(loop.time())
                await ws.send_bytes(chunk.tobytes())
                await _read_replies(ws, run, sent, 1)
            sent.put_nowait(loop.time())
            await ws.send_str('{"eof" : 1}')
            await _read_replies(ws, run, sent, 0, final=True)
    return run


async def _read_replies(ws: Any, run: VoskRun, sent: "asyncio.Queue[float]", n: int, final: bool = False) -> None:
    """Read ``n`` replies into ``run`` (latency: from the oldest unanswered message's send time),
    then with ``final`` the final result (the reply to eof) and the close. RuntimeError if a text
    message is missing where a reply must come."""
    from aiohttp import WSMsgType

    loop = asyncio.get_running_loop()
    for _ in range(n):
        msg = await ws.receive()
        if msg.type != WSMsgType.TEXT:
            run.close_code = ws.close_code
            raise RuntimeError(f"expected a reply, got {msg.type.name} (close code {ws.close_code})")
        run.latencies.append(loop.time() - sent.get_nowait())
        run.replies.append(json.loads(msg.data))
    if final:
        msg = await ws.receive()
        if msg.type == WSMsgType.TEXT:
            run.final_latency = loop.time() - sent.get_nowait()
            run.final = json.loads(msg.data)
            msg = await ws.receive()
        run.close_code = ws.close_code

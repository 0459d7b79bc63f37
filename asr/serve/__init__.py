"""``asr-serve``: one process, one model, many live streams over WebSocket, batched on a tick.

    from asr.serve import Engine, Limits, ServerOptions, make_app
    engine = Engine(asr.load_model(), Limits(max_streams=200, tick_seconds=0.1))
    aiohttp.web.run_app(make_app(engine, ServerOptions()), host="127.0.0.1", port=2700)

:mod:`asr.serve.engine` batches the streams through :func:`asr.stream.step_batch`;
:mod:`asr.serve.protocol` is the wire format (Vosk-compatible at ``/``, the richer one at
``/stream``); :mod:`asr.serve.server` the aiohttp routes, limits and access checks;
:mod:`asr.serve.workers` several such processes behind one port (``asr-serve --workers N``);
``static/`` the browser page. Needs the ``serve`` extra (aiohttp).
"""
from asr.serve.engine import Engine, Limits, StepResult, Stream
from asr.serve.server import ServerOptions, make_app

__all__ = ["Engine", "Limits", "ServerOptions", "StepResult", "Stream", "make_app"]

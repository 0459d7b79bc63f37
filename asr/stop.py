"""Stop cleanly on Ctrl-C or SIGTERM: a flag the work loop checks at a safe point.

``asr-live`` finishes the block it is decoding and saves the transcript; ``asr-train`` finishes the
step and saves a checkpoint. Both need the same thing: the first signal only asks to stop; a
second one (Ctrl-C pressed again) interrupts at once.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable, Optional


class StopSignals:
    """Context manager: SIGINT/SIGTERM set ``received`` instead of interrupting.

    Args:
        abort_on: signals that, arriving a second time, raise ``KeyboardInterrupt``.
        grace_seconds: a repeat within this time of the first signal is taken as the same request
            (torchrun forwards to its ranks the Ctrl-C they already got from the terminal).
        on_first: called with the signal number when the first one arrives (e.g. to log it).

    Handlers are installed only in the main thread (Python's rule) and restored on exit.
    """

    def __init__(
        self,
        abort_on: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
        grace_seconds: float = 0.0,
        on_first: Optional[Callable[[int], None]] = None,
    ) -> None:
        self.received: Optional[int] = None
        self._received_at = 0.0
        self._abort_on = abort_on
        self._grace = grace_seconds
        self._on_first = on_first
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            if signum in self._abort_on and time.monotonic() - self._received_at > self._grace:
                raise KeyboardInterrupt
            return
        self.received, self._received_at = signum, time.monotonic()
        if self._on_first is not None:
            self._on_first(signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

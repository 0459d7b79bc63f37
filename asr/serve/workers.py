"""Several ``asr-serve`` processes behind one port (``asr-serve --workers N``).

One process steps all its streams on one thread (:mod:`asr.serve.engine`): a machine's other cores
need other processes. With ``--workers N`` the process that binds the port (the *front*) loads no
model; it forks N workers, each with its own model and engine, and hands every accepted TCP
connection to the worker with the fewest open connections (ties in turn), passing the socket itself
over a Unix socket (``SCM_RIGHTS``). The worker then owns it: HTTP, WebSocket and the stream run
there, as in a one-process server. A long-lived stream stays on the worker that took it, so
least-connections keeps the streams spread evenly however long each one lasts (the kernel's
``SO_REUSEPORT`` hashing would spread them only by chance).

Wire between front and worker (one ``SOCK_SEQPACKET`` pair per worker):

* front -> worker: ``b"F"`` with one descriptor: a new connection;
* worker -> front: ``b"R"`` once its model is loaded and it serves, ``b"C"`` for each connection
  that ended, ``b"E"`` + a one-line message if it could not start.

Each worker's ``--max-streams`` is the whole server's divided by N (rounded up). ``/health`` and
``/metrics`` describe the worker the request reached (``asr_serve_worker``); the front spreads
successive idle requests over the workers in turn. SIGTERM or SIGINT to the front stops every worker
(each closes its streams with 1001). A worker that dies is logged and gets no more connections; the
front exits with status 1 once none is left. Unix only (descriptor passing).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import selectors
import signal
import socket
from dataclasses import dataclass
from typing import Any, Callable, Optional

log = logging.getLogger("asr.serve")

READY, CLOSED, FAILED, CONNECTION = b"R", b"C", b"E", b"F"
#: seconds the front waits for a worker to stop after SIGTERM, before SIGKILL
STOP_SECONDS = 15.0


@dataclass
class _Worker:
    index: int
    process: Any  # multiprocessing.Process
    channel: socket.socket
    connections: int = 0
    ready: bool = False
    alive: bool = True


def supported() -> Optional[str]:
    """None where workers can run here, else why not (one line)."""
    if not hasattr(socket, "send_fds") or not hasattr(socket, "AF_UNIX"):
        return "--workers needs Unix descriptor passing (Linux, macOS)"
    return None


class Front:
    """The accepting process: ``listener`` (bound, listening) handed out to ``n`` workers, each
    running ``worker_main(index, channel)`` in a forked child (it must send READY when serving)."""

    def __init__(self, listener: socket.socket, n: int, worker_main: Callable[[int, socket.socket], None]) -> None:
        self.listener = listener
        self.workers: list[_Worker] = []
        self._turn = 0
        self._stop = False
        ctx = multiprocessing.get_context("fork")
        for i in range(n):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            proc = ctx.Process(target=_child, args=(worker_main, i, theirs, listener, mine),
                               name=f"asr-serve-worker-{i}")
            proc.start()
            theirs.close()
            self.workers.append(_Worker(i, proc, mine))

    # ------------------------------------------------------------------ start-up
    def wait_ready(self) -> Optional[str]:
        """Block until every worker is READY; the first failure's message otherwise."""
        sel = selectors.DefaultSelector()
        for w in self.workers:
            sel.register(w.channel, selectors.EVENT_READ, w)
        try:
            while not all(w.ready for w in self.workers):
                if self._stop:
                    return "stopped while the workers were starting"
                for key, _ in sel.select(timeout=0.5):
                    w: _Worker = key.data
                    msg = w.channel.recv(4096)
                    if not msg:
                        return f"worker {w.index} exited while starting (status {w.process.exitcode})"
                    if msg[:1] == FAILED:
                        return msg[1:].decode(errors="replace")
                    if msg[:1] == READY:
                        w.ready = True
        finally:
            sel.close()
        return None

    # ------------------------------------------------------------------ serving
    def serve(self) -> int:
        """Accept and hand out connections until SIGTERM/SIGINT (0) or every worker died (1)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.listener.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, None)
        for w in self.workers:
            w.channel.setblocking(False)
            sel.register(w.channel, selectors.EVENT_READ, w)
        try:
            while not self._stop:
                for key, _ in sel.select(timeout=0.5):
                    if key.data is None:
                        self._accept()
                    else:
                        self._from_worker(key.data, sel)
                if not any(w.alive for w in self.workers):
                    log.error("every worker has exited")
                    return 1
        finally:
            sel.close()
            self.stop()
        return 0

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:  # out of descriptors and the like: the client gets a reset
            log.warning("accept failed: %s", err)
            return
        with conn:
            for w in self._order():
                try:
                    socket.send_fds(w.channel, [CONNECTION], [conn.fileno()])
                except OSError as err:
                    log.warning("worker %d does not take connections (%s)", w.index, err)
                    w.alive = False
                    continue
                w.connections += 1
                return
        log.warning("no worker alive to take a connection")

    def _order(self) -> list[_Worker]:
        """Alive workers, fewest connections first; ties start at a rotating worker."""
        self._turn = (self._turn + 1) % len(self.workers)
        rotated = self.workers[self._turn:] + self.workers[: self._turn]
        return sorted((w for w in rotated if w.alive), key=lambda w: w.connections)  # stable: the rotation breaks ties

    def _from_worker(self, w: _Worker, sel: selectors.BaseSelector) -> None:
        try:
            msg = w.channel.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            msg = b""
        if not msg:
            w.process.join(timeout=1.0)
            level = logging.INFO if self._stop or w.process.exitcode == 0 else logging.ERROR
            log.log(level, "worker %d exited (status %s); it gets no more connections", w.index, w.process.exitcode)
            w.alive = False
            sel.unregister(w.channel)
            return
        w.connections -= msg.count(CLOSED)

    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self._stop = True

    def stop(self) -> None:
        """SIGTERM every worker, wait up to STOP_SECONDS, then SIGKILL what is left."""
        for w in self.workers:
            if w.process.is_alive():
                os.kill(w.process.pid, signal.SIGTERM)
        for w in self.workers:
            w.process.join(timeout=STOP_SECONDS)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.channel.close()
        self.listener.close()


def _child(worker_main: Callable[[int, socket.socket], None], index: int, channel: socket.socket,
           listener: socket.socket, front_end: socket.socket) -> None:
    """The forked worker: drop the front's sockets, run ``worker_main``, exit with its status."""
    listener.close()
    front_end.close()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    worker_main(index, channel)


def tell(channel: socket.socket, what: bytes) -> None:
    """Send one message to the front (a worker gone from the front's view is not an error here)."""
    try:
        channel.send(what)
    except OSError:
        pass


def receive_connections(loop: Any, channel: socket.socket, server: Any, on_lost: Callable[[], None]) -> None:
    """In a worker's event loop: serve every connection the front hands over with aiohttp's
    ``server`` (``AppRunner.server``), reporting each one's end to the front; ``on_lost`` runs when
    the front itself is gone (the worker should stop)."""
    lost = server.connection_lost

    def connection_lost(handler: Any, exc: Optional[BaseException] = None) -> None:
        lost(handler, exc)
        tell(channel, CLOSED)

    server.connection_lost = connection_lost
    channel.setblocking(False)

    def on_message() -> None:
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(channel, 16, 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg, fds = b"", []
            if not msg:
                loop.remove_reader(channel.fileno())
                on_lost()
                return
            for fd in fds:
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                loop.create_task(_adopt(loop, server, sock, channel))

    loop.add_reader(channel.fileno(), on_message)


async def _adopt(loop: Any, server: Any, sock: socket.socket, channel: socket.socket) -> None:
    try:
        await loop.connect_accepted_socket(server, sock)
    except OSError as err:  # the client left between accept and here
        log.info("handed-over connection failed: %s", err)
        sock.close()
        tell(channel, CLOSED)

"""What a worker process gets from the supervisor, and its side of the control link.

:func:`kvrouter.server.app.run_server` takes a :class:`WorkerContext` in worker mode: it
builds the router with the worker's shared state (``Router(cfg, shared=worker.shared)``, a
:class:`~kvrouter.workers.sync.WorkerSync`), starts it (:meth:`WorkerContext.start`), binds
the listening sockets with ``SO_REUSEPORT`` and reports readiness to the supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from ssl import SSLContext

import orjson

from kvrouter.http.server import DEFAULT_LIMITS, HttpServer, Limits, Listener, serve_sockets
from kvrouter.http.sockets import Address, listening_sockets
from kvrouter.workers.sync import WorkerSync

log = logging.getLogger("kvrouter.workers")


class WorkerContext:
    """Worker ``number`` of ``count``: its addresses, control socket and sibling links."""

    def __init__(self, number: int, count: int, addrs: list[Address],
                 control: socket.socket, peers: dict[int, socket.socket],
                 share_prefix: bool = True) -> None:
        self.number = number
        self.count = count
        self.addrs = addrs
        self.control = control
        #: the routing state shared with the siblings: give it to the Router (``shared=``)
        self.shared = WorkerSync(number, count, peers, share_prefix=share_prefix)
        self._started = False
        self._events: tuple[asyncio.Event, asyncio.Event] | None = None   # (stop, hurry)
        self._asked = 0          # 1: drain and stop, 2: stop at once (before ``ready`` too)

    def start(self) -> None:
        """Start the links to the siblings and the control link (inside the worker's loop,
        once the Router is built with ``shared=self.shared``)."""
        self.shared.start()
        self._started = True
        self.control.setblocking(False)
        asyncio.get_running_loop().add_reader(self.control.fileno(), self._control_readable)

    async def listen(self, handler, max_body: int, ssl: SSLContext | None = None,
                     limits: Limits = DEFAULT_LIMITS) -> tuple[Listener, HttpServer]:
        """Bind the supervisor's addresses with SO_REUSEPORT (same contract as start_server)."""
        return serve_sockets(handler, listening_sockets(self.addrs, reuse_port=True),
                             max_body=max_body, ssl=ssl, limits=limits)

    def ready(self, stop: asyncio.Event, hurry: asyncio.Event) -> None:
        """Tell the supervisor this worker serves. ``stop`` (drain, then exit) is set when the
        supervisor says so or leaves, ``hurry`` (exit at once) when it says so again.

        The supervisor tells its workers over the control link rather than by signal: a
        SIGTERM sent to the whole process group or cgroup (Ctrl-C, systemd) would otherwise
        reach a worker twice, and the second one means "at once"."""
        self._events = (stop, hurry)
        if self._asked:
            self._ask(self._asked)
            return
        try:
            self.control.send(orjson.dumps({"t": "ready", "pid": os.getpid()}))
        except OSError:
            stop.set()

    def _ask(self, level: int) -> None:
        self._asked = max(self._asked, level)
        if self._events is not None:
            for event in self._events[:self._asked]:
                event.set()

    def _control_readable(self) -> None:
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.control, 4096, 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg, fds = b"", []
            if not msg and not fds:
                self._supervisor_gone()
                return
            data = orjson.loads(msg) if msg else {}
            if data.get("t") == "peer" and self._started:
                for fd in fds:
                    self.shared.add_peer(int(data["w"]), socket.socket(fileno=fd))
            elif data.get("t") == "stop":
                self._ask(2 if data.get("now") else 1)
            else:
                for fd in fds:
                    os.close(fd)

    def _supervisor_gone(self) -> None:
        loop = asyncio.get_running_loop()
        if self.control.fileno() >= 0:
            loop.remove_reader(self.control.fileno())
        log.warning("worker %d: the supervisor is gone; stopping", self.number)
        self._ask(1)

    def close(self) -> None:
        self.shared.close()
        if self.control.fileno() >= 0:
            try:
                asyncio.get_running_loop().remove_reader(self.control.fileno())
            except RuntimeError:
                pass
            self.control.close()

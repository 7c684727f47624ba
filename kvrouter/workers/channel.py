"""Message links between the processes of one router: ``SOCK_SEQPACKET`` UNIX socket pairs
made by the supervisor (before the fork, or passed later with ``SCM_RIGHTS``), driven by the
event loop (``add_reader`` / ``add_writer``), never blocking it.

A *message* is one orjson-encoded batch of events (:mod:`kvrouter.workers.events`). SEQPACKET
keeps message boundaries, delivers in order and reports the peer's exit as end-of-file, so
there is no framing code beyond splitting messages larger than one packet: every packet
starts with a flag byte (:data:`WHOLE`, or :data:`MORE` … :data:`LAST` for the fragments of one
large message; a link has one writer, so fragments never interleave).

A peer that stops reading makes our sends queue (``EAGAIN``); the queue is bounded by
:data:`MAX_BACKLOG`, beyond which whole messages are dropped (and counted): every event kind
is either re-sent periodically (load, registry) or a routing hint (prefix records).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("kvrouter.workers")

WHOLE, MORE, LAST = b"\x00", b"\x01", b"\x02"
MAX_PACKET = 60 * 1024          # payload bytes per packet (well under the default 208 KiB sndbuf)
MAX_BACKLOG = 32 << 20          # queued bytes towards one peer before messages are dropped
READ_BATCH = 256                # packets read per readiness before yielding to the loop


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair for one link (SEQPACKET: ordered, reliable, message boundaries)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class Link:
    """One end of a link to another process: ``send`` complete messages; ``on_message(link,
    payload)`` is called for each received message and ``on_close(link)`` once at EOF/error."""

    def __init__(self, sock: socket.socket, peer: int,
                 on_message: Callable[[Link, bytes], None],
                 on_close: Callable[[Link], None]) -> None:
        self.sock = sock
        self.peer = peer
        self.on_message = on_message
        self.on_close = on_close
        self.closed = False
        self.dropped = 0                     # messages dropped because the peer lagged
        self._out: collections.deque[bytes] = collections.deque()
        self._out_bytes = 0
        self._parts: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False
        sock.setblocking(False)
        # per-link state kept by the sync layer (the peer's load share, counter totals …)
        self.state: dict = {}

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    # -- sending ---------------------------------------------------------------------------
    def send(self, payload: bytes) -> bool:
        """Queue one message; ``False`` if the link is closed or the message was dropped."""
        if self.closed:
            return False
        if len(payload) <= MAX_PACKET:
            packets = [WHOLE + payload]
        else:
            n = len(payload)
            packets = [MORE + payload[i:i + MAX_PACKET] for i in range(0, n, MAX_PACKET)]
            packets[-1] = LAST + packets[-1][1:]
        if self._out:
            if self._out_bytes > MAX_BACKLOG:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning("worker %d is not reading; %d sync messages dropped",
                                self.peer, self.dropped)
                return False
            self._queue(packets)
            return True
        sock = self.sock
        for i, packet in enumerate(packets):
            try:
                sock.send(packet)
            except (BlockingIOError, InterruptedError):
                self._queue(packets[i:])
                return True
            except OSError:
                self.close()
                return False
        return True

    def _queue(self, packets: list[bytes]) -> None:
        self._out.extend(packets)
        self._out_bytes += sum(len(p) for p in packets)
        if not self._writing and self._loop is not None:
            self._writing = True
            self._loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        out, sock = self._out, self.sock
        while out:
            try:
                sock.send(out[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            self._out_bytes -= len(out.popleft())
        self._writing = False
        if self._loop is not None:
            self._loop.remove_writer(sock.fileno())

    # -- receiving -------------------------------------------------------------------------
    def _readable(self) -> None:
        sock = self.sock
        for _ in range(READ_BATCH):
            try:
                data = sock.recv(MAX_PACKET + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            if not data:
                self.close()
                return
            flag = data[:1]
            if flag == WHOLE:
                self._deliver(data[1:])
            elif flag == MORE:
                self._parts.append(data[1:])
            else:
                self._parts.append(data[1:])
                payload = b"".join(self._parts)
                self._parts = []
                self._deliver(payload)
            if self.closed:
                return

    def _deliver(self, payload: bytes) -> None:
        try:
            self.on_message(self, payload)
        except Exception:  # one bad message must not stop the link
            log.exception("worker sync: failed to apply a message from worker %d", self.peer)

    # -- closing ---------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            if self._writing:
                self._loop.remove_writer(self.sock.fileno())
        self._out.clear()
        self.sock.close()
        self.on_close(self)

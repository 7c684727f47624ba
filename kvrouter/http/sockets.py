"""Sockets of the HTTP data plane: listening sockets (one process, or several worker processes
sharing a port with ``SO_REUSEPORT``) and the options of connected ones."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from collections.abc import Iterable

log = logging.getLogger("kvrouter.http")

Address = tuple[int, int, int, tuple]      # family, type, proto, sockaddr
FD_RESERVE = 128    # descriptors left for listening sockets, logs, probes, worker links


def stream_socket(family: int, type_: int, proto: int, *,
                  reuse_port: bool = False) -> socket.socket:
    """A listening-to-be socket: ``SO_REUSEADDR`` (and ``SO_REUSEPORT``: several worker
    processes on one port), IPv6 sockets IPv6-only."""
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


def bind(sock: socket.socket, addr: tuple) -> None:
    """``sock.bind(addr)``; the error names the address."""
    try:
        sock.bind(addr)
    except OSError as e:
        raise OSError(e.errno, f"error while attempting to bind on address {addr!r}: "
                               f"{(e.strerror or str(e)).lower()}") from None


def listening_sockets(addrs: Iterable[Address], *, backlog: int = 2048,
                      reuse_port: bool = False) -> list[socket.socket]:
    """Non-blocking listening sockets bound to ``addrs`` (all closed if one fails)."""
    sockets: list[socket.socket] = []
    try:
        for family, type_, proto, addr in addrs:
            sock = stream_socket(family, type_, proto, reuse_port=reuse_port)
            sockets.append(sock)
            bind(sock, addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """``TCP_NODELAY`` on a connection: small writes (headers, SSE events) leave at once."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass


def connection_cap(wanted: int) -> int:
    """``wanted`` client connections, or fewer if this process cannot open that many
    descriptors. The soft ``RLIMIT_NOFILE`` is raised to the hard one first (as Go, hence
    fd-router, does at startup); each proxied request also holds a connection to an instance,
    so clients get at most half of what :data:`FD_RESERVE` leaves."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):  # an unlimited hard limit above the kernel's nr_open
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    cap = max(1, (soft - FD_RESERVE) // 2)
    if cap < wanted:
        log.warning("server.max-connections %d lowered to %d: the process may open %d "
                    "descriptors (RLIMIT_NOFILE)", wanted, cap, soft)
    return min(wanted, cap)

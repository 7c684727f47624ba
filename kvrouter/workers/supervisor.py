"""``kvrouter --workers N``: the supervisor process.

It reserves the listening address (a bound, non-listening ``SO_REUSEPORT`` socket: it learns
the port when ``--port 0`` and keeps it while workers restart), makes one SEQPACKET link per
pair of workers plus one control link per worker, forks the N workers (each runs the whole
application and binds the address itself with ``SO_REUSEPORT``), prints ``Starting server on
<host>:<port>`` once all of them serve, forwards SIGTERM/SIGINT and waits for them: the first
signal makes every worker drain (``server.shutdown-grace-secs``, SIGKILL :data:`STOP_MARGIN`
seconds after it, more with tracing), a second one makes them exit at once. Both travel over
the control links (``{"t": "stop"}``), not as signals: a worker may get the same signal from
the terminal or from systemd (which signals the whole cgroup), and two signals would mean "at
once".

Why ``SO_REUSEPORT`` rather than one shared listening socket: with a shared socket every
worker is woken for each new connection and the first to call ``accept`` wins; kvrouter
accepts up to 256 connections per wake-up, so a burst of new keep-alive connections (a client
opening its pool) can land on one worker and stay there for the connections' lifetime. The
kernel's ``SO_REUSEPORT`` hash spreads connections evenly over the workers' own queues,
whatever each worker is busy with. The cost: a connection is bound to its worker even if that
worker is busier, and connections still queued in a worker's backlog when it dies are reset.

A worker that exits while the router runs is **restarted** (after 0.5 s, doubling up to 5 s);
more than :data:`MAX_RESTARTS` restarts within :data:`RESTART_WINDOW` seconds, or a worker
failing before the router first served, stops everything with exit status 1. The siblings
drop the dead worker's load share as soon as its link closes; the new one gets the registry,
the load shares and the prefix index from them. Only the workers started with the router add
the ``register.yaml`` entries read at startup: a restarted one gets the static instances as
its siblings have them (the file may have changed since), and a restarted worker 0 reads the
file again (:mod:`kvrouter.control.static`). Workers die with the supervisor (control link
end-of-file, and ``PR_SET_PDEATHSIG`` on Linux).
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import signal
import socket
import sys
import time
import traceback

import orjson

from kvrouter.config import RouterConfig
from kvrouter.http.sockets import Address, bind, stream_socket
from kvrouter.instance import InstanceInfo
from kvrouter.tracing import EXPORT_TIMEOUT_SECS, FLUSH_MILLIS
from kvrouter.workers.channel import socket_pair
from kvrouter.workers.worker import WorkerContext

log = logging.getLogger("kvrouter.workers")

STOP_MARGIN = 5.0          # SIGKILL this long after the workers' drain should have ended …
#: … plus, with tracing, the tracer's exit (kvrouter.tracing: a flush bounded by FLUSH_MILLIS,
#: then the shutdown's export of what is left, bounded by EXPORT_TIMEOUT_SECS)
TRACER_EXIT_SECS = FLUSH_MILLIS / 1000 + EXPORT_TIMEOUT_SECS
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
SHARE_PREFIX_ENV = "KVROUTER_SHARE_PREFIX"   # "0": workers keep separate prefix indexes


def reserve(host: str, port: int) -> list[socket.socket]:
    """Bind (without listening) every address ``host`` resolves to, as ``start_server``
    does. The port is first bound without ``SO_REUSEPORT`` so that a port another process
    already serves is refused (``EADDRINUSE``), never silently shared."""
    infos = socket.getaddrinfo(host or None, port, family=socket.AF_UNSPEC,
                               type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    out: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            probe = socket.socket(family, type_, proto)
            try:
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                bind(probe, addr)
                addr = probe.getsockname()          # the port chosen for port 0
            finally:
                probe.close()
            sock = stream_socket(family, type_, proto, reuse_port=True)
            out.append(sock)
            bind(sock, addr)
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out


def supervise(cfg: RouterConfig, static: list[InstanceInfo]) -> int:
    """Run ``server.workers`` worker processes until SIGTERM/SIGINT; returns the exit code."""
    s = cfg.server
    try:
        reserved = reserve(s.host, s.port or 0)
    except OSError as e:
        print(f"Failed to start server on {s.host}:{s.port}: {e}", file=sys.stderr)
        return 1
    try:
        return Supervisor(cfg, static, reserved).run()
    finally:
        for sock in reserved:
            sock.close()


class _Slot:
    """One worker position (0 … N-1) and its current process."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.pid: int | None = None
        self.control: socket.socket | None = None   # the supervisor's end
        self.ready = False
        self.restart_at: float | None = None
        self.restarts: collections.deque[float] = collections.deque()


class Supervisor:
    def __init__(self, cfg: RouterConfig, static: list[InstanceInfo],
                 reserved: list[socket.socket]) -> None:
        self.cfg = cfg
        self.static = static
        self.reserved = reserved
        self.addrs: list[Address] = [(r.family, r.type, r.proto, r.getsockname())
                                     for r in reserved]
        self.count = cfg.server.workers
        self.stop_margin = STOP_MARGIN + (TRACER_EXIT_SECS if cfg.tracing.enabled else 0.0)
        self.slots = [_Slot(k) for k in range(self.count)]
        self.share_prefix = os.environ.get(SHARE_PREFIX_ENV, "1") != "0"
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.announced = False
        self._wake_r, self._wake_w = os.pipe()

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> int:
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        handlers = {sig: signal.signal(sig, _noop)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            self._start_all()
            while True:
                self._step()
                if all(slot.pid is None for slot in self.slots) and (
                        self.stopping or self.exit_code):
                    break
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self._kill_all()
            self.selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        return self.exit_code

    def _step(self) -> None:
        now = time.monotonic()
        due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        timeout = 1.0
        if due:
            timeout = max(0.0, min(due) - now)
        if self.stopping:
            timeout = max(0.0, min(timeout, self.stop_deadline - now))
        for key, _ in self.selector.select(min(timeout, 1.0)):
            if key.data is None:
                self._signals()
            else:
                self._control(key.data)
        self._reap()
        now = time.monotonic()
        if self.stopping:
            if now >= self.stop_deadline:
                live = [slot.pid for slot in self.slots if slot.pid is not None]
                if live:
                    log.warning("workers %s still running after their shutdown grace: "
                                "killing them", live)
                self._kill_all()
            return
        for slot in self.slots:
            if slot.restart_at is not None and now >= slot.restart_at:
                slot.restart_at = None
                self._spawn(slot)
        if not self.announced and all(slot.ready for slot in self.slots):
            self.announced = True
            host = self.cfg.server.host
            shown = f"[{host}]" if ":" in host else host
            port = self.addrs[0][3][1]
            # one write (atomic on a pipe): the workers log to the same stdout
            sys.stdout.write(f"Starting server on {shown}:{port}\n")
            sys.stdout.flush()
            log.info("%d worker processes serving on %s:%d (pids %s)", self.count, shown, port,
                     ", ".join(str(slot.pid) for slot in self.slots))

    def _signals(self) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self.stopping:
                    self._hurry()
                else:
                    self.stop(f"signal {signal.Signals(signum).name}")

    def stop(self, why: str, code: int | None = None) -> None:
        if code is not None and not self.exit_code:
            self.exit_code = code
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = (time.monotonic() + self.cfg.server.shutdown_grace_secs
                              + self.stop_margin)
        log.info("stopping %d worker processes (%s)", self.count, why)
        for slot in self.slots:
            slot.restart_at = None
        self._tell_all({"t": "stop"})

    def _hurry(self) -> None:
        """A second signal while stopping: the workers exit at once."""
        log.info("second signal: the workers stop at once")
        self.stop_deadline = min(self.stop_deadline, time.monotonic() + self.stop_margin)
        self._tell_all({"t": "stop", "now": True})

    def _tell_all(self, msg: dict) -> None:
        """``msg`` over each worker's control link; SIGTERM (drain) to one without a link."""
        data = orjson.dumps(msg)
        for slot in self.slots:
            if slot.pid is None:
                continue
            try:
                if slot.control is None:
                    raise OSError("no control link")
                slot.control.send(data)
            except OSError:
                try:
                    os.kill(slot.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def _kill_all(self) -> None:
        """SIGKILL every worker and reap it."""
        for slot in self.slots:
            if slot.pid is not None:
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for slot in self.slots:
            if slot.pid is not None:
                try:
                    os.waitpid(slot.pid, 0)
                except ChildProcessError:
                    pass
                self._gone(slot)

    def _control(self, slot: _Slot) -> None:
        sock = slot.control
        if sock is None:
            return
        try:
            msg = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg = b""
        if not msg:
            self._close_control(slot)
            return
        data = orjson.loads(msg)
        if data.get("t") == "ready":
            slot.ready = True
            if self.announced:
                log.info("worker %d (pid %d) serving again", slot.number, slot.pid)

    def _close_control(self, slot: _Slot) -> None:
        if slot.control is not None:
            self.selector.unregister(slot.control)
            slot.control.close()
            slot.control = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            was_ready = slot.ready
            self._gone(slot)
            if self.stopping:
                continue
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
            if not self.announced:
                print(f"worker {slot.number} exited during startup ({how})", file=sys.stderr)
                self.stop("a worker failed to start", code=1)
                continue
            now = time.monotonic()
            slot.restarts.append(now)
            while slot.restarts and now - slot.restarts[0] > RESTART_WINDOW:
                slot.restarts.popleft()
            if len(slot.restarts) > MAX_RESTARTS:
                log.error("worker %d (pid %d) exited (%s): %d restarts within %gs; stopping",
                          slot.number, pid, how, MAX_RESTARTS, RESTART_WINDOW)
                self.stop("too many worker restarts", code=1)
                continue
            delay = min(5.0, 0.5 * 2 ** (len(slot.restarts) - 1))
            log.error("worker %d (pid %d) exited (%s%s); restarting it in %gs", slot.number,
                      pid, how, "" if was_ready else " before serving", delay)
            slot.restart_at = now + delay

    def _gone(self, slot: _Slot) -> None:
        slot.pid = None
        slot.ready = False
        self._close_control(slot)

    # -- starting workers ------------------------------------------------------------------
    def _start_all(self) -> None:
        links: dict[int, dict[int, socket.socket]] = {k: {} for k in range(self.count)}
        for i in range(self.count):
            for j in range(i + 1, self.count):
                a, b = socket_pair()
                links[i][j] = a
                links[j][i] = b
        try:
            for slot in self.slots:
                self._fork(slot, links[slot.number], others=links, static=self.static)
        finally:
            for peers in links.values():
                for sock in peers.values():
                    sock.close()

    def _spawn(self, slot: _Slot) -> None:
        """Restart one worker: new links to every live sibling (their ends go over the
        siblings' control links)."""
        peers: dict[int, socket.socket] = {}
        theirs: dict[int, socket.socket] = {}
        for other in self.slots:
            if other is not slot and other.pid is not None and other.control is not None:
                mine, their = socket_pair()
                peers[other.number] = mine
                theirs[other.number] = their
        try:
            # no static list: the startup one may be stale (the siblings' copy and worker 0's
            # file watch are current), and its entries would be re-added under newer versions
            # than the removals' tombstones
            self._fork(slot, peers, others={-1: theirs}, static=[])
            for number, sock in theirs.items():
                ctrl = self.slots[number].control
                if ctrl is None:        # that sibling just exited: it gets a new link later
                    continue
                try:
                    socket.send_fds(ctrl, [orjson.dumps({"t": "peer", "w": slot.number})],
                                    [sock.fileno()])
                except OSError as e:
                    log.warning("could not link worker %d to worker %d: %s", number,
                                slot.number, e)
        finally:
            for sock in (*peers.values(), *theirs.values()):
                sock.close()

    def _fork(self, slot: _Slot, peers: dict[int, socket.socket],
              others: dict[int, dict[int, socket.socket]], static: list[InstanceInfo]) -> None:
        sup_end, worker_end = socket_pair()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:                                        # the worker
            code = 1
            try:
                keep = {s.fileno() for s in peers.values()} | {worker_end.fileno()}
                self._child_cleanup(keep, others, sup_end)
                ctx = WorkerContext(slot.number, self.count, self.addrs, worker_end, peers,
                                    share_prefix=self.share_prefix)
                from kvrouter.server.app import serve
                code = serve(self.cfg, static, worker=ctx)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # report and exit, never return to the loop
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        worker_end.close()
        sup_end.setblocking(False)
        slot.pid = pid
        slot.control = sup_end
        slot.ready = False
        self.selector.register(sup_end, selectors.EVENT_READ, slot)

    def _child_cleanup(self, keep: set[int], others: dict[int, dict[int, socket.socket]],
                       sup_end: socket.socket) -> None:
        """In a new worker: default signal handling, and no descriptor it must not hold."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        _die_with_parent()
        sup_end.close()
        for peers in others.values():
            for sock in peers.values():
                if sock.fileno() not in keep:
                    sock.close()
        for slot in self.slots:
            if slot.control is not None:
                slot.control.close()
        for sock in self.reserved:
            sock.close()
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        import random
        random.seed()


def _noop(signum, frame) -> None:
    """Signals are handled from the wake-up pipe in the main loop."""


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the supervisor dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)        # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:                    # the supervisor died before prctl
        os.kill(os.getpid(), signal.SIGTERM)

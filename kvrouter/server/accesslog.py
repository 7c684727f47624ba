"""The access log (docs/fastdeploy.md#logs): ``[METHOD] <path> <proto> <status> <latency>
<client_ip>`` at INFO on the ``kvrouter.access`` logger, written in batches.

A ``logging`` call per request costs ~15-25 µs here (record, caller lookup, formatting, one
``write`` + ``flush`` per line). Instead each finished request appends its line (with its own
timestamp) to a buffer, and the buffer is written every :data:`FLUSH_SECS` through the handlers
that ``kvrouter.access`` reaches, one ``write`` per handler and batch: lines in kvrouter's own log
format (:mod:`kvrouter.logsetup`) are formatted directly with a per-second timestamp cache, other
formatters get real ``LogRecord`` objects, and JSON lines (``log.format: json``) are encoded
directly with the line's fields (``method``, ``path``, ``protocol``, ``status``, ``latency_ms``,
``client``). Nothing at all happens per request when INFO is off for ``kvrouter.access``. Lines
may appear up to :data:`FLUSH_SECS` after other log lines written meanwhile; their timestamps
are the requests' end times. A path with control characters is written escaped, so a request
cannot forge log lines.

Routine polling (unchanged heartbeats, the dashboard's state) is logged at DEBUG instead, one
record each (:meth:`AccessLog.debug`), so that it does not drown the requests at INFO.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from logging.handlers import RotatingFileHandler, TimedRotatingFileHandler

import orjson

from kvrouter.logsetup import DATE_FORMAT, LOG_FORMAT, JsonFormatter, utc_stamp

LOGGER = "kvrouter.access"
FLUSH_SECS = 0.05
MAX_PENDING = 2000
MAX_SHOWN = 256          # paths (of at most MAX_SHOWN characters) whose written form is kept
INFO = logging.INFO

#: one finished request: end time, method, path, HTTP version, status, seconds, client address
Entry = tuple[float, str, str, str, int, float, str]


def _fields(e: Entry) -> dict[str, object]:
    return {"method": e[1], "path": e[2], "protocol": f"HTTP/{e[3]}", "status": e[4],
            "latency_ms": round(e[5] * 1e3, 3), "client": e[6]}


class AccessLog:
    """Buffered access log lines for one event loop."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(LOGGER)
        #: ``enabled()``: whether INFO is on for ``kvrouter.access`` (asked per request)
        self.enabled: Callable[[], bool] = partial(self.logger.isEnabledFor, INFO)
        self.pending: list[Entry] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""
        #: path → how the log writes it (escaped if it has control characters): the check
        #: costs more than a lookup, and a router sees few distinct paths; only the first
        #: MAX_SHOWN short ones are kept, so clients cannot grow it
        self._shown: dict[str, str] = {}

    def _line(self, e: Entry) -> str:
        path = e[2]
        shown = self._shown.get(path)
        if shown is None:
            shown = path if path.isprintable() else path.encode("unicode_escape").decode("ascii")
            if len(self._shown) < MAX_SHOWN and len(path) <= MAX_SHOWN:
                self._shown[path] = shown
        return f"[{e[1]}] {shown} HTTP/{e[3]} {e[4]} {e[5] * 1e3:.3f}ms {e[6]}"

    def add(self, method: str, path: str, version: str, status: int, elapsed: float,
            peer: str) -> None:
        self.pending.append((time.time(), method, path, version, status, elapsed, peer))
        if len(self.pending) >= MAX_PENDING:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECS, self.flush)

    def debug(self, method: str, path: str, version: str, status: int, elapsed: float,
              peer: str) -> None:
        """The line of a routine poll, at DEBUG (written at once: polls are rare)."""
        if self.logger.isEnabledFor(logging.DEBUG):
            entry = (time.time(), method, path, version, status, elapsed, peer)
            self.logger.debug(self._line(entry), extra={"fields": _fields(entry)})

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        entries, self.pending = self.pending, []
        if not entries:
            return
        records: list[logging.LogRecord] | None = None
        for handler in self._handlers():
            if handler.filters or not isinstance(handler, logging.StreamHandler):
                records = records or self._records(entries)
                for record in records:
                    handler.handle(record)
                continue
            fmt = handler.formatter
            if type(fmt) is JsonFormatter:
                text = self._json_lines(entries, handler.terminator)
                last = None
            elif (fmt is not None and fmt._fmt == LOG_FORMAT and fmt.datefmt == DATE_FORMAT
                    and fmt.converter is time.localtime):
                text = self._fast_lines(entries, handler.terminator)
                last = None
            else:
                records = records or self._records(entries)
                text = "".join(handler.format(r) + handler.terminator for r in records)
                last = records[-1]
            self._write(handler, text, last, entries[-1])

    def _handlers(self) -> list[logging.Handler]:
        """The handlers an INFO record of ``kvrouter.access`` reaches (as ``callHandlers``)."""
        out: list[logging.Handler] = []
        logger: logging.Logger | None = self.logger
        while logger is not None:
            out.extend(h for h in logger.handlers if h.level <= INFO)
            if not logger.propagate:
                break
            logger = logger.parent
        if not out and logging.lastResort is not None and logging.lastResort.level <= INFO:
            out.append(logging.lastResort)
        return out

    def _fast_lines(self, entries: list[Entry], terminator: str) -> str:
        parts = []
        for e in entries:
            created = e[0]
            sec = int(created)
            if sec != self._second:
                self._second = sec
                self._stamp = time.strftime(DATE_FORMAT, time.localtime(sec))
            parts.append(f"{self._stamp}.{int((created - sec) * 1000):03d} INFO {LOGGER}: "
                         f"{self._line(e)}{terminator}")
        return "".join(parts)

    def _json_lines(self, entries: list[Entry], terminator: str) -> str:
        """What :class:`JsonFormatter` writes for each entry, without a ``LogRecord``."""
        return "".join(orjson.dumps({"time": utc_stamp(e[0]), "level": "info",
                                     "logger": LOGGER, "message": self._line(e), **_fields(e)}
                                    ).decode() + terminator for e in entries)

    def _records(self, entries: list[Entry]) -> list[logging.LogRecord]:
        records = []
        for e in entries:
            created = e[0]
            r = self.logger.makeRecord(LOGGER, INFO, __file__, 0, self._line(e), (), None,
                                       extra={"fields": _fields(e)})
            r.created = created
            r.msecs = int((created - int(created)) * 1000) + 0.0
            records.append(r)
        return records

    def _write(self, handler: logging.StreamHandler, text: str,
               record: logging.LogRecord | None, last: Entry) -> None:
        """Write a batch; ``record`` (of ``last``, the batch's last entry) is made only if a
        rotating handler or an error asks for one."""
        handler.acquire()
        try:
            if isinstance(handler, RotatingFileHandler | TimedRotatingFileHandler):
                record = record or self._records([last])[0]
                if handler.shouldRollover(record):
                    handler.doRollover()
            if handler.stream is None:  # a FileHandler opened lazily
                handler.stream = handler._open()  # type: ignore[attr-defined]
            handler.stream.write(text)
            handler.flush()
        except Exception:
            handler.handleError(record or self._records([last])[0])
        finally:
            handler.release()

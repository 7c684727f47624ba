"""The access log (docs/fastdeploy.md#logs): ``[METHOD] <path> <proto> <status> <latency>
<client_ip>`` at INFO on the ``kvrouter.access`` logger, written in batches.

A ``logging`` call per request costs ~15-25 µs here (record, caller lookup, formatting, one
``write`` + ``flush`` per line). Instead each finished request appends its line (with its own
timestamp) to a buffer, and the buffer is written every :data:`FLUSH_SECS` through the handlers
that ``kvrouter.access`` reaches, one ``write`` per handler and batch: lines in kvrouter's own log
format (:mod:`kvrouter.logsetup`) are formatted directly with a per-second timestamp cache, other
formatters get real ``LogRecord`` objects. Nothing at all happens per request when INFO is off
for ``kvrouter.access``. Lines may appear up to :data:`FLUSH_SECS` after other log lines written
meanwhile; their timestamps are the requests' end times.
"""

from __future__ import annotations

import asyncio
import logging
import time
from logging.handlers import RotatingFileHandler, TimedRotatingFileHandler

from kvrouter.logsetup import DATE_FORMAT, LOG_FORMAT

LOGGER = "kvrouter.access"
FLUSH_SECS = 0.05
MAX_PENDING = 2000
INFO = logging.INFO


class AccessLog:
    """Buffered access log lines for one event loop."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(LOGGER)
        self.pending: list[tuple[float, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(INFO)

    def add(self, method: str, path: str, version: str, status: int, elapsed: float,
            peer: str) -> None:
        line = f"[{method}] {path} HTTP/{version} {status} {elapsed * 1e3:.3f}ms {peer}"
        self.pending.append((time.time(), line))
        if len(self.pending) >= MAX_PENDING:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECS, self.flush)

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
            if (fmt is not None and fmt._fmt == LOG_FORMAT and fmt.datefmt == DATE_FORMAT
                    and fmt.converter is time.localtime):
                text = self._fast_lines(entries, handler.terminator)
                last = None
            else:
                records = records or self._records(entries)
                text = "".join(handler.format(r) + handler.terminator for r in records)
                last = records[-1]
            self._write(handler, text, last or self._records(entries[-1:])[0])

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

    def _fast_lines(self, entries: list[tuple[float, str]], terminator: str) -> str:
        parts = []
        for created, msg in entries:
            sec = int(created)
            if sec != self._second:
                self._second = sec
                self._stamp = time.strftime(DATE_FORMAT, time.localtime(sec))
            parts.append(f"{self._stamp}.{int((created - sec) * 1000):03d} INFO {LOGGER}: "
                         f"{msg}{terminator}")
        return "".join(parts)

    def _records(self, entries: list[tuple[float, str]]) -> list[logging.LogRecord]:
        records = []
        for created, msg in entries:
            r = self.logger.makeRecord(LOGGER, INFO, __file__, 0, msg, (), None)
            r.created = created
            r.msecs = int((created - int(created)) * 1000) + 0.0
            records.append(r)
        return records

    @staticmethod
    def _write(handler: logging.StreamHandler, text: str, record: logging.LogRecord) -> None:
        handler.acquire()
        try:
            if (isinstance(handler, RotatingFileHandler | TimedRotatingFileHandler)
                    and handler.shouldRollover(record)):
                handler.doRollover()
            if handler.stream is None:  # a FileHandler opened lazily
                handler.stream = handler._open()  # type: ignore[attr-defined]
            handler.stream.write(text)
            handler.flush()
        except Exception:
            handler.handleError(record)
        finally:
            handler.release()

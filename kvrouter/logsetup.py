"""Logging setup (``log.*`` in docs/fastdeploy.md#configuration, docs/fastdeploy.md#logs): level,
stdout or a daily-rotated file, text or JSON lines (``log.format``)."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from logging.handlers import TimedRotatingFileHandler
from pathlib import Path

import orjson

from kvrouter.config import LogConfig

LOGGER_NAME = "kvrouter"
LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}

_cleanup_stop: threading.Event | None = None

#: ``[request_id:<id>]`` / ``[session_id:<id>]`` at the start of a message
_TAG_RE = re.compile(r"\[(request_id|session_id):([^\]\s]{1,256})\] ?")


def utc_stamp(created: float) -> str:
    """``2026-11-21T19:20:00.123Z``: a record's time for machines (UTC, milliseconds)."""
    sec = int(created)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            + f".{int((created - sec) * 1000):03d}Z")


def split_tags(message: str) -> tuple[str, dict[str, str]]:
    """The message without its leading request tags, and the tags as fields."""
    tags: dict[str, str] = {}
    while (m := _TAG_RE.match(message)) is not None:
        tags[m.group(1)] = m.group(2)
        message = message[m.end():]
    return message, tags


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, the request
    tags as ``request_id`` / ``session_id``, the ``fields`` a record carries (the access log's
    ``method``, ``path``, ``status``, …) and ``exception``. Log shippers parse it without a
    pattern, and a message can never break a line (newlines are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        message, tags = split_tags(record.getMessage())
        out: dict[str, object] = {"time": utc_stamp(record.created),
                                  "level": record.levelname.lower(), "logger": record.name,
                                  "message": message, **tags}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return orjson.dumps(out, default=str).decode()


def log_file_path() -> Path:
    """``$FD_LOG_DIR/router.log`` if that variable is set, else ``logs/router.log`` (CWD)."""
    return Path(os.environ.get("FD_LOG_DIR") or "logs") / "router.log"


def setup_logging(cfg: LogConfig) -> None:
    """Configure the ``kvrouter`` logger tree; with ``output: file`` also start log retention.

    Lines look like ``2026-11-21 19:20:00.123 INFO kvrouter.x: message``, or with
    ``format: json`` like :class:`JsonFormatter`'s. Calling it again replaces the previous
    handler (and retention thread).
    """
    global _cleanup_stop
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    if _cleanup_stop is not None:
        _cleanup_stop.set()
        _cleanup_stop = None

    handler: logging.Handler
    if cfg.output == "file":
        path = log_file_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = TimedRotatingFileHandler(path, when="midnight", encoding="utf-8")
        _cleanup_stop = _start_cleanup(cfg)
    else:
        handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if cfg.format == "json"
                         else logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(LEVELS[cfg.level])
    logger.propagate = False


def cleanup_logs(cfg: LogConfig) -> list[Path]:
    """Delete rotated ``router.log.*`` files older than ``max-age-days``, then the oldest ones
    until all log files (the live one included) fit in ``max-total-size-mb``. Returns the
    deleted paths.
    """
    live = log_file_path()
    rotated: list[tuple[float, int, Path]] = []
    for path in live.parent.glob(live.name + ".*"):
        try:
            stat = path.stat()
        except OSError:
            continue
        rotated.append((stat.st_mtime, stat.st_size, path))
    rotated.sort()

    removed: list[Path] = []
    cutoff = time.time() - cfg.max_age_days * 86400
    kept = []
    for mtime, size, path in rotated:
        if mtime < cutoff and _unlink(path):
            removed.append(path)
        else:
            kept.append((size, path))

    total = (live.stat().st_size if live.exists() else 0) + sum(size for size, _ in kept)
    limit = cfg.max_total_size_mb * 1024 * 1024
    for size, path in kept:
        if total <= limit:
            break
        if _unlink(path):
            removed.append(path)
            total -= size
    return removed


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return True
    except OSError as exc:
        logging.getLogger(__name__).warning("cannot delete old log file %s: %s", path, exc)
        return False
    return True


def _start_cleanup(cfg: LogConfig) -> threading.Event:
    """Run :func:`cleanup_logs` now and then every ``cleanup-interval-secs`` in a daemon thread."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            try:
                cleanup_logs(cfg)
            except OSError as exc:
                logging.getLogger(__name__).warning("log cleanup failed: %s", exc)
            if stop.wait(cfg.cleanup_interval_secs):
                return

    threading.Thread(target=loop, name="kvrouter-log-cleanup", daemon=True).start()
    return stop

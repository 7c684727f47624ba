"""Logging setup (``log.*`` in docs/fastdeploy.md#configuration, docs/fastdeploy.md#logs): level,
stdout or a daily-rotated file."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from logging.handlers import TimedRotatingFileHandler
from pathlib import Path

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


def log_file_path() -> Path:
    """``$FD_LOG_DIR/router.log`` if that variable is set, else ``logs/router.log`` (CWD)."""
    return Path(os.environ.get("FD_LOG_DIR") or "logs") / "router.log"


def setup_logging(cfg: LogConfig) -> None:
    """Configure the ``kvrouter`` logger tree; with ``output: file`` also start log retention.

    Lines look like ``2026-11-21 19:20:00.123 INFO kvrouter.x: message``. Calling it again
    replaces the previous handler (and retention thread).
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
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
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

"""Parsing a FastDeploy ``/metrics`` page into a :class:`MetricsSnapshot` (contract §6.3).

Prometheus text exposition format. Only the few series the policies use are read; every other
line is skipped after a cheap name check. All series of one name (any labels) are summed;
values may be floats with exponents; ``NaN`` and infinities count as missing.
``fastdeploy:num_requests_running`` and ``fastdeploy:num_requests_waiting`` are required.
"""

from __future__ import annotations

import math

from kvrouter.snapshot import MetricsSnapshot

__all__ = ["parse_fd_metrics"]

RUNNING = "fastdeploy:num_requests_running"
WAITING = "fastdeploy:num_requests_waiting"
AVAILABLE_BLOCKS = "fastdeploy:available_gpu_block_num"
AVAILABLE_BLOCKS_BARE = "available_gpu_block_num"
MAX_BATCH = "fastdeploy:max_batch_size"
CACHE_USAGE = "fastdeploy:gpu_cache_usage_perc"

_WANTED = frozenset({RUNNING, WAITING, AVAILABLE_BLOCKS, AVAILABLE_BLOCKS_BARE, MAX_BATCH, CACHE_USAGE})
_isfinite = math.isfinite


def _value_after_labels(line: str, start: int) -> str | None:
    """The text after the ``{…}`` label set opening at ``line[start]`` (quotes respected)."""
    i = start + 1
    n = len(line)
    in_quotes = False
    while i < n:
        c = line[i]
        if in_quotes:
            if c == "\\":
                i += 1
            elif c == '"':
                in_quotes = False
        elif c == '"':
            in_quotes = True
        elif c == "}":
            return line[i + 1 :]
        i += 1
    return None


def parse_fd_metrics(text: str, taken_at: float) -> MetricsSnapshot | None:
    """The snapshot carried by a ``/metrics`` page, or ``None`` if a required series is missing."""
    sums: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] == "#":
            continue
        # Name: up to the label set or the first whitespace.
        brace = line.find("{")
        space = line.find(" ")
        tab = line.find("\t")
        if tab != -1 and (space == -1 or tab < space):
            space = tab
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace].rstrip()
            if name not in _WANTED:
                continue
            rest = _value_after_labels(line, brace)
            if rest is None:
                continue
        else:
            if space == -1:
                continue
            name = line[:space]
            if name not in _WANTED:
                continue
            rest = line[space:]
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if not _isfinite(value):
            continue  # NaN (and ±Inf) = missing
        sums[name] = sums.get(name, 0.0) + value

    running = sums.get(RUNNING)
    waiting = sums.get(WAITING)
    if running is None or waiting is None:
        return None
    blocks = sums.get(AVAILABLE_BLOCKS)
    if blocks is None:
        blocks = sums.get(AVAILABLE_BLOCKS_BARE)
    return MetricsSnapshot(
        running=running,
        waiting=waiting,
        taken_at=taken_at,
        available_gpu_block_num=blocks,
        max_batch_size=sums.get(MAX_BATCH),
        gpu_cache_usage_perc=sums.get(CACHE_USAGE),
    )

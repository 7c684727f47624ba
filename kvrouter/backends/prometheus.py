"""Reading gauges from a Prometheus text exposition page (an engine's ``/metrics``).

Only the wanted series are read; every other line is skipped after a cheap name check. All
series of one name (any labels) are summed; values may be floats with exponents; ``NaN`` and
infinities count as missing. Which names an engine serves is in :mod:`kvrouter.backends.engines`.
"""

from __future__ import annotations

import math
from collections.abc import Set

__all__ = ["sum_gauges"]

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


def sum_gauges(text: str, wanted: Set[str]) -> dict[str, float]:
    """The finite value of each ``wanted`` series on the page, all series of a name summed;
    names the page does not carry (or only as NaN/±Inf) are absent."""
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
            if name not in wanted:
                continue
            rest = _value_after_labels(line, brace)
            if rest is None:
                continue
        else:
            if space == -1:
                continue
            name = line[:space]
            if name not in wanted:
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
    return sums

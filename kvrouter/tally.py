"""Records of counters that add up field by field.

Routers that share state sum each other's counters: the in-flight load of an instance
(:class:`kvrouter.load.LoadShare`) and the totals behind the ``[stats]`` line
(:class:`kvrouter.metrics.StatsTotals`). Both are a :class:`Tally`, so the arithmetic is
written once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Self


@dataclass(slots=True)
class Tally:
    """Base of slotted dataclasses whose fields are all numbers: ``+`` and ``-`` work field by
    field, a tally is false when every field is 0, and :meth:`as_list` gives the values in
    field order (the order of positional construction). Values: an operation makes a new one.
    """

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The field names, in order."""
        return _names(cls)

    def as_list(self) -> list:
        return [getattr(self, name) for name in _names(type(self))]

    def _of(self, values: list) -> Self:
        return type(self)(*values)      # positional construction: field order

    def __add__(self, other: Self) -> Self:
        return self._of([a + b for a, b in zip(self.as_list(), other.as_list(), strict=True)])

    def __sub__(self, other: Self) -> Self:
        return self._of([a - b for a, b in zip(self.as_list(), other.as_list(), strict=True)])

    def __bool__(self) -> bool:
        return any(self.as_list())


_NAMES: dict[type, tuple[str, ...]] = {}


def _names(cls: type) -> tuple[str, ...]:
    """A tally class's field names, read once (``fields()`` is slow, and routers that share
    state sum tallies on every load change)."""
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in fields(cls))
    return names

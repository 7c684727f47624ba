"""The prefix index: which instance recently received which prefix block (contract §6.4).

Logically a map ``block hash → {instance identity: last recorded time}``. It is stored as one
``OrderedDict`` keyed by a single integer that packs the (instance, block) pair, kept in
*record order*: a ``record`` call re-inserts its blocks deepest first, so the oldest call's
deepest block sits at the front. This gives, with O(1) work per entry:

* capacity eviction: pop from the front: least recently recorded first and, within one call,
  the deepest block first, so shared prefixes (re-recorded by every call) survive;
* TTL sweep: pop from the front while expired (``now`` must come from one monotonic clock);
* prefix-closed sets: a block is always recorded together with, and evicted before, all of
  its ancestors, so the blocks held for an instance form a prefix of every recorded chain.
  ``match`` exploits this with a binary search (O(log n) lookups per instance).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

__all__ = ["PrefixIndex", "EVICTION_REASONS"]

EVICTION_REASONS = ("ttl", "capacity", "instance_removed")
_SHIFT = 64  # block hashes are 64-bit; the instance number lives above them


class PrefixIndex:
    """Bounded, TTL-expiring map of block hashes to the instances that hold them."""

    __slots__ = ("max_entries", "ttl_secs", "_entries", "_ids", "evictions")

    def __init__(self, max_entries: int, ttl_secs: float) -> None:
        self.max_entries = max(0, int(max_entries))
        self.ttl_secs = max(0.0, float(ttl_secs))   # 0 = no age expiry
        # key = (instance number << 64) | block hash, value = last recorded time
        self._entries: OrderedDict[int, float] = OrderedDict()
        self._ids: dict[str, int] = {}
        #: cumulative evicted (hash, instance) entries per reason, for Prometheus counters
        self.evictions: dict[str, int] = dict.fromkeys(EVICTION_REASONS, 0)

    # ------------------------------------------------------------------ queries
    @property
    def size(self) -> int:
        """Number of (block, instance) entries held."""
        return len(self._entries)

    def match(self, hashes: Sequence[int], identities: Iterable[str]) -> dict[str, int]:
        """For each identity, the number of leading ``hashes`` recorded for it.

        ``hashes`` must be a hash chain (:func:`~kvrouter.prefix.hashing.block_hashes`): the
        binary search relies on each hash identifying its whole prefix. Lookups do not
        refresh timestamps.
        """
        entries = self._entries
        n = len(hashes)
        result: dict[str, int] = {}
        for ident in identities:
            num = self._ids.get(ident)
            if num is None or n == 0:
                result[ident] = 0
                continue
            base = num << _SHIFT
            if (base | hashes[0]) not in entries:
                result[ident] = 0
            elif (base | hashes[-1]) in entries:
                result[ident] = n
            else:
                lo, hi = 1, n - 1          # hashes[:lo] present, hashes[hi] absent
                while lo < hi:
                    mid = (lo + hi) // 2
                    if (base | hashes[mid]) in entries:
                        lo = mid + 1
                    else:
                        hi = mid
                result[ident] = lo
        return result

    def instance_blocks(self, identity: str) -> int:
        """Number of entries held for one instance (O(size); for debugging and tests)."""
        num = self._ids.get(identity)
        if num is None:
            return 0
        return sum(1 for key in self._entries if key >> _SHIFT == num)

    # ---------------------------------------------------------------- mutations
    def record(self, hashes: Sequence[int], identity: str, now: float) -> None:
        """Mark ``identity`` as holding every block of ``hashes`` as of ``now``."""
        if not hashes or self.max_entries == 0:
            return
        num = self._ids.get(identity)
        if num is None:
            num = self._ids[identity] = len(self._ids)
        base = num << _SHIFT
        entries = self._entries
        pop = entries.pop
        for h in reversed(hashes):           # deepest first: evicted first among equals
            key = base | h
            pop(key, None)
            entries[key] = now
        overflow = len(entries) - self.max_entries
        if overflow > 0:
            popitem = entries.popitem
            for _ in range(overflow):
                popitem(last=False)
            self.evictions["capacity"] += overflow

    def sweep(self, now: float) -> int:
        """Drop entries recorded more than ``ttl_secs`` before ``now``; return how many."""
        if self.ttl_secs <= 0 or not self._entries:
            return 0
        cutoff = now - self.ttl_secs
        entries = self._entries
        popitem = entries.popitem
        removed = 0
        while entries:
            key = next(iter(entries))
            if entries[key] >= cutoff:
                break
            popitem(last=False)
            removed += 1
        self.evictions["ttl"] += removed
        return removed

    def remove_instance(self, identity: str) -> int:
        """Purge every entry of one instance (it left the registry); return how many."""
        num = self._ids.get(identity)
        if num is None:
            return 0
        entries = self._entries
        doomed = [key for key in entries if key >> _SHIFT == num]
        for key in doomed:
            del entries[key]
        self.evictions["instance_removed"] += len(doomed)
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()

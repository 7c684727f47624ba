"""The prefix index: which instance recently received which prefix block
(docs/fastdeploy.md#cache-aware-routing).

Logically a map ``block hash → {instance identity: last recorded time}``, bounded to
``max_entries`` (block, instance) *entries*, with a TTL. It is stored in a few flat numpy arrays
(33–59 bytes per entry when full depending on where the cap falls between powers of two, 40 at
the default 200 000-entry cap, against ~140 for the former ``OrderedDict`` of Python ints), and
every operation on one request is a handful of vectorised calls, whatever the prompt length or
the number of candidates:

* **table**: an open-addressing hash table of 16-slot buckets. Slot key = ``h ^ salt(instance)``
  (a 64-bit per-instance salt), so one key stands for one (block, instance) entry; ``0`` marks a
  free slot. A key lives in its home bucket (top bits of ``key × φ``), or, if that bucket is
  full, in one of the next buckets (counted per home bucket, so lookups know when to look
  further). Deleting clears the slot: no tombstones. The table holds at most half its slots.
* **stamps**: every record call gives each of its blocks a new *stamp*, deepest block first,
  from one increasing counter; the slot keeps the stamp of its latest record, and the **ring**
  maps each stamp back to its slot. Stamps thus order entries exactly like the former
  ``OrderedDict``: by last record, and within one record call deepest first. A ring position is
  live while its slot still holds that stamp; refreshed entries leave stale positions behind,
  which the scans skip. When the ring is full, the live entries are re-stamped from 0 and
  rehashed (also how the table grows), O(live) vectorised work once per ~cap stamps.
* **calls**: per record call its first stamp, time and instance (for the TTL sweep and the
  per-instance purge).

Semantics (docs/fastdeploy.md#cache-aware-routing, with one change, batched capacity eviction):

* capacity: at most ``max_entries`` entries; on overflow the least recently recorded go first
  and, within one record call, the deepest block first, so shared prefixes (re-recorded by every
  call) survive. One change: when a record call overflows the cap, a batch of up to
  ``max_entries // 256`` (at most 4096) further oldest entries is evicted with it, so the
  eviction scan runs once per batch rather than on every request once the index is full
  (caps below 256 evict exactly the overflow);
* TTL sweep: entries last recorded more than ``ttl_secs`` before ``now`` are dropped, oldest
  first, stopping at the first record call that is not expired (``now`` must come from one
  monotonic clock);
* prefix-closed: a block is always recorded together with, and evicted before, all of its
  ancestors, so the blocks held for an instance form a prefix of every recorded chain. ``match``
  exploits this: every candidate × block pair at once for small queries, else the first block
  for every candidate, then every block (or a vectorised binary search, for many) for the
  instances holding it;
* lookups do not refresh; a removed instance's entries are purged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["EVICTION_REASONS", "PrefixIndex", "as_hash_array"]

EVICTION_REASONS = ("ttl", "capacity", "instance_removed")

_B = 16                        # slots per bucket
_LOG_B = 4
_MIN_BUCKETS = 8
_MAX_SPILL = 16                # buckets after a full home bucket that may take its keys
_ALL_PAIRS = 4096              # match: probe every holder × block pair up to this many
_FEW, _FEW_PAIRS = 4, 256      # … and every candidate × block pair for small queries
_MIN_RING = 1024
_SPILL_STEPS = np.arange(1, _MAX_SPILL + 1, dtype=np.int64)
_M64 = (1 << 64) - 1
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_U8 = np.uint64
_U4 = np.uint32


_OFFSETS: dict[int, np.ndarray] = {}


def _offsets(m: int) -> np.ndarray:
    """``arange(m) × 16``: the flat index of each row's first slot in an (m, 16) window."""
    off = np.arange(m, dtype=np.int64) * _B
    if m <= 8192:
        if len(_OFFSETS) > 256:
            _OFFSETS.clear()
        _OFFSETS[m] = off
    return off


def _salt(num: int) -> int:
    """splitmix64(num + 1): the key salt of instance number ``num`` (never 0)."""
    z = ((num + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) or 1


def _leading(flags: list[bool], start: int, n: int) -> int:
    """Number of leading ``True`` in ``flags[start:start + n]``."""
    try:
        return flags.index(False, start, start + n) - start
    except ValueError:
        return n


def _row_of(nums: np.ndarray, num: int) -> int:
    """Position of ``num`` in ``nums``, or -1."""
    hit = np.flatnonzero(nums == num) if len(nums) > 8 else None
    if hit is None:
        try:
            return nums.tolist().index(num)
        except ValueError:
            return -1
    return int(hit[0]) if len(hit) else -1


def as_hash_array(hashes: Sequence[int]) -> np.ndarray:
    """Block hashes as a ``uint64`` array (the one a :class:`HashList` carries, if any)."""
    arr = getattr(hashes, "array", None)
    if isinstance(arr, np.ndarray):
        return arr
    if isinstance(hashes, np.ndarray):
        return hashes.astype(_U8, copy=False)
    try:
        return np.array(hashes, dtype=_U8)
    except OverflowError:
        return np.array([h & _M64 for h in hashes], dtype=_U8)


class PrefixIndex:
    """Bounded, TTL-expiring map of block hashes to the instances that hold them."""

    __slots__ = (
        "_ch",
        "_ci",
        "_cs",
        "_ct",
        "_head",
        "_idents",
        "_ids",
        "_live",
        "_max_nb",
        "_nb",
        "_nc",
        "_pending",
        "_probe",
        "_ring",
        "_salt_cache",
        "_salts",
        "_shift",
        "_slack",
        "_spill",
        "_spilled",
        "_tail",
        "_te",
        "_tk",
        "_tk2",
        "_version",
        "evictions",
        "max_entries",
        "on_record",
        "ttl_secs",
    )

    def __init__(self, max_entries: int, ttl_secs: float, *,
                 on_record: Callable[[Sequence[int], str], None] | None = None) -> None:
        self.max_entries = max(0, int(max_entries))
        self.ttl_secs = max(0.0, float(ttl_secs))   # 0 = no age expiry
        #: called with ``(hashes, identity)`` after each :meth:`record` (routing state shared
        #: with other routers: :meth:`kvrouter.shared.SharedState.recorded`)
        self.on_record = on_record
        #: cumulative evicted (hash, instance) entries per reason, for Prometheus counters
        self.evictions: dict[str, int] = dict.fromkeys(EVICTION_REASONS, 0)
        self._slack = min(self.max_entries // 256, 4096)
        self._ids: dict[str, int] = {}
        self._idents: list[str] = []
        self._salts = np.zeros(16, dtype=_U8)
        nb = _MIN_BUCKETS
        while nb * _B < 2 * self.max_entries:
            nb *= 2
        self._max_nb = nb
        self._version = 0
        self._probe: tuple[Any, ...] | None = None
        self._salt_cache: tuple = (None, None)
        self._reset(min(nb, 64), _MIN_RING)

    def _reset(self, nb: int, ring: int) -> None:
        self._alloc(nb)
        self._ring = np.zeros(ring, dtype=_U4)
        self._head = self._tail = self._live = 0
        self._cs = np.zeros(64, dtype=np.int64)     # call: first stamp
        self._ct = np.zeros(64, dtype=np.float64)   # call: time
        self._ci = np.zeros(64, dtype=np.int32)     # call: instance number
        self._ch = self._nc = 0                      # first possibly live call, call count
        self._pending: list[tuple[int, float, int]] = []   # calls not yet in the arrays
        self._version += 1

    def _alloc(self, nb: int) -> None:
        self._nb = nb
        self._shift = np.uint64(64 - (nb.bit_length() - 1))
        # one extra bucket, never a home: its first slot is the "dead" slot (always free)
        self._tk = np.zeros((nb + 1) * _B, dtype=_U8)
        self._tk2 = self._tk.reshape(nb + 1, _B)
        self._te = np.zeros((nb + 1) * _B, dtype=_U4)
        self._spill = np.zeros(nb, dtype=np.int32)   # keys of each home bucket stored later
        self._spilled = 0

    # ------------------------------------------------------------------ instances
    def _number(self, identity: str) -> int:
        num = self._ids.get(identity)
        if num is None:
            num = self._ids[identity] = len(self._idents)
            self._idents.append(identity)
            if num >= len(self._salts):
                self._salts = np.concatenate([self._salts, np.zeros(len(self._salts), _U8)])
            self._salts[num] = _salt(num)
        return num

    def instance_numbers(self, identities: Iterable[str]) -> np.ndarray:
        """Stable small numbers of ``identities`` (assigned on first sight), for
        :meth:`match_counts`."""
        number = self._number
        return np.array([number(i) for i in identities], dtype=np.int64)

    # ------------------------------------------------------------------ probing
    def _keys(self, hv: np.ndarray, num: int) -> np.ndarray:
        # A key of 0 (free slot) has probability 2**-64; _insert stores it as 2 (see there).
        return hv ^ self._salts[num]

    def _lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(home, window, found, j)``: each key's home bucket, that bucket's slots, whether
        the key is stored, and where (slot ``home × 16 + j`` if found in its home bucket)."""
        m = len(keys)
        home = ((keys * _GOLD) >> self._shift).view(np.int64)
        win = self._tk2[home]
        eq = win == keys[:, None]
        j = eq.argmax(1)
        off = _OFFSETS.get(m)
        if off is None:
            off = _offsets(m)
        found = eq.ravel()[j + off]
        if self._spilled and np.count_nonzero(self._spill[home]):
            self._lookup_spilled(keys, home, found, j)
        return home, win, found, j

    def _lookup_spilled(self, keys, home, found, j) -> None:
        """Look for keys not found at home in the buckets their home spilled into."""
        idx = np.flatnonzero(~found & (self._spill[home] > 0))
        if not len(idx):
            return
        rows = (home[idx, None] + _SPILL_STEPS) % self._nb          # (m, 16) buckets
        hit = (self._tk2[rows] == keys[idx, None, None]).reshape(len(idx), -1)
        at = hit.argmax(1)
        ok = hit[np.arange(len(idx)), at]
        idx, at = idx[ok], at[ok]
        found[idx] = True
        home[idx] = rows[ok, at >> _LOG_B]
        j[idx] = at & (_B - 1)

    def _slot_of(self, key: int) -> int:
        """The slot holding ``key``, or -1."""
        keys = np.array([key], dtype=_U8)
        home, _, found, j = self._lookup(keys)
        return int(home[0]) * _B + int(j[0]) if found[0] else -1

    # ------------------------------------------------------------------ queries
    @property
    def size(self) -> int:
        """Number of (block, instance) entries held."""
        return self._live

    def match(self, hashes: Sequence[int], identities: Iterable[str]) -> dict[str, int]:
        """For each identity, the number of leading ``hashes`` recorded for it.

        ``hashes`` must be a hash chain (:func:`~kvrouter.prefix.hashing.block_hashes`): the
        search relies on each hash identifying its whole prefix. Lookups do not refresh
        timestamps.
        """
        ids = list(identities)
        if not ids:
            return {}
        counts = self.match_counts(hashes, self.instance_numbers(ids))
        return dict(zip(ids, counts.tolist(), strict=True))

    def match_counts(self, hashes: Sequence[int], nums: np.ndarray) -> np.ndarray:
        """:meth:`match` by instance number (:meth:`instance_numbers`): an int64 array of
        leading matched blocks, aligned with ``nums``."""
        k = len(nums)
        hv = as_hash_array(hashes)
        n = len(hv)
        if n == 0 or k == 0 or self._live == 0:
            return np.zeros(k, dtype=np.int64)
        cached, salts = self._salt_cache
        if cached is not nums:
            salts = self._salts[nums]
            self._salt_cache = (nums, salts)
        if k <= _FEW or k * n <= _FEW_PAIRS:
            return self._match_all_pairs(hv, nums, salts)
        out = np.zeros(k, dtype=np.int64)
        holders = np.flatnonzero(self._lookup(hv[0] ^ salts)[2])
        if len(holders) == 0:
            return out
        if len(holders) * n <= _ALL_PAIRS:
            out[holders] = self._match_all_pairs(hv, nums[holders], salts[holders])
        else:
            out[holders] = self._match_bisect(hv, salts[holders])
        return out

    def _match_all_pairs(self, hv: np.ndarray, nums: np.ndarray, salts: np.ndarray) -> np.ndarray:
        k, n = len(nums), len(hv)
        keys = (hv ^ salts.reshape(k, 1)).ravel()
        home, win, found, j = self._lookup(keys)
        # kept for a ``record`` of the same hashes right after (the usual select → record)
        self._probe = (hv, self._version, nums, keys, home, win, found, j)
        if k <= _FEW:
            flags = found.tolist()
            return np.array([_leading(flags, r * n, n) for r in range(k)], dtype=np.int64)
        present = np.zeros((k, n + 1), dtype=bool)
        present[:, :n] = found.reshape(k, n)
        return present.argmin(1)

    def _match_bisect(self, hv: np.ndarray, salts: np.ndarray) -> np.ndarray:
        """Leading matched blocks of instances known to hold ``hv[0]`` (binary search, all
        instances at once; relies on prefix closure)."""
        n = len(hv)
        lo = np.ones(len(salts), dtype=np.int64)     # hv[:lo] held
        hi = np.full(len(salts), n, dtype=np.int64)  # hv[hi:] not held (hv[n] virtually)
        active = np.flatnonzero(lo < hi)
        while len(active):
            mid = (lo[active] + hi[active]) >> 1
            keys = hv[mid] ^ salts[active]
            held = self._lookup(keys)[2]
            lo[active[held]] = mid[held] + 1
            hi[active[~held]] = mid[~held]
            active = active[lo[active] < hi[active]]
        return lo

    def holds(self, h: int, identity: str) -> bool:
        """Whether the entry (block ``h``, ``identity``) is held (for tests and debugging)."""
        num = self._ids.get(identity)
        if num is None:
            return False
        key = (h & _M64) ^ int(self._salts[num])
        return self._slot_of(key) >= 0

    def _live_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Ring positions (stamps) and slots of every live entry, oldest first."""
        seg = self._ring[self._head:self._tail]
        stamps = np.arange(self._head, self._tail, dtype=np.int64)
        live = (self._te[seg] == stamps.astype(_U4)) & (self._tk[seg] != 0)
        return stamps[live], seg[live].astype(np.int64)

    def _instances_of(self, stamps: np.ndarray) -> np.ndarray:
        """The instance number that recorded each stamp."""
        self._flush_calls()
        ch, nc = self._ch, self._nc
        call = np.searchsorted(self._cs[ch:nc], stamps, side="right") - 1 + ch
        return self._ci[call]

    def instance_blocks(self, identity: str) -> int:
        """Number of entries held for one instance (O(size); for debugging and tests)."""
        num = self._ids.get(identity)
        if num is None or not self._live:
            return 0
        stamps, _ = self._live_positions()
        return int(np.count_nonzero(self._instances_of(stamps) == num))

    def distinct_blocks(self) -> int:
        """Number of distinct block hashes held by at least one instance (O(size))."""
        if not self._live:
            return 0
        stamps, slots = self._live_positions()
        hashes = self._tk[slots] ^ self._salts[self._instances_of(stamps)]
        return len(np.unique(hashes))

    # ---------------------------------------------------------------- mutations
    def record(self, hashes: Sequence[int], identity: str, now: float) -> None:
        """Mark ``identity`` as holding every block of ``hashes`` as of ``now``."""
        if self.max_entries == 0 or len(hashes) == 0:
            return
        hv = as_hash_array(hashes)
        if getattr(hashes, "array", None) is not hv and len(set(hashes)) != len(hashes):
            hv = hv[np.sort(np.unique(hv, return_index=True)[1])]   # repeated hashes: once
        n = len(hv)
        num = self._number(identity)
        truncated = 0
        if n > self.max_entries:
            # The deeper blocks cannot stay: drop them now, as recording and at once evicting
            # them would (each counted once), and record the rest.
            truncated, n = n - self.max_entries, self.max_entries
            tail_keys = hv[n:] ^ self._salts[num]
            home, _, found, j = self._lookup(tail_keys)
            gone = (home * _B + j)[found]
            self._delete(gone)
            self._live -= len(gone)
            self._version += 1
            hv = hv[:n]
        if self._tail + n > len(self._ring) or (
                self._live + n > (self._nb * _B) // 2 and self._nb < self._max_nb):
            self._rebuild(n)
        probe, self._probe = self._probe, None
        row = -1
        if probe is not None and probe[0] is hv and probe[1] == self._version:
            row = _row_of(probe[2], num)
        if probe is not None and row >= 0:
            sl = slice(row * n, row * n + n)
            keys, home, win, found, j = (a[sl] for a in probe[3:8])
        else:
            keys = hv ^ self._salts[num]
            home, win, found, j = self._lookup(keys)
        home16 = home * _B
        pos = home16 + j                            # the slots of the found keys
        n_found = int(np.count_nonzero(found))
        if n_found < n:
            if n_found == 0 or (found[n_found - 1] and not found[n_found]):
                new: slice | np.ndarray = slice(n_found, n)   # the usual prefix shape
            else:
                new = np.flatnonzero(~found)
            pos[new] = self._insert(keys[new], home16[new], win[new])
            self._live += n - n_found
        base = self._tail
        self._te[pos] = np.arange(base + n - 1, base - 1, -1, dtype=np.int64)  # deepest first
        self._ring[base:base + n] = pos[::-1]
        self._tail = base + n
        self._pending.append((base, now, num))
        if len(self._pending) >= 256:
            self._flush_calls()
        self._version += 1
        excess = self._live - self.max_entries
        if excess > 0:
            # n ≤ max_entries, so the older entries always suffice; the refreshed ones have
            # left their old ring positions, which the scan skips
            self.evictions["capacity"] += self._evict_front(
                min(self._live - n, excess + self._slack))
        if truncated:
            self.evictions["capacity"] += truncated
        if self.on_record is not None:
            self.on_record(hashes, identity)

    def _insert(self, keys: np.ndarray, home16: np.ndarray, win: np.ndarray) -> np.ndarray:
        """Store keys known to be absent (``home16`` = home bucket × 16, ``win`` = the home
        buckets' slots as probed); returns their slots. A key of 0, which would read as a
        free slot, has probability 2**-64 and is then simply not found again."""
        tk = self._tk
        slots = home16 + (win == 0).argmax(1)       # the first free slot of each home bucket
        m = len(slots)
        if not np.count_nonzero(tk[slots]) and (m == 1 or len(set(home16.tolist())) == m):
            tk[slots] = keys                        # every bucket had room, no two alike
            return slots
        ok = tk[slots] == 0
        tk[slots[ok]] = keys[ok]
        ok &= tk[slots] == keys                     # two keys of this batch picked one slot
        for i in np.flatnonzero(~ok).tolist():
            slots[i] = self._insert_one(int(keys[i]), int(home16[i]) >> _LOG_B)
        return slots

    def _flush_calls(self) -> None:
        """Move the pending record calls into the call arrays."""
        pending = self._pending
        if not pending:
            return
        m = len(pending)
        while self._nc + m > len(self._cs):
            self._grow_calls()
        nc = self._nc
        cs, ct, ci = zip(*pending, strict=True)
        self._cs[nc:nc + m] = cs
        self._ct[nc:nc + m] = ct
        self._ci[nc:nc + m] = ci
        self._nc = nc + m
        pending.clear()

    def _insert_one(self, key: int, home: int) -> int:
        tk, tk2, nb = self._tk, self._tk2, self._nb
        for d in range(_MAX_SPILL + 1):
            b = (home + d) % nb
            free = np.flatnonzero(tk2[b] == 0)
            if len(free):
                slot = b * _B + int(free[0])
                tk[slot] = key
                if d:
                    self._spill[home] += 1
                    self._spilled += 1
                return slot
        # 17 full buckets in a row at ≤ 50 % load: practically impossible; make room
        raise RuntimeError("prefix index table overflow")

    def _delete(self, slots: np.ndarray) -> None:
        if len(slots) == 0:
            return
        if self._spilled:
            keys = self._tk[slots]
            home = ((keys * _GOLD) >> self._shift).view(np.int64)
            away = home != (slots >> _LOG_B)
            if away.any():
                np.subtract.at(self._spill, home[away], 1)
                self._spilled -= int(np.count_nonzero(away))
        self._tk[slots] = 0

    def _evict_front(self, k: int) -> int:
        """Evict up to ``k`` live entries, oldest stamps first; returns how many."""
        ring, te, tk = self._ring, self._te, self._tk
        head, tail = self._head, self._tail
        removed = 0
        while removed < k and head < tail:
            end = min(tail, head + max(2 * (k - removed), 64))
            seg = ring[head:end]
            live = (te[seg] == np.arange(head, end, dtype=_U4)) & (tk[seg] != 0)
            idx = np.flatnonzero(live)
            need = k - removed
            if len(idx) >= need:
                idx = idx[:need]
                end = head + int(idx[-1]) + 1
            self._delete(seg[idx].astype(np.int64))
            removed += len(idx)
            head = end
        self._head = head
        self._live -= removed
        return removed

    def _grow_calls(self) -> None:
        ch, nc = self._ch, self._nc
        size = max(64, 2 * (nc - ch), nc - ch + 256)
        for name in ("_cs", "_ct", "_ci"):
            old = getattr(self, name)
            arr = np.zeros(size, dtype=old.dtype)
            arr[:nc - ch] = old[ch:nc]
            setattr(self, name, arr)
        self._ch, self._nc = 0, nc - ch

    def _rebuild(self, incoming: int) -> None:
        """Re-stamp the live entries from 0 (oldest first) into a fresh table sized for
        ``live + incoming`` entries, and a ring with room for at least as many new stamps."""
        self._flush_calls()
        stamps, slots = self._live_positions()
        keys = self._tk[slots]
        live = len(keys)
        # calls: renumber their first stamps; drop the ones left without a live entry
        ch, nc = self._ch, self._nc
        starts = np.searchsorted(stamps, self._cs[ch:nc], side="left")
        keep = np.ones(nc - ch, dtype=bool)
        if nc - ch:
            keep[:-1] = starts[1:] > starts[:-1]
            keep[-1] = starts[-1] < live
        cs, ct, ci = starts[keep], self._ct[ch:nc][keep], self._ci[ch:nc][keep]
        if len(cs):
            cs[0] = 0
        nb = self._nb
        while nb < self._max_nb and (live + incoming) * 2 > nb * _B:
            nb *= 2
        ring = max(_MIN_RING, 2 * (live + incoming), len(self._ring))
        ring = -(-ring // _MIN_RING) * _MIN_RING
        if live + incoming <= len(self._ring) // 4 and len(self._ring) > _MIN_RING:
            ring = max(_MIN_RING, len(self._ring) // 2)   # shrink after a purge
        self._reset(nb, ring)
        new_slots = self._bulk_insert(keys)
        self._te[new_slots] = np.arange(live, dtype=_U4)
        self._ring[:live] = new_slots
        self._tail = self._live = live
        m = len(cs)
        size = max(64, 2 * m)
        self._cs = np.zeros(size, dtype=np.int64)
        self._ct = np.zeros(size, dtype=np.float64)
        self._ci = np.zeros(size, dtype=np.int32)
        self._cs[:m], self._ct[:m], self._ci[:m] = cs, ct, ci
        self._nc = m

    def _bulk_insert(self, keys: np.ndarray) -> np.ndarray:
        """Place distinct absent keys into the (empty) table; returns their slots."""
        n = len(keys)
        slots = np.empty(n, dtype=np.int64)
        if n == 0:
            return slots
        home = ((keys * _GOLD) >> self._shift).view(np.int64)
        order = np.argsort(home, kind="stable")
        hs = home[order]
        counts = np.bincount(hs, minlength=self._nb)
        first = np.cumsum(counts) - counts
        rank = np.arange(n, dtype=np.int64) - first[hs]
        fits = rank < _B
        placed = order[fits]
        slots[placed] = hs[fits] * _B + rank[fits]
        self._tk[slots[placed]] = keys[placed]
        for i in order[~fits].tolist():
            slots[i] = self._insert_one(int(keys[i]), int(home[i]))
        return slots

    def sweep(self, now: float) -> int:
        """Drop entries recorded more than ``ttl_secs`` before ``now``; return how many."""
        if self.ttl_secs <= 0 or not self._live:
            return 0
        cutoff = now - self.ttl_secs
        self._flush_calls()
        ch, nc = self._ch, self._nc
        fresh = self._ct[ch:nc] >= cutoff
        m = int(fresh.argmax()) if fresh.any() else nc - ch
        bound = int(self._cs[ch + m]) if ch + m < nc else self._tail
        removed = 0
        if bound > self._head:
            seg = self._ring[self._head:bound]
            stamps = np.arange(self._head, bound, dtype=_U4)
            live = (self._te[seg] == stamps) & (self._tk[seg] != 0)
            doomed = seg[live].astype(np.int64)
            self._delete(doomed)
            removed = len(doomed)
            self._head = bound
            self._live -= removed
        self._ch = ch + m
        self._version += 1
        self.evictions["ttl"] += removed
        return removed

    def remove_instance(self, identity: str) -> int:
        """Purge every entry of one instance (it left the registry); return how many."""
        num = self._ids.get(identity)
        if num is None or not self._live:
            return 0
        stamps, slots = self._live_positions()
        doomed = slots[self._instances_of(stamps) == num]
        self._delete(doomed)
        self._live -= len(doomed)
        self._version += 1
        self.evictions["instance_removed"] += len(doomed)
        return len(doomed)

    def clear(self) -> None:
        self._reset(min(self._max_nb, 64), _MIN_RING)

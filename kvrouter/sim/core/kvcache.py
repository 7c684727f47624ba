"""Block-based KV cache with prefix caching (vLLM V1 block pool).

A block is in exactly one of three states:

* **active** — reference count > 0 (held by one or more requests);
* **cached-free** — reference count 0 but still holding the hash of a full, computed block; it
  sits in an LRU pool (oldest first) and can be hit by a later request or evicted;
* **empty** — reference count 0, no hash.

Prefix matching walks the request's chained block hashes ``h_i = H(h_{i-1}, tokens of
block i)`` (:func:`kvrouter.prefix.hashing.block_hashes`, the same hash the router uses) and
stops at the first hash not resident. Only full blocks carry hashes, so only full blocks hit.
Allocation takes empty blocks first, then evicts the least recently freed cached block.
Freeing returns hashed blocks to the tail of the LRU pool (a request's blocks in reverse
order, so its tail is evicted before its head, like vLLM) and unhashed ones to the empty
list. A hash already mapped to another block is not published twice (the duplicate block
stays unhashed).

Optional listeners ``on_stored(hash)`` / ``on_removed(hash)`` see hashes entering and leaving
the table (the vLLM ``BlockStored`` / ``BlockRemoved`` events).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

HashListener = Callable[[int], None]


class KVCache:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 max_cached_free: int | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.max_cached_free = max_cached_free
        self.ref: list[int] = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.table: dict[int, int] = {}                      # hash -> block id
        self.empty: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack; pops 0, 1, 2 ...
        self.lru: OrderedDict[int, None] = OrderedDict()      # cached-free blocks, oldest first
        self.evictions = 0
        self.on_stored: HashListener | None = None
        self.on_removed: HashListener | None = None

    # -- counts ------------------------------------------------------------------------------
    @property
    def num_empty(self) -> int:
        return len(self.empty)

    @property
    def num_cached_free(self) -> int:
        return len(self.lru)

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: empty + cached-free."""
        return len(self.empty) + len(self.lru)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    # -- prefix matching ---------------------------------------------------------------------
    def match(self, hashes: Sequence[int], max_blocks: int | None = None) -> list[int]:
        """Block ids of the longest run of ``hashes`` (from the first) that is resident."""
        if not self.enable_prefix_caching:
            return []
        out: list[int] = []
        limit = len(hashes) if max_blocks is None else min(len(hashes), max_blocks)
        table = self.table
        for i in range(limit):
            b = table.get(hashes[i])
            if b is None:
                break
            out.append(b)
        return out

    def free_after_touch(self, blocks: Iterable[int]) -> int:
        """Free blocks left once ``blocks`` (a match) are referenced."""
        ref = self.ref
        return self.num_free - sum(1 for b in blocks if ref[b] == 0)

    # -- reference counting --------------------------------------------------------------------
    def touch(self, blocks: Iterable[int]) -> None:
        """Reference matched blocks (a cached-free block leaves the LRU pool)."""
        ref, lru = self.ref, self.lru
        for b in blocks:
            if ref[b] == 0:
                lru.pop(b, None)
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """``n`` new blocks (ref 1, no hash): empty ones first, then LRU evictions."""
        if n > self.num_free:
            raise MemoryError(f"need {n} blocks, {self.num_free} free")
        out: list[int] = []
        ref = self.ref
        for _ in range(n):
            if self.empty:
                b = self.empty.pop()
            else:
                b, _ = self.lru.popitem(last=False)
                self._unhash(b)
                self.evictions += 1
            ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference of each block; at zero a hashed block becomes cached-free (MRU
        end of the LRU pool), an unhashed one empty. Freed in reverse order (tail first)."""
        ref, lru, bh = self.ref, self.lru, self.block_hash
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] > 0:
                continue
            if ref[b] < 0:
                raise RuntimeError(f"block {b} freed twice")
            if bh[b] is not None:
                lru[b] = None
            else:
                self.empty.append(b)
        cap = self.max_cached_free
        if cap is not None:
            while len(lru) > cap:
                b, _ = lru.popitem(last=False)
                self._unhash(b)
                self.evictions += 1
                self.empty.append(b)

    # -- hashes ----------------------------------------------------------------------------------
    def publish(self, block: int, h: int) -> bool:
        """Give a full, computed block its hash. False if caching is off, the block already has
        a hash, or the hash is already mapped to another block."""
        if not self.enable_prefix_caching or self.block_hash[block] is not None or h in self.table:
            return False
        self.table[h] = block
        self.block_hash[block] = h
        if self.on_stored is not None:
            self.on_stored(h)
        return True

    def _unhash(self, b: int) -> None:
        h = self.block_hash[b]
        if h is None:
            return
        self.block_hash[b] = None
        if self.table.get(h) == b:
            del self.table[h]
            if self.on_removed is not None:
                self.on_removed(h)

    def check(self) -> None:
        """Internal consistency (tests): every block in exactly one state."""
        empty, lru = set(self.empty), set(self.lru)
        assert not (empty & lru) and len(empty) == len(self.empty)
        for b in range(self.num_blocks):
            states = (self.ref[b] > 0) + (b in empty) + (b in lru)
            assert states == 1, (b, self.ref[b], b in empty, b in lru)
            if b in lru:
                assert self.block_hash[b] is not None
            if b in empty:
                assert self.block_hash[b] is None
        for h, b in self.table.items():
            assert self.block_hash[b] == h

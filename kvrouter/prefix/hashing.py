"""Chained block hashes of a token sequence (docs/fastdeploy.md#cache-aware-routing).

Only full blocks of ``block_size`` tokens are hashed; the tail is ignored. With ``h_0`` a fixed
64-bit constant, ``h_i = H64(le64(h_{i-1}) ‖ le64(t) for every token t of block i)`` where
``le64`` is the 8-byte little-endian encoding (token ids taken modulo 2**64). ``h_i``
therefore identifies the whole prefix up to block *i*.

``H64`` is XXH3-64 (the ``xxhash`` package, seed 0) with its canonical big-endian digest read as
a little-endian integer, i.e. ``H64(x) = bswap64(XXH3_64(x))``: the digest bytes are then
``le64(h_i)`` as they are, ready to chain. Routing only requires H64 to be stable across
processes, restarts and replicas (docs/fastdeploy.md#cache-aware-routing); XXH3 is, and costs
about a tenth of the former ``blake2b(digest_size=8)`` per 64-token block (the hashes of
kvrouter ≤ 0.1 differ).

Block hashes are returned as a :class:`HashList`: a plain ``list`` of ints that also carries
the same values as a ``uint64`` numpy array (``.array``), which the prefix index uses without
converting the list. Text prompts without a tokenizer (one token per code point) are hashed by
:func:`text_block_hashes` straight from the string, without building a list of code points.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from xxhash import xxh3_64, xxh3_64_digest

__all__ = ["H0", "HashList", "block_hashes", "h64", "text_block_hashes", "tokens_to_le64"]

#: ``h_0``: the ASCII bytes ``kvrouter`` read as a little-endian 64-bit integer.
H0: int = int.from_bytes(b"kvrouter", "little")
_H0_BYTES = H0.to_bytes(8, "little")
_MASK64 = (1 << 64) - 1
_U4 = np.dtype("<u4")
_U8 = np.dtype("<u8")
_BIG_ENDIAN = sys.byteorder == "big"

#: blocks between two memo checkpoints of :func:`_chain`, and checkpoints remembered (LRU)
MEMO_EVERY = 8
MEMO_SIZE = 4096
# (block bytes, prefix bytes, XXH3-64 of the prefix bytes) → the joined digests of a chain
# that starts with that prefix (its first ``prefix bytes // block bytes`` digests are the ones)
_MEMO: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()


class HashList(list):
    """A list of block hashes that also holds them as a ``uint64`` array (``.array``).

    It compares, iterates and slices like the list it is (a slice is a plain list).
    """

    __slots__ = ("array",)

    def __init__(self, values: Sequence[int] = (), arr: np.ndarray | None = None) -> None:
        super().__init__(values)
        self.array = arr if arr is not None else np.array(self, dtype=np.uint64)


_EMPTY_ARRAY = np.zeros(0, dtype=np.uint64)
_EMPTY_ARRAY.flags.writeable = False


def h64(data: bytes) -> int:
    """``H64``: XXH3-64 of ``data``, its canonical (big-endian) digest read little-endian."""
    return int.from_bytes(xxh3_64_digest(data), "little")


def tokens_to_le64(tokens: Sequence[int]) -> bytes:
    """The tokens as consecutive 8-byte little-endian unsigned values (mod 2**64)."""
    if isinstance(tokens, np.ndarray):
        return tokens.astype(_U8).tobytes()
    try:
        arr = array("Q", tokens)
    except OverflowError:  # negative or over-wide ids: reduce modulo 2**64
        arr = array("Q", [t & _MASK64 for t in tokens])
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


def _chain(data: bytes, n_blocks: int, step: int) -> HashList:
    """Hash ``n_blocks`` consecutive ``step``-byte blocks of ``data`` as a chain.

    Requests mostly share leading blocks (a system prompt, earlier turns), so the chain is
    memoised at checkpoints every :data:`MEMO_EVERY` blocks, keyed by the XXH3-64 of the raw
    bytes up to the checkpoint: one streaming pass over ``data`` finds the longest memoised
    leading run, and only the blocks after it are chained one by one (the same values, apart
    from a 2**-64 chance of a key collision).
    """
    start = 0
    known = b""
    keys: list[tuple[int, int, int]] = []
    if n_blocks >= MEMO_EVERY:
        memo = _MEMO
        chunk = MEMO_EVERY * step
        view = memoryview(data)
        stream = xxh3_64()
        hit_key = None
        for end in range(chunk, n_blocks * step + 1, chunk):
            stream.update(view[end - chunk:end])
            key = (step, end, stream.intdigest())
            if start == end - chunk:
                got = memo.get(key)
                if got is not None:
                    start, hit_key = end, key
                    known = got[:end // step * 8]
                    continue
            keys.append(key)
        if hit_key is not None:
            memo.move_to_end(hit_key)
    digest = xxh3_64_digest
    prev = known[-8:] if start else _H0_BYTES
    digests: list[bytes] = [known]
    append = digests.append
    for off in range(start, n_blocks * step, step):
        prev = digest(prev + data[off:off + step])
        append(prev)
    joined = b"".join(digests)            # each digest *is* le64(h_i)
    if keys:
        memo = _MEMO
        for key in keys:
            memo[key] = joined
        while len(memo) > MEMO_SIZE:
            memo.popitem(last=False)
    arr = np.frombuffer(joined, dtype=_U8)
    return HashList(arr.tolist(), arr)


def block_hashes(tokens: Sequence[int], block_size: int) -> HashList:
    """``[h_1, …, h_n]`` for the ``n = len(tokens) // block_size`` full blocks of ``tokens``."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    n_blocks = len(tokens) // block_size
    if n_blocks == 0:
        return HashList((), _EMPTY_ARRAY)
    used = n_blocks * block_size
    data = tokens_to_le64(tokens if used == len(tokens) else tokens[:used])
    return _chain(data, n_blocks, block_size * 8)


def text_block_hashes(text: str, block_size: int) -> HashList:
    """``block_hashes([ord(c) for c in text], block_size)`` without the per-character work:
    UTF-32 code units widened to 64 bits by numpy (lone surrogates are kept as code points)."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    n_blocks = len(text) // block_size
    if n_blocks == 0:
        return HashList((), _EMPTY_ARRAY)
    used = n_blocks * block_size
    raw = (text if used == len(text) else text[:used]).encode("utf-32-le", "surrogatepass")
    data = np.frombuffer(raw, dtype=_U4).astype(_U8).tobytes()
    return _chain(data, n_blocks, block_size * 8)

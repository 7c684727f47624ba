"""Chained block hashes of a token sequence (contract §6.4).

Only full blocks of ``block_size`` tokens are hashed; the tail is ignored. With ``h_0`` a fixed
64-bit constant, ``h_i = H64(le64(h_{i-1}) ‖ le64(t) for every token t of block i)`` where
``le64`` is the 8-byte little-endian encoding (token ids taken modulo 2**64) and
``H64 = blake2b(digest_size=8)`` read as a little-endian integer. ``h_i`` therefore identifies
the whole prefix up to block *i*, and is stable across processes, restarts and replicas.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

__all__ = ["H0", "block_hashes", "tokens_to_le64"]

#: ``h_0``: the ASCII bytes ``kvrouter`` read as a little-endian 64-bit integer.
H0: int = int.from_bytes(b"kvrouter", "little")
_H0_BYTES = H0.to_bytes(8, "little")
_MASK64 = (1 << 64) - 1
_BIG_ENDIAN = sys.byteorder == "big"


def tokens_to_le64(tokens: Sequence[int]) -> bytes:
    """The tokens as consecutive 8-byte little-endian unsigned values (mod 2**64)."""
    try:
        arr = array("Q", tokens)
    except OverflowError:  # negative or over-wide ids: reduce modulo 2**64
        arr = array("Q", [t & _MASK64 for t in tokens])
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


def block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """``[h_1, …, h_n]`` for the ``n = len(tokens) // block_size`` full blocks of ``tokens``."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    n_blocks = len(tokens) // block_size
    if n_blocks == 0:
        return []
    used = n_blocks * block_size
    data = tokens_to_le64(tokens if used == len(tokens) else tokens[:used])
    step = block_size * 8
    blake2b = hashlib.blake2b
    prev = _H0_BYTES
    digests: list[bytes] = []
    append = digests.append
    for off in range(0, used * 8, step):
        prev = blake2b(prev + data[off : off + step], digest_size=8).digest()
        append(prev)
    # Each digest *is* le64(h_i): decode them all at once.
    out = array("Q", b"".join(digests))
    if _BIG_ENDIAN:
        out.byteswap()
    return out.tolist()

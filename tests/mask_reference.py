"""The DARE/DELLA mask definition (version 2) written out with Python integers, one element at
a time, straight from the README and Random123's Philox-4x64-10: the reference the vectorised
code in ``mergekit_math.methods.masks`` is checked against."""

from __future__ import annotations

import functools
import hashlib
import math
from fractions import Fraction

M64 = (1 << 64) - 1
BLOCK, PER_BLOCK, CAPACITY = 2**16, 2112, 512


def philox4x64_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> list[int]:
    x = list(counter)
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B97F4A7C15) & M64, (k1 + 0xBB67AE8584CAA73B) & M64
        p0, p1 = 0xD2E7470EE14C6C93 * x[0], 0xCA5A826395121157 * x[2]
        x = [(p1 >> 64) ^ x[1] ^ k0, p1 & M64, (p0 >> 64) ^ x[3] ^ k1, p0 & M64]
    return x


def key_of(seed: int, source_index: int, tensor: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{source_index}\x00{tensor}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


@functools.lru_cache(maxsize=1 << 13)
def _words(key: int, counter: int) -> list[int]:
    return philox4x64_10((counter, 0, 0, 0), (key & M64, key >> 64))


def byte(key: int, e: int) -> int:
    """Byte i of block q: byte i % 32 (little endian) of the words of counter q·2112 + i//32."""
    q, i = divmod(e, BLOCK)
    words = _words(key, q * PER_BLOCK + i // 32)
    return words[(i % 32) // 8] >> (8 * (i % 8)) & 0xFF


def spare(key: int, q: int, r: int) -> int:
    """Spare word r of block q (past the 512: Philox at counter (q, r, 1, 0))."""
    if r >= CAPACITY:
        return philox4x64_10((q, r, 1, 0), (key & M64, key >> 64))[0] & 0xFFFFFFFF
    word = _words(key, q * PER_BLOCK + 2048 + r // 8)[(r % 8) // 2]
    return word >> (32 * (r % 2)) & 0xFFFFFFFF


def keeps(key: int, start: int, probs: list[float]) -> list[bool]:
    """Decisions of elements start.. for their probabilities; ``start`` begins a block. Kept
    iff u = (b + y/2**32)/256 < p, as fractions (so exact)."""
    out, rank = [], {}
    for e, p in enumerate(probs, start):
        q, b = e // BLOCK, byte(key, e)
        t = Fraction(p) * 256
        if b != math.floor(t):
            out.append(b < t)
            continue
        r = rank.get(q, 0)
        rank[q] = r + 1
        out.append(Fraction(b) + Fraction(spare(key, q, r), 2**32) < t)
    return out

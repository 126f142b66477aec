"""The DARE/DELLA mask definition (version 2) written out with Python integers, one element at
a time, straight from the README and Random123's Philox-4x32-10: the reference the vectorised
torch code in ``mergekit_math.methods.masks`` is checked against."""

from __future__ import annotations

import hashlib
import math

M32 = 0xFFFFFFFF


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> list[int]:
    x = list(counter)
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * x[0], 0xCD9E8D57 * x[2]
        x = [(p1 >> 32) ^ x[1] ^ k0, p1 & M32, (p0 >> 32) ^ x[3] ^ k1, p0 & M32]
    return x


def key_of(seed: int, source_index: int, tensor: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{source_index}\x00{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def word(key: int, e: int) -> int:
    """Element e = q·2**16 + j·2**14 + i: word j of Philox at counter q·2**14 + i."""
    q, j, i = e >> 16, (e >> 14) & 3, e & (2**14 - 1)
    c = (q << 14) + i
    return philox4x32_10((c & M32, c >> 32, 0, 0), (key & M32, key >> 32))[j]


def keep(key: int, e: int, density: float) -> bool:
    """u = x / 2**32 < density, compared exactly (as fractions)."""
    return word(key, e) < math.ceil(density * 2**32)

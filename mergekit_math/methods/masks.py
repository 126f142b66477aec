"""The random keep decisions of DARE and DELLA (mask definition version :data:`MASK_VERSION`).

Every element's uniform is a pure function of (seed, input index, tensor name, flat element
index), so a tensor gets the same mask whole or in chunks of any size and offset, on any
number of threads, on the CPU or a GPU:

- key: the first 8 bytes (little endian) of SHA-256 of ``"{seed}\\0{input}\\0{tensor}"``,
  split into two 32-bit words ``k0`` (low) and ``k1`` (high);
- element ``e``: write ``e = q·2**16 + j·2**14 + i`` (``0 <= j < 4``, ``0 <= i < 2**14``);
  Philox-4x32-10 (Salmon et al., SC'11, "Parallel random numbers: as easy as 1, 2, 3";
  Random123's constants) under that key of the counter ``c = q·2**14 + i``, as the words
  ``(c & 0xFFFFFFFF, c >> 32, 0, 0)``, gives four 32-bit words; ``x`` is word ``j``. (Each
  counter serves four elements, 2**14 apart, so each word lane fills a contiguous run.)
- uniform ``u = x · 2**-32``; DARE keeps the element iff ``u < density``, DELLA iff
  ``u < p_e``. Both comparisons are exact (integers, or float64 with no rounding), so
  ``P(keep) = ceil(density · 2**32) / 2**32`` exactly, within 2**-32 of ``density``.

Why Philox: it is the counter-based generator of cuRAND, JAX, TensorFlow and numpy, passes
BigCrush for every key, and needs only 32x32 -> 64 bit products, which torch's int64 tensors
compute on every device (values stay in [0, 2**32) by masking; torch has no uint32
arithmetic on all devices). A keyed 64-bit mix (SplitMix64) would be cheaper, but its streams
for two keys are shifts of one Weyl sequence and may overlap; Philox keys are independent.
Version 1 (mmath before this module) was ``torch.rand(numel, generator) < density`` from a
Mersenne Twister seeded per (seed, input, tensor): one serial stream per tensor.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MASK_VERSION = 2

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 multipliers (Random123)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # key schedule (golden ratio, sqrt(3) - 1)
_MASK32 = 0xFFFFFFFF
_ROUNDS = 10
# Elements come in groups of 4·2**14: lane j of counters q·2**14 .. q·2**14 + 2**14 - 1 gives
# the j-th quarter of group q, so every lane is written contiguously (no interleaving), and
# the chunks of the engine (multiples of 2**16 elements) start on a group. 2**14 counters
# also keep each op's operands (2 x 2**14 int64) in the L2 cache and no larger than torch's
# parallel grain (32768 elements): on a shared machine OpenMP fan-out of such small ops
# costs more than it gains, and the engine parallelises over chunks.
_LANE_BITS = 14
_LANE = 1 << _LANE_BITS
_GROUP = 4 * _LANE


def mask_key(seed: int, source_index: int, tensor: str) -> int:
    """The 64-bit Philox key of one input's mask for one output tensor."""
    digest = hashlib.sha256(f"{seed}\x00{source_index}\x00{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def keep_threshold(density: float) -> int:
    """``T`` with ``x · 2**-32 < density  <=>  x < T`` for 32-bit ``x`` (exact)."""
    if not 0 <= density <= 1:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    return math.ceil(density * 2.0**32)  # exact: scaling a double by 2**32 does not round


class _Philox:
    """Philox-4x32-10 of the counters ``(c & 0xFFFFFFFF, c >> 32, 0, 0)`` for a run of ``c``,
    in reused buffers. ``even`` holds lanes (x0, x2), ``odd`` (x1, x3), as int64 rows of
    32-bit values. A round is, with ``p0 = M0·x0`` and ``p1 = M1·x2`` (64-bit products)::

        x0, x1, x2, x3 = hi(p1) ^ x1 ^ k0, lo(p1), hi(p0) ^ x3 ^ k1, lo(p0)

    Written as rows (p1, p0), the products are the next ``odd`` as they stand, and the next
    ``even`` is four whole-buffer ops. ``odd`` keeps the products' high bits until the end:
    they reach ``even`` only through xors that are masked to 32 bits before the next
    multiply. A product may pass 2**63 and wrap (two's complement, on every torch device):
    its 64 bits are still the unsigned product's, and ``>> 32`` then the mask reads ``hi``.
    """

    def __init__(self, key: int, device: torch.device):
        import torch

        self.k0, self.k1 = key & _MASK32, key >> 32
        k0, k1, keys = self.k0, self.k1, []
        for _ in range(_ROUNDS - 1):
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
            keys.append([[k0], [k1]])
        self.keys = torch.tensor(keys, dtype=torch.int64, device=device)  # rounds 2..10
        self.buffers = [torch.empty((2, _LANE), dtype=torch.int64, device=device) for _ in "eos"]
        self.base = torch.arange(_LANE, dtype=torch.int64, device=device)

    def run(self, first: int, m: int) -> list[torch.Tensor]:
        """Lanes x0, x1, x2, x3 (int64, 32-bit values) of the counters ``first ..
        first+m-1``, inside one group (``first % 2**14 + m <= 2**14``): views of the buffers,
        valid until the next call."""
        import torch

        even, odd, spare = (b[:, :m] for b in self.buffers)
        rows = {id(t): (t[0], t[1]) for t in (even, odd, spare)}
        # Round 1, where x2 = x3 = 0 and so p1 = 0: x0 = c_hi ^ k0, x1 = 0, x2 = hi(p0) ^ k1.
        # A run lies inside one group of 2**14 counters, so c >> 32 is the same for all.
        counter = torch.add(self.base[:m], first & _MASK32, out=rows[id(spare)][0])
        even[0].fill_((first >> 32) ^ self.k0)
        torch.mul(counter, _M0, out=odd[1])
        torch.bitwise_right_shift(odd[1], 32, out=even[1])
        even[1].bitwise_xor_(self.k1).bitwise_and_(_MASK32)
        odd[0].zero_()
        x0, x2 = rows[id(even)]
        for keys in self.keys:
            p1, p0 = rows[id(spare)]
            torch.mul(x0, _M0, out=p0)
            torch.mul(x2, _M1, out=p1)
            torch.bitwise_right_shift(spare, 32, out=even)
            even.bitwise_xor_(odd).bitwise_xor_(keys).bitwise_and_(_MASK32)
            odd, spare = spare, odd
        odd.bitwise_and_(_MASK32)
        (x1, x3) = rows[id(odd)]
        return [x0, x1, x2, x3]


@dataclass(frozen=True)
class MaskStream:
    """The uniforms of one (seed, input, tensor): a counter-based generator, so any range of
    elements is computed directly, in any order, on any device."""

    key: int  # 64 bits, see mask_key

    @classmethod
    def of(cls, seed: int, source_index: int, tensor: str) -> MaskStream:
        return cls(mask_key(seed, source_index, tensor))

    def _lanes(self, start: int, end: int, device: torch.device):
        """For each run of elements of ``[start, end)`` that one lane gives: ``(a, b, lane,
        i)``, elements ``a .. b-1`` being ``lane[i : i + b - a]`` (views valid until the next
        item)."""
        philox = _Philox(self.key, device)
        for group in range(start >> (_LANE_BITS + 2), ((end - 1) >> (_LANE_BITS + 2)) + 1):
            g0 = group * _GROUP
            r0, r1 = max(start, g0) - g0, min(end, g0 + _GROUP) - g0
            lanes = range(r0 >> _LANE_BITS, ((r1 - 1) >> _LANE_BITS) + 1)
            if len(lanes) == 1:  # one lane: only its counters
                c0, c1 = r0 & (_LANE - 1), ((r1 - 1) & (_LANE - 1)) + 1
            else:
                c0, c1 = 0, _LANE
            words = philox.run(group * _LANE + c0, c1 - c0)
            for j in lanes:
                a, b = max(r0, j * _LANE), min(r1, (j + 1) * _LANE)
                yield g0 + a, g0 + b, words[j], a - j * _LANE - c0

    def words(self, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The 32-bit words ``x`` of elements ``start .. start+count-1``, as int64."""
        import torch

        out = torch.empty(count, dtype=torch.int64, device=device)
        for a, b, lane, i in self._lanes(start, start + count, out.device):
            out[a - start : b - start] = lane[i : i + b - a]
        return out

    def keep(
        self, start: int, count: int, density: float, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """DARE's keep decisions (bool) of elements ``start .. start+count-1``."""
        import torch

        threshold = keep_threshold(density)
        out = torch.empty(count, dtype=torch.bool, device=device)
        if threshold >= 1 << 32:
            return out.fill_(True)
        for a, b, lane, i in self._lanes(start, start + count, out.device):
            torch.lt(lane[i : i + b - a], threshold, out=out[a - start : b - start])
        return out

    def keep_with(self, start: int, probs: torch.Tensor) -> torch.Tensor:
        """Keep decisions ``u_e < probs[e - start]`` for a flat float tensor of probabilities
        (DELLA), exact: ``u = x · 2**-32`` and ``probs`` compared as float64, neither
        rounded."""
        import torch

        words = self.words(start, probs.numel(), probs.device)
        uniform = words.to(torch.float64).mul_(2.0**-32)
        return uniform < probs.reshape(-1).to(torch.float64)

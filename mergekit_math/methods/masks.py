"""The random keep decisions of DARE and DELLA (mask definition version :data:`MASK_VERSION`).

Every decision is a pure function of (seed, input index, tensor name, flat element index) and
the keep probability, so a tensor gets the same mask whole or in chunks of any size and
offset, on any number of threads, on the CPU or a GPU. The generator is Philox-4x64-10
(Salmon et al., SC'11, "Parallel random numbers: as easy as 1, 2, 3"; Random123's constants,
numpy's ``np.random.Philox``) under a 128-bit key, on the counters ``(c, 0, 0, 0)``; each
counter gives four 64-bit words, read as 32 little-endian bytes.

- key: the first 16 bytes (little endian) of SHA-256 of ``"{seed}\\0{input}\\0{tensor}"``,
  split into 64-bit words ``k0`` (low) and ``k1`` (high);
- elements come in blocks of ``B = 2**16``; block ``q`` owns the counters ``q·2112 ..
  q·2112 + 2111``. Its first 2048 counters give 65536 bytes: element ``q·B + i`` has the byte
  ``b = byte i``. The last 64 counters give 512 spare 32-bit words (little-endian halves of
  their 256 words, low half first);
- with ``t = 256·p`` for the keep probability ``p`` (DARE: ``density``; DELLA: the entry's
  ``p_e``), the entry is kept if ``b < floor(t)``, dropped if ``b > floor(t)``; if
  ``b == floor(t)`` (one byte in 256) it takes the next unused spare word ``y`` of its block
  (the ``r``-th such entry of the block, in index order, takes word ``r``; from ``r = 512`` on,
  word 0 of Philox at counter ``(q, r, 1, 0)``) and is kept iff ``y / 2**32 < t - floor(t)``.

So the entry is kept iff ``u = (b + y/2**32)/256 < p``: ``u`` has 40 random bits, the
comparisons are exact (integers, or float64 with no rounding), and ``P(keep) =
ceil(p·2**40)/2**40``, within ``2**-40`` of ``p``. Why this is exactly i.i.d. Bernoulli:
Philox is a keyed bijection on counters whose outputs pass BigCrush for every key (it is the
generator of cuRAND, JAX, TensorFlow and numpy), so all bytes and spare words are treated as
independent uniform; which entries need a spare word is decided by the bytes alone, and each
such entry gets a different word, so given the bytes the spare words used are i.i.d. uniform
and independent of the bytes. The expected 256 spare words a block uses (standard deviation
16) fit its 512 (overflow has probability below 1e-40 and is still defined). A byte per
element, not a 32-bit word, is what makes it cheap: one Philox call serves 32 elements.

On the CPU the words come from numpy's Philox in C (random access by setting its counter,
one call per run of blocks; it releases the GIL), or, where the merge runs compiled kernels,
from the same function compiled (``kernels.philox``: DARE's decisions in one pass, DELLA's
words); on other devices from the same function in torch int64 ops (64x64 -> 128-bit
products from 32-bit halves). ``tests/test_masks.py`` checks
both against Random123's known answers and ``tests/mask_reference.py`` (plain Python).
Version 1 (mmath before this module) was ``torch.rand(numel, generator) < density`` from a
Mersenne Twister seeded per (seed, input, tensor): one serial stream per tensor.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

MASK_VERSION = 2

_M64 = (1 << 64) - 1
_M32 = 0xFFFFFFFF
_MUL = (0xD2E7470EE14C6C93, 0xCA5A826395121157)  # Philox-4x64 multipliers (Random123)
_BUMP = (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B)  # key schedule (golden ratio, sqrt(3) - 1)
_ROUNDS = 10
BLOCK_BITS = 16
BLOCK = 1 << BLOCK_BITS  # elements per block
_PRIMARY = BLOCK // 32  # counters of a block's bytes
_SPARE = 64  # counters of a block's spare words
PER_BLOCK = _PRIMARY + _SPARE
CAPACITY = 8 * _SPARE  # spare 32-bit words per block
_PRIMARY_WORDS = 4 * _PRIMARY


def mask_key(seed: int, source_index: int, tensor: str) -> int:
    """The 128-bit Philox key of one input's mask for one output tensor."""
    digest = hashlib.sha256(f"{seed}\x00{source_index}\x00{tensor}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def keep_threshold(density: float) -> int:
    """``T`` with ``u < density  <=>  b·2**32 + y < T`` for the 40-bit ``u`` (exact)."""
    if not 0 <= density <= 1:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    return math.ceil(density * 2.0**40)  # exact: scaling a double by 2**40 does not round


def philox4x64(counter: tuple[int, int, int, int], key: int) -> list[int]:
    """Philox-4x64-10 of one counter in Python integers (the overflow words)."""
    x, k0, k1 = list(counter), key & _M64, key >> 64
    for r in range(_ROUNDS):
        if r:
            k0, k1 = (k0 + _BUMP[0]) & _M64, (k1 + _BUMP[1]) & _M64
        p0, p1 = _MUL[0] * x[0], _MUL[1] * x[2]
        x = [(p1 >> 64) ^ x[1] ^ k0, p1 & _M64, (p0 >> 64) ^ x[3] ^ k1, p0 & _M64]
    return x


def raw_numpy(key: int, first: int, count: int) -> np.ndarray:
    """The words (uint64, 4 per counter) of counters ``(first .. first+count-1, 0, 0, 0)``,
    from numpy's Philox-4x64-10 (which increments its counter before each call)."""
    import numpy as np

    bits = np.random.Philox(key=key)
    state = bits.state
    before = (first - 1) % (1 << 256)
    state["state"]["counter"] = np.array([(before >> (64 * i)) & _M64 for i in range(4)], "u8")
    state["buffer_pos"] = 4
    bits.state = state
    return bits.random_raw(4 * count)


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 64 bits of ``m · a`` (unsigned) for int64 ``a``: products of 32-bit
    halves, each below 2**64 (they may wrap past 2**63; ``>> 32`` then the mask reads them)."""
    lo = a * _signed(m)
    a0, a1 = a & _M32, (a >> 32) & _M32
    p00, p01, p10 = a0 * (m & _M32), a0 * (m >> 32), a1 * (m & _M32)
    mid = ((p00 >> 32) & _M32) + (p01 & _M32) + (p10 & _M32)
    hi = a1 * (m >> 32) + ((p01 >> 32) & _M32) + ((p10 >> 32) & _M32) + (mid >> 32)
    return hi, lo


def raw_torch(key: int, first: int, count: int, device: torch.device | str) -> torch.Tensor:
    """:func:`raw_numpy` in torch int64 ops (the words' bits, as int64), on any device."""
    import torch

    x0 = torch.arange(first, first + count, dtype=torch.int64, device=device)
    x1, x2, x3 = (torch.zeros_like(x0) for _ in range(3))
    k0, k1 = key & _M64, key >> 64
    for r in range(_ROUNDS):
        if r:
            k0, k1 = (k0 + _BUMP[0]) & _M64, (k1 + _BUMP[1]) & _M64
        hi0, lo0 = _mulhilo(x0, _MUL[0])
        hi1, lo1 = _mulhilo(x2, _MUL[1])
        x0, x1, x2, x3 = hi1 ^ x1 ^ _signed(k0), lo1, hi0 ^ x3 ^ _signed(k1), lo0
    return torch.stack([x0, x1, x2, x3], dim=1).reshape(-1)


def _overflow_words(key: int, blocks: list[int], ranks: list[int]) -> list[int]:
    return [philox4x64((q, r, 1, 0), key)[0] & _M32 for q, r in zip(blocks, ranks)]


def _numpy_backend(device: torch.device | str) -> bool:
    """Whether the words come from numpy's C Philox (CPU) or the torch ops (the tests force
    the latter on the CPU to check that both give the same bits)."""
    import torch

    return torch.device(device).type == "cpu"


@dataclass(frozen=True)
class MaskStream:
    """The keep decisions of one (seed, input, tensor): computed directly for any range of
    elements, in any order, on any device."""

    key: int  # 128 bits, see mask_key

    @classmethod
    def of(cls, seed: int, source_index: int, tensor: str) -> MaskStream:
        return cls(mask_key(seed, source_index, tensor))

    def _halves(self) -> tuple[np.uint64, np.uint64]:
        import numpy as np

        return np.uint64(self.key & _M64), np.uint64(self.key >> 64)

    def _numpy_blocks(
        self, q0: int, q1: int, compiled: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Bytes ``(n, 65536)`` (uint8) and spare words ``(n, 512)`` (int64) of blocks
        q0..q1-1; ``compiled``: the words from ``kernels.philox.raw_into`` (the same)."""
        import numpy as np

        if compiled:
            from mergekit_math.kernels.philox import raw_into

            raw = np.empty(4 * (q1 - q0) * PER_BLOCK, np.uint64)
            raw_into(*self._halves(), q0 * PER_BLOCK, raw)
        else:
            raw = raw_numpy(self.key, q0 * PER_BLOCK, (q1 - q0) * PER_BLOCK)
        raw = raw.astype("<u8", copy=False).reshape(q1 - q0, 4 * PER_BLOCK)
        spare = raw[:, _PRIMARY_WORDS:].view(np.uint32).astype(np.int64)
        return raw[:, :_PRIMARY_WORDS].view(np.uint8), spare

    def words(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The bytes ``(n, 65536)`` (uint8) and spare words ``(n, 512)`` (int64) of the
        blocks holding elements ``start .. start+count-1`` (``start`` begins a block), from
        compiled Philox (``kernels.philox``): what a compiled keep pass reads
        (``kernels.ranks.della_decisions``)."""
        if start % BLOCK or count <= 0:
            raise ValueError(f"start {start} is not a multiple of {BLOCK}, or count {count} < 1")
        return self._numpy_blocks(*_blocks_of(start, count), compiled=True)

    def keep_into(self, start: int, density: float, out: np.ndarray) -> None:
        """:meth:`keep` of elements ``start .. start+len(out)-1`` into ``out`` (uint8, 0 or
        1), compiled (``kernels.philox.keep_into``): the same decisions, 0.3-0.5 instead of
        1.8 ns per element."""
        threshold = keep_threshold(density)
        if threshold >= 1 << 40 or threshold == 0:
            out[:] = threshold >= 1 << 40
            return
        from mergekit_math.kernels.philox import keep_into

        keep_into(*self._halves(), start, threshold >> 32, threshold & _M32, out)

    def _torch_blocks(self, q0: int, q1: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        raw = raw_torch(self.key, q0 * PER_BLOCK, (q1 - q0) * PER_BLOCK, device)
        raw = raw.reshape(q1 - q0, 4 * PER_BLOCK)
        primary = raw[:, :_PRIMARY_WORDS].contiguous().view(torch.uint8)  # little endian
        s = raw[:, _PRIMARY_WORDS:]
        spare = torch.stack([s & _M32, (s >> 32) & _M32], dim=2).reshape(q1 - q0, CAPACITY)
        return primary, spare

    def _spare_torch(self, spare: torch.Tensor, q0: int, rows, ranks) -> torch.Tensor:
        """The spare word of each tied entry (block ``q0 + rows``, rank ``ranks``)."""
        import torch

        y = spare[rows, ranks.clamp(max=CAPACITY - 1)]
        over = ranks >= CAPACITY
        if bool(over.any()):  # probability below 1e-40 per block
            i = over.nonzero()[:, 0]
            extra = _overflow_words(self.key, (q0 + rows[i]).tolist(), ranks[i].tolist())
            y[i] = torch.tensor(extra, dtype=y.dtype, device=y.device)
        return y

    def _spare_numpy(self, spare: np.ndarray, q0: int, rows, ranks) -> np.ndarray:
        y = spare[rows, ranks.clip(max=CAPACITY - 1)]
        over = (ranks >= CAPACITY).nonzero()[0]
        if over.size:  # probability below 1e-40 per block
            y[over] = _overflow_words(self.key, (q0 + rows[over]).tolist(), ranks[over].tolist())
        return y

    def keep(
        self, start: int, count: int, density: float, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """DARE's keep decisions (bool) of elements ``start .. start+count-1``."""
        import torch

        threshold = keep_threshold(density)
        if threshold >= 1 << 40 or threshold == 0 or count == 0:
            return torch.full((count,), threshold >= 1 << 40, dtype=torch.bool, device=device)
        tb, tl = threshold >> 32, threshold & _M32
        q0, q1 = _blocks_of(start, count)
        lo = start - (q0 << BLOCK_BITS)
        if _numpy_backend(device):
            return torch.from_numpy(self._keep_numpy(q0, q1, tb, tl).reshape(-1)[lo : lo + count])
        primary, spare = self._torch_blocks(q0, q1, device)
        primary = primary.reshape(-1)
        kept = primary < tb
        if tl:  # else a tied entry is never kept
            tied = (primary == tb).nonzero()[:, 0]
            rows = tied >> BLOCK_BITS
            ranks = _ranks_torch(rows, q1 - q0)
            kept[tied] = self._spare_torch(spare, q0, rows, ranks) < tl
        return kept[lo : lo + count]

    def _keep_numpy(self, q0: int, q1: int, tb: int, tl: int) -> np.ndarray:
        import numpy as np

        primary, spare = self._numpy_blocks(q0, q1)
        kept = np.less(primary, tb)
        if tl:  # else a tied entry is never kept
            tied = np.flatnonzero(primary == tb)  # (2-D np.nonzero is ten times slower)
            rows, cols = tied >> BLOCK_BITS, tied & (BLOCK - 1)
            ranks = _ranks_numpy(rows, q1 - q0)
            kept[rows, cols] = self._spare_numpy(spare, q0, rows, ranks) < tl
        return kept

    def keep_with(self, start: int, probs: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        """Keep decisions ``u_e < probs[e - start]`` for a flat float tensor of probabilities
        (DELLA), exact (compared in float64). ``start`` must begin a block: which spare word
        an entry takes depends on the entries before it in its block. ``compiled`` (CPU):
        the byte comparison as one compiled pass (``kernels.ranks.keep_bytes``), the same
        decisions."""
        import torch

        if start % BLOCK:
            raise ValueError(f"start {start} is not a multiple of {BLOCK}")
        n = probs.numel()
        if n == 0:
            return torch.zeros(0, dtype=torch.bool, device=probs.device)
        q0, q1 = _blocks_of(start, n)
        flat = probs.reshape(-1)
        if not _numpy_backend(probs.device):
            kept, tied, y = self._bytes_torch(q0, q1, flat)
        elif compiled:
            kept, tied, y = self._bytes_compiled(q0, q1, flat)
        else:
            kept, tied, y = self._bytes_numpy(q0, q1, flat)
        scaled = flat[tied].to(torch.float64) * 256.0
        fraction = scaled - torch.floor(scaled)  # exact in float64
        kept[tied] = y.to(torch.float64) * 2.0**-32 < fraction
        return kept

    def _bytes_numpy(
        self, q0: int, q1: int, flat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`keep_with`'s byte comparison in numpy: the decisions of the untied
        entries, the tied positions and their spare words."""
        import numpy as np
        import torch

        below = (flat * 256.0).floor_().to(torch.int16).numpy()  # exact in any dtype: 0 .. 256
        primary, spare = self._numpy_blocks(q0, q1)
        primary = np.ascontiguousarray(primary).reshape(-1)[: flat.numel()]
        kept = np.less(primary, below)
        tied = np.flatnonzero(primary == below)
        rows = tied >> BLOCK_BITS
        y = self._spare_numpy(spare, q0, rows, _ranks_numpy(rows, q1 - q0))
        return torch.from_numpy(kept), torch.from_numpy(tied), torch.from_numpy(y)

    def _bytes_torch(
        self, q0: int, q1: int, flat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`keep_with`'s byte comparison in torch (on the probabilities' device)."""
        import torch

        below = (flat * 256.0).floor_().to(torch.int16)
        primary, spare = self._torch_blocks(q0, q1, flat.device)
        primary = primary.reshape(-1)[: flat.numel()].to(torch.int16)
        kept = primary < below
        tied = (primary == below).nonzero()[:, 0]
        rows = tied >> BLOCK_BITS
        y = self._spare_torch(spare, q0, rows, _ranks_torch(rows, q1 - q0))
        return kept, tied, y

    def _bytes_compiled(
        self, q0: int, q1: int, flat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`keep_with`'s byte comparison as one compiled pass: the decisions of the
        untied entries, the tied positions and their spare words."""
        import numpy as np
        import torch

        from mergekit_math.kernels.ranks import keep_bytes

        n = flat.numel()
        primary, spare = self._numpy_blocks(q0, q1)
        values = flat.numpy()
        kept = np.empty(n, np.bool_)
        tied = np.empty(n // 128 + 1024, np.int64)  # ties are about 1 in 256
        count = keep_bytes(primary, values, kept, tied)
        if count > tied.shape[0]:
            tied = np.empty(count, np.int64)
            keep_bytes(primary, values, kept, tied)
        tied = tied[:count]
        rows = tied >> BLOCK_BITS
        y = self._spare_numpy(spare, q0, rows, _ranks_numpy(rows, q1 - q0))
        return torch.from_numpy(kept), torch.from_numpy(tied), torch.from_numpy(y)


def _blocks_of(start: int, count: int) -> tuple[int, int]:
    """The first block holding elements ``start .. start+count-1`` and the one after the last."""
    return start >> BLOCK_BITS, ((start + count - 1) >> BLOCK_BITS) + 1


def _ranks_numpy(rows: np.ndarray, blocks: int) -> np.ndarray:
    """Each tied entry's rank among its block's tied entries (``rows`` ascending)."""
    import numpy as np

    counts = np.bincount(rows, minlength=blocks)
    firsts = np.cumsum(counts) - counts
    return np.arange(rows.size, dtype=np.int64) - firsts[rows]


def _ranks_torch(rows: torch.Tensor, blocks: int) -> torch.Tensor:
    """:func:`_ranks_numpy` in torch (integer counts: the same on every device)."""
    import torch

    counts = torch.bincount(rows, minlength=blocks)
    firsts = counts.cumsum(0) - counts
    return torch.arange(rows.numel(), dtype=torch.int64, device=rows.device) - firsts[rows]

"""Encodings of one delta tensor Δ, and their decoding. Pure functions: no IO, no global RNG.

``dense``
    Δ itself, in the storage dtype (float32 by default: exact for bf16/fp16 models, and for
    float32 models wherever ``old + fl(ft − old) == ft``, which holds unless a weight shrinks
    to a small fraction of its size; ``float64`` storage is exact everywhere).
``lowrank``
    Δ seen as a matrix (first dimension × the rest) ≈ B·A from a truncated SVD: B = U_r·diag(σ_r)
    (rows × r), A = V_rᵀ (r × columns), with r given, or the smallest r whose Σσ² reaches an
    ``energy`` fraction of the total. The relative Frobenius error is
    sqrt(Σ_{i>r} σ_i²) / ‖Δ‖_F (Eckart–Young). When r·(rows + columns) ≥ rows·columns the
    factors would not be smaller, and Δ is stored dense (exactly).
``sparse``
    DARE (Yu et al. 2024, https://arxiv.org/abs/2311.03099): each entry is kept with
    probability keep = 1 − p and kept entries are divided by keep, so E[decoded] = Δ. The drop
    is the engine's own ``random_drop`` (``methods.sparsify``, ``rescale: paper``) with the
    mask stream keyed per tensor from (seed, tensor name) exactly as the engine keys the first
    model of a merge (``methods.masks``), so applying a sparse patch with scale 1 reproduces
    ``dare_linear`` (weight 1, density 1 − p, same seed) bit for bit, whatever mask
    definition the engine uses.
    Kept entries whose delta is exactly 0 decode to 0 either way and are not stored.

    Storage: the kept values (k of them) in the storage dtype, plus their positions as
    ``indices`` (int32, int64 for tensors of 2³¹ elements or more) or as a ``bitmask`` (one
    bit per element, packed little-endian into uint8), whichever is smaller for the tensor.
    **Index overhead bound**: per tensor, min(4·k, ⌈n/8⌉) bytes (8·k for int64 indices), so at
    most one bit per covered parameter (1/32 of the float32 dense size) and at most 4 bytes
    per kept value. With k ≈ (1 − p)·n the bitmask wins for p < 31/32 ≈ 0.97 and the indices
    above it: ``patch.safetensors`` ≤ Σ_t [k_t·v + min(4·k_t, ⌈n_t/8⌉)] + its JSON header,
    v being the storage dtype's size (4 bytes for float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from mergekit_math.patch.entry import PatchEntry, StorageDtype, index_dtype

if TYPE_CHECKING:
    import torch

    from mergekit_math.methods.masks import MaskStream

# Names of embedding-like tensors: low-rank only with --lowrank-embeddings.
EMBEDDING_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "lm_head")


@dataclass
class Encoded:
    """One encoded tensor: its manifest entry and its stored parts, keyed by suffix
    (``""`` for dense, ``B``/``A`` for low rank, ``values`` plus ``indices``/``bitmask``)."""

    entry: PatchEntry
    parts: dict[str, torch.Tensor]


def is_embedding(name: str) -> bool:
    return any(m in name for m in EMBEDDING_MARKERS)


def frobenius(x: torch.Tensor) -> float:
    """‖x‖_F accumulated in float64 (independent of the thread count)."""
    import torch

    return float(torch.linalg.vector_norm(x, dtype=torch.float64))


def _dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


# ----------------------------------------------------------------------------- dense


def encode_dense(delta: torch.Tensor, source_dtype: str, storage: StorageDtype) -> Encoded:
    """Δ stored as is, in ``storage``."""
    stored = delta.to(_dtype(storage))
    exact = stored.dtype == delta.dtype or storage == "float64"
    error = 0.0 if exact else frobenius(delta - stored.to(delta.dtype))
    entry = PatchEntry(
        encoding="dense",
        shape=tuple(delta.shape),
        dtype=source_dtype,
        storage_dtype=storage,
        delta_norm=frobenius(delta),
        error_norm=error,
    )
    return Encoded(entry, {"": stored})


# ----------------------------------------------------------------------------- low rank


def choose_rank(sigma: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """``rank`` (capped at the number of singular values), or the smallest r with
    Σ_{i≤r} σ_i² ≥ energy · Σ σ_i²."""
    import torch

    full = sigma.numel()
    if rank is not None:
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        return min(rank, full)
    if energy is None:
        raise ValueError("low-rank encoding needs a rank or an energy fraction")
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    power = sigma.to(torch.float64) ** 2
    total = float(power.sum())
    if total == 0:
        return 1
    cumulative = torch.cumsum(power, 0) / total
    reached = (cumulative >= energy - 1e-12).nonzero()
    return int(reached[0]) + 1 if reached.numel() else full


def encode_lowrank(
    delta: torch.Tensor,
    source_dtype: str,
    storage: StorageDtype,
    rank: int | None = None,
    energy: float | None = None,
) -> Encoded:
    """Truncated SVD of Δ (as a rows × rest matrix); dense when the factors are not smaller."""
    import torch

    if delta.dim() < 2:
        return encode_dense(delta, source_dtype, storage)
    m = delta.shape[0]
    n = delta.numel() // m
    matrix = delta.reshape(m, n)
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = choose_rank(sigma, rank, energy)
    if r * (m + n) >= m * n:
        return encode_dense(delta, source_dtype, storage)
    b = u[:, :r] * sigma[:r]
    a = vh[:r]
    del u, vh
    return encode_factors(b, a, tuple(delta.shape), source_dtype, storage, exact=delta)


def encode_factors(
    b: torch.Tensor,
    a: torch.Tensor,
    shape: tuple[int, ...],
    source_dtype: str,
    storage: StorageDtype,
    exact: torch.Tensor | None = None,
) -> Encoded:
    """Store Δ = B·A (B: rows × r, A: r × rest) given as factors (an SVD or a LoRA adapter).

    ``exact`` is the delta the factors approximate, for the recorded error; without it the
    product B·A (in the factors' dtype) is the reference, so only storage rounding counts.
    """
    rank = b.shape[1]
    sb, sa = b.to(_dtype(storage)), a.to(_dtype(storage))
    reference = exact if exact is not None else (b @ a).reshape(shape)
    decoded = (sb.to(reference.dtype) @ sa.to(reference.dtype)).reshape(shape)
    entry = PatchEntry(
        encoding="lowrank",
        shape=shape,
        dtype=source_dtype,
        storage_dtype=storage,
        rank=rank,
        delta_norm=frobenius(reference),
        error_norm=frobenius(reference - decoded),
    )
    return Encoded(entry, {"B": sb, "A": sa})


# ----------------------------------------------------------------------------- sparse


def keep_probability(drop: float) -> float:
    """1 − p computed in decimal, so ``--drop 0.9`` keeps with probability 0.1 exactly as a
    recipe's ``density: 0.1`` does (1 − 0.9 in binary floating point is 0.09999999999999998)."""
    if not 0 <= drop < 1:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    return float(Decimal(1) - Decimal(repr(drop)))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor packed 8 per byte, little-endian bit order (numpy's 'little')."""
    import torch

    flat = mask.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8)
    return (flat.view(-1, 8).to(torch.uint8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    import torch

    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[:n].bool()


def encode_sparse(
    delta: torch.Tensor,
    source_dtype: str,
    storage: StorageDtype,
    drop: float,
    stream: MaskStream,
) -> Encoded:
    """DARE drop-and-rescale, stored as values plus indices or a bitmask (the smaller)."""
    import torch

    from mergekit_math.methods.sparsify import random_drop

    keep = keep_probability(drop)
    kept = random_drop(delta, keep, "paper", stream)
    mask = kept != 0
    values = kept[mask].to(_dtype(storage))
    nnz = values.numel()
    n = delta.numel()
    itype = index_dtype(n)
    index_bytes = nnz * (4 if itype == "int32" else 8)
    if index_bytes <= (n + 7) // 8:
        index = "indices"
        positions = mask.reshape(-1).nonzero().squeeze(1).to(_dtype(itype))
    else:
        index = "bitmask"
        positions = pack_bits(mask)
    decoded = kept if values.dtype == delta.dtype else None
    if decoded is None:
        decoded = torch.zeros_like(delta).reshape(-1)
        decoded[mask.reshape(-1)] = values.to(delta.dtype)
        decoded = decoded.reshape(delta.shape)
    entry = PatchEntry(
        encoding="sparse",
        shape=tuple(delta.shape),
        dtype=source_dtype,
        storage_dtype=storage,
        drop=drop,
        index=index,
        nnz=nnz,
        delta_norm=frobenius(delta),
        error_norm=frobenius(delta - decoded),
    )
    return Encoded(entry, {"values": values, index: positions})


def sparse_size_bound(numel: int, nnz: int, value_bytes: int) -> int:
    """The documented upper bound of one sparse tensor's stored bytes (header excluded)."""
    index = nnz * (4 if index_dtype(numel) == "int32" else 8)
    return nnz * value_bytes + min(index, (numel + 7) // 8)


# ----------------------------------------------------------------------------- decoding


def decode(
    entry: PatchEntry, parts: dict[str, torch.Tensor], dtype: torch.dtype, device: str = "cpu"
) -> torch.Tensor:
    """The dense delta an entry stores, in ``dtype`` on ``device``."""
    import torch

    if entry.encoding == "dense":
        return parts[""].to(device=device, dtype=dtype)
    if entry.encoding == "lowrank":
        b = parts["B"].to(device=device, dtype=dtype)
        a = parts["A"].to(device=device, dtype=dtype)
        return (b @ a).reshape(entry.shape)
    flat = torch.zeros(entry.numel, dtype=dtype, device=device)
    values = parts["values"].to(device=device, dtype=dtype)
    if entry.index == "indices":
        flat[parts["indices"].to(device=device, dtype=torch.long)] = values
    else:
        flat[unpack_bits(parts["bitmask"], entry.numel).to(device)] = values
    return flat.reshape(entry.shape)

"""A patch's plain entry type, shared downstairs by :mod:`.format` and :mod:`.encode`.

:class:`PatchEntry` is one patched tensor of ``patch.json``: its encoding, shape and storage
dtype, and the parts it keeps in ``patch.safetensors``. This module imports none of its
siblings, so the format (which decodes through :mod:`.encode`) and the encoders (which make
entries) both import it and not each other.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PART_SEP = "::"

Encoding = Literal["dense", "lowrank", "sparse"]
StorageDtype = Literal["float32", "bfloat16", "float16", "float64"]
IndexKind = Literal["indices", "bitmask"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PatchEntry(_Strict):
    """One patched tensor: what its delta decodes to and how it is stored."""

    encoding: Encoding
    shape: tuple[int, ...] = Field(description="Shape of the decoded delta (= the base tensor's).")
    dtype: str = Field(description="dtype of the tensor in the source model (out dtype).")
    storage_dtype: StorageDtype = Field(description="dtype of the stored values or factors.")
    rank: int | None = Field(None, ge=1, description="lowrank: rank of B·A.")
    drop: float | None = Field(None, ge=0.0, lt=1.0, description="sparse: DARE drop rate p.")
    index: IndexKind | None = Field(None, description="sparse: how kept positions are stored.")
    nnz: int | None = Field(None, ge=0, description="sparse: number of kept entries.")
    delta_norm: float = Field(description="‖Δ‖_F of the exact delta at extraction.")
    error_norm: float | None = Field(
        None, description="‖Δ − decoded‖_F at extraction (None: not measured)."
    )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def label(self) -> str:
        """'dense', 'lowrank r=16', 'sparse p=0.9 (bitmask)'."""
        if self.encoding == "lowrank":
            return f"lowrank r={self.rank}"
        if self.encoding == "sparse":
            return f"sparse p={self.drop} ({self.index})"
        return "dense"

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(rows, columns) of the delta seen as a matrix (first dimension × the rest)."""
        rows = self.shape[0] if self.shape else 1
        return rows, self.numel // rows if rows else 0

    def parts(self, name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Stored key -> (dtype, shape) of every part of this entry in ``patch.safetensors``."""
        s = self.storage_dtype
        if self.encoding == "dense":
            return {name: (s, self.shape)}
        if self.encoding == "lowrank":
            assert self.rank is not None
            m, n = self.matrix_shape
            return {
                f"{name}{PART_SEP}B": (s, (m, self.rank)),
                f"{name}{PART_SEP}A": (s, (self.rank, n)),
            }
        assert self.nnz is not None and self.index is not None
        out = {f"{name}{PART_SEP}values": (s, (self.nnz,))}
        if self.index == "indices":
            out[f"{name}{PART_SEP}indices"] = (index_dtype(self.numel), (self.nnz,))
        else:
            out[f"{name}{PART_SEP}bitmask"] = ("uint8", ((self.numel + 7) // 8,))
        return out


def index_dtype(numel: int) -> str:
    """int32 positions while they fit, int64 for tensors of 2³¹ elements or more."""
    return "int32" if numel <= 2**31 - 1 else "int64"

"""Streaming sharded safetensors writer.

The plan knows every output tensor's name, shape and dtype before the first byte is computed,
so each shard's header is written first and tensor bytes are appended as they arrive: memory
never holds more than the tensor being written.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from mergekit_math.io.reader import CODE_BY_DTYPE, SINGLE_FILE, WEIGHT_INDEX, TensorInfo

if TYPE_CHECKING:
    import torch

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """'5G' -> 5_000_000_000; '500M', '2GB', '1.5G', plain bytes. Binary with 'iB' (2GiB)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use bytes or e.g. 500M, 2G)")
    number, unit, suffix = float(m[1]), m[2].upper(), m[3]
    binary = suffix.lower().startswith("i") and unit
    factor = 1024 ** ("KMGT".index(unit) + 1) if binary else _UNITS[unit]
    size = int(number * factor)
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size


@dataclass
class Shard:
    filename: str
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[TensorInfo], max_shard_size: int) -> list[Shard]:
    """Greedy split in plan order; a tensor larger than the limit gets a shard of its own."""
    shards: list[Shard] = [Shard("")]
    for t in tensors:
        if shards[-1].tensors and shards[-1].nbytes + t.nbytes > max_shard_size:
            shards.append(Shard(""))
        shards[-1].tensors.append(t)
    n = len(shards)
    for i, s in enumerate(shards):
        s.filename = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    return shards


def _header(shard: Shard, metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in shard.tensors:
        header[t.name] = {
            "dtype": CODE_BY_DTYPE[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Write tensors, in plan order, into pre-planned shards inside ``folder``."""

    def __init__(self, folder: Path, tensors: list[TensorInfo], max_shard_size: int):
        self.folder = folder
        self.shards = plan_shards(tensors, max_shard_size)
        self._order = [(si, t) for si, s in enumerate(self.shards) for t in s.tensors]
        self._next = 0
        self._file: BinaryIO | None = None
        self._shard_index = -1

    def _open(self, shard_index: int) -> BinaryIO:
        if self._file is not None:
            self._finish_file()
        shard = self.shards[shard_index]
        f = open(self.folder / shard.filename, "wb")
        f.write(_header(shard, {"format": "pt"}))
        self._file = f
        self._shard_index = shard_index
        return f

    def _finish_file(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the plan; its name, dtype and shape must match the plan."""
        shard_index, info = self._order[self._next]
        if name != info.name:
            raise RuntimeError(f"writer expected tensor {info.name}, got {name}")
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise RuntimeError(
                f"{name}: planned {info.dtype}{list(info.shape)}, "
                f"computed {dtype}{list(tensor.shape)}"
            )
        f = self._file if shard_index == self._shard_index else self._open(shard_index)
        assert f is not None
        import torch

        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            f.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        """Finish the last shard and write the index when there are several shards."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise RuntimeError(f"writer closed before tensor {missing} was written")
        if self._shard_index < len(self.shards) - 1:  # trailing shards of empty tensors
            for i in range(self._shard_index + 1, len(self.shards)):
                self._open(i)
        if self._file is not None:
            self._finish_file()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {t.name: s.filename for s in self.shards for t in s.tensors},
            }
            (self.folder / WEIGHT_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

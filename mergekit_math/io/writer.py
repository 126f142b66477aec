"""Streaming sharded safetensors writer.

The plan knows every output tensor's name, shape and dtype before the first byte is computed,
so each shard's header is written first and tensor bytes are appended as they arrive: memory
never holds more than the tensor being written.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_math.io.reader import CODE_BY_DTYPE, ITEMSIZE, SINGLE_FILE, WEIGHT_INDEX, TensorInfo

if TYPE_CHECKING:
    import numpy as np
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


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as the progress bars show them)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class HostPart:
    """Consecutive elements of an output tensor in numpy: ``data`` (flat, contiguous, any
    view of the bytes) and the safetensors dtype name they are stored as. Answers what the
    merge loop and the writer ask of a part (``dtype``, ``numel()``, ``element_size()``)."""

    __slots__ = ("data", "dtype")

    def __init__(self, data: Any, dtype: str):
        self.data = data
        self.dtype = dtype

    def numel(self) -> int:
        return self.data.nbytes // self.element_size()

    def element_size(self) -> int:
        return ITEMSIZE[self.dtype]

    def bytes(self) -> Any:
        """The part's bytes, as a flat uint8 array (no copy)."""
        return self.data.reshape(-1).view("uint8")


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
    size = 0  # bytes in the last shard
    for t in tensors:
        if shards[-1].tensors and size + t.nbytes > max_shard_size:
            shards.append(Shard(""))
            size = 0
        shards[-1].tensors.append(t)
        size += t.nbytes
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


# the unit of direct writes: a part whose address has its bytes' phase in the file modulo
# this is written from its own memory (_ShardFile.write, merge.fused._laid_out)
DIRECT_BLOCK = 4096


class _ShardFile:
    """One output file written sequentially, with ``O_DIRECT`` where the filesystem allows.

    Direct writes skip the page cache: the bytes go to the disk while the merge goes on, the
    final fsync has nothing left to flush, and the inputs stay cached. Data is staged in an
    aligned buffer and written in whole blocks; the last block is padded and the file cut to
    its real size. Where ``O_DIRECT`` is refused (tmpfs, some network filesystems) the file
    is written normally.
    """

    BLOCK = DIRECT_BLOCK
    STAGE = 8 << 20

    def __init__(self, path: Path, direct: bool = True):
        import numpy as np

        self.path = path
        self.size = 0
        self.offset = 0  # bytes already on disk (a multiple of BLOCK in direct mode)
        self.fill = 0
        self.stage: np.ndarray | None = None
        self._map: mmap.mmap | None = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
                self._map = mmap.mmap(-1, self.STAGE)  # page-aligned
                self.stage = np.frombuffer(self._map, dtype=np.uint8)
            except OSError:
                self.fd = -1
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o644)

    def write(self, data: np.ndarray) -> None:
        """Append the bytes of a 1-D uint8 array: where its address has the phase (modulo
        :data:`BLOCK`) of its place in the file, its whole blocks go to the disk from it,
        else through the staging buffer (a copy)."""
        self.size += data.size
        if self.stage is None:
            self._write_all(memoryview(data))
            return
        if data.size >= 2 * self.BLOCK and (data.ctypes.data - self.fill) % self.BLOCK == 0:
            self._write_from(data)
        else:
            self._stage(data)

    def _write_from(self, data: np.ndarray) -> None:
        """The direct write of :meth:`write`: the head completes the staged block, the
        whole blocks after it are written from ``data`` itself, the tail is staged. Where
        the kernel refuses that memory for direct IO (EINVAL), the rest goes through the
        staging copy; where it refuses direct IO on first use, the file is written plainly."""
        assert self._map is not None
        head = -self.fill % self.BLOCK
        body = (data.size - head) // self.BLOCK * self.BLOCK
        self.stage[self.fill : self.fill + head] = data[:head]
        self.fill += head  # whole blocks now, written in one call with the body's
        staged = memoryview(self._map)[: self.fill]
        view = memoryview(data[head : head + body])
        total, done = self.fill + body, 0
        try:
            while done < total:
                if done < self.fill:
                    parts = [staged[done:], view]
                else:
                    parts = [view[done - self.fill :]]
                done += os.pwritev(self.fd, parts, self.offset + done)
        except OSError as exc:
            if exc.errno != errno.EINVAL or done:
                raise
            # refused: on first use, direct IO itself; else this memory for it
            if not self.offset:
                self._fall_back()
                self._write_all(staged)
                self._write_all(memoryview(data[head:]))
                self.fill = 0
                return
            self._flush(self.fill)
            self._stage(data[head:])
            return
        finally:
            staged.release()
            view.release()
        self.offset += total
        tail = data[head + body :]
        self.stage[: tail.size] = tail
        self.fill = tail.size

    def _stage(self, data: np.ndarray) -> None:
        """Append ``data`` through the staging buffer, flushing it whenever full."""
        done, total = 0, data.size
        while done < total:
            n = min(total - done, self.STAGE - self.fill)
            self.stage[self.fill : self.fill + n] = data[done : done + n]
            self.fill += n
            done += n
            if self.fill == self.STAGE:
                self._flush(self.STAGE)

    def _write_all(self, view: memoryview) -> None:
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def _flush(self, nbytes: int) -> None:
        assert self._map is not None
        view = memoryview(self._map)[:nbytes]
        try:
            done = 0
            while done < nbytes:
                done += os.pwrite(self.fd, view[done:], self.offset + done)
        except OSError as exc:
            if exc.errno != errno.EINVAL or self.offset:
                raise
            self._fall_back()  # direct IO refused on first use: write normally instead
            self._write_all(view)
            self.fill = 0
            return
        finally:
            view.release()
        self.offset += nbytes
        self.fill = 0

    def _fall_back(self) -> None:
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.stage = None

    def finish(self) -> None:
        """Write what is staged, cut the file to its size, fsync and close."""
        if self.stage is not None and self.fill:
            padded = -(-self.fill // self.BLOCK) * self.BLOCK
            self.stage[self.fill : padded] = 0
            self._flush(padded)
            os.ftruncate(self.fd, self.size)  # drop the padding
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.stage = None
        if self._map is not None:
            self._map.close()
            self._map = None


def _bytes_of(part: torch.Tensor | HostPart) -> np.ndarray:
    """A part's bytes as a flat uint8 numpy array (a copy only for a tensor that is not a
    contiguous CPU one)."""
    if isinstance(part, HostPart):
        return part.bytes()
    import torch

    data = part.detach().to("cpu").contiguous().reshape(-1)
    return data.view(torch.uint8).numpy()


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Give an ``OSError`` without a file name (``os.write`` on a full disk) the file's."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


class ShardedWriter:
    """Write tensors, in plan order, into pre-planned shards inside ``folder``."""

    def __init__(
        self, folder: Path, tensors: list[TensorInfo], max_shard_size: int, direct: bool = True
    ):
        self.folder = folder
        self.direct = direct
        self.shards = plan_shards(tensors, max_shard_size)
        self._order = [(si, t) for si, s in enumerate(self.shards) for t in s.tensors]
        self._next = 0
        self._written = 0  # elements of the current tensor written so far
        self._file: _ShardFile | None = None
        self._shard_index = -1
        self._headers: list[bytes] | None = None  # see _shard_header
        self._phases: dict[str, int] | None = None  # see phase_of

    def phase_of(self, name: str) -> int | None:
        """Where tensor ``name``'s first byte falls in its file's blocks (its offset modulo
        :data:`DIRECT_BLOCK`), for parts laid out to be written from their own memory
        (``_ShardFile.write``); None where the files are not written with ``O_DIRECT``."""
        if not self.direct or not hasattr(os, "O_DIRECT"):
            return None
        if self._phases is None:
            self._phases = {}
            for index, shard in enumerate(self.shards):
                at = len(self._shard_header(index))
                for t in shard.tensors:
                    self._phases[t.name] = at % DIRECT_BLOCK
                    at += t.nbytes
        return self._phases.get(name)

    def _shard_header(self, index: int) -> bytes:
        """Shard ``index``'s safetensors header, built once: what :meth:`_open` writes first
        and where :meth:`phase_of` places the tensors after it."""
        if self._headers is None:
            self._headers = [_header(shard, {"format": "pt"}) for shard in self.shards]
        return self._headers[index]

    def _open(self, shard_index: int) -> _ShardFile:
        if self._file is not None:
            self._finish_file()
        import numpy as np

        shard = self.shards[shard_index]
        path = self.folder / shard.filename
        with _naming(path):
            f = _ShardFile(path, self.direct)
            header = bytearray(self._shard_header(shard_index))
            try:
                f.write(np.frombuffer(header, dtype=np.uint8))
            except BaseException:
                f.close()
                raise
        self._file = f
        self._shard_index = shard_index
        return f

    def _finish_file(self) -> None:
        assert self._file is not None
        file, self._file = self._file, None
        try:
            with _naming(file.path):
                file.finish()
        finally:
            file.close()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the plan; its name, dtype and shape must match the plan."""
        info = self._order[self._next][1] if self._next < len(self._order) else None
        if info is not None and name == info.name and tuple(tensor.shape) != info.shape:
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise RuntimeError(
                f"{name}: planned {info.dtype}{list(info.shape)}, "
                f"computed {dtype}{list(tensor.shape)}"
            )
        self.write_part(name, tensor, last=True)

    def write_part(self, name: str, part: torch.Tensor | HostPart, last: bool) -> None:
        """Append the next elements (in row-major order) of the plan's current tensor: a
        tensor, or a :class:`HostPart` (numpy bytes).

        ``last`` marks the tensor's final part: by then exactly its planned element count must
        have been written.
        """
        if self._next >= len(self._order):
            raise RuntimeError(f"writer got tensor {name} after the last planned one")
        shard_index, info = self._order[self._next]
        if name != info.name:
            raise RuntimeError(f"writer expected tensor {info.name}, got {name}")
        dtype = str(part.dtype).removeprefix("torch.")
        if dtype != info.dtype:
            raise RuntimeError(f"{name}: planned {info.dtype}, computed {dtype}")
        self._written += part.numel()
        if self._written > info.numel or (last and self._written != info.numel):
            raise RuntimeError(
                f"{name}: planned {info.numel} elements {list(info.shape)}, "
                f"computed {self._written}"
            )
        f = self._file if shard_index == self._shard_index else self._open(shard_index)
        assert f is not None
        data = _bytes_of(part)
        if data.size:
            with _naming(f.path):
                f.write(data)
        if last:
            self._next += 1
            self._written = 0

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
            with _naming(self.folder / WEIGHT_INDEX):
                (self.folder / WEIGHT_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

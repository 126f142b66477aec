"""Input files held open from planning to the end of a merge, and fully checked headers.

An :class:`InputFile` is opened once, when the plan is made, and read only through that
descriptor. Its size, mtime and inode are recorded then and checked again before every read,
so a file truncated, rewritten or replaced (``os.replace``) during a merge stops it with one
error, instead of feeding the merge other bytes or killing it with SIGBUS through a mapping
that runs past the file's new end.

:func:`read_safetensors_header` validates a header completely at planning time: what the
``safetensors`` library refuses (a header that is not a JSON object, offsets that are not
contiguous, a buffer shorter or longer than the tensors, an unknown dtype) and what it does not
say clearly (which file, which tensor) — so nothing wrong in a header is found mid-merge.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import mmap
import os
import stat
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_math.errors import UserError

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
# stored dtype -> the numpy dtype its bytes are viewed as without torch (bits where numpy
# has no such type)
NUMPY_VIEWS = {name: name for name, _ in DTYPES.values()} | {
    "bfloat16": "uint16",
    "float8_e4m3fn": "uint8",
    "float8_e5m2": "uint8",
}
# The safetensors library's own limit on the header's size.
MAX_HEADER = 100_000_000


_POPULATE_READ = 22  # madvise: fault a range's pages in (Linux 5.14); EINVAL before
_populates = [True]  # False once the kernel said EINVAL


@functools.cache
def _madvise() -> Any:
    """libc's ``madvise`` through ctypes, which lets go of the GIL while it runs (the
    ``mmap`` object's own ``madvise`` holds it: 0.23 s of a DELLA merge's worker threads'
    Python waited on it)."""
    import ctypes

    call = ctypes.CDLL(None, use_errno=True).madvise
    call.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    call.restype = ctypes.c_int
    return call


def _populate(address: int, length: int) -> None:
    """Map every page of the mapping at ``address`` now (``MADV_POPULATE_READ``), where the
    kernel can."""
    if _populates[0] and _madvise()(address, length, _POPULATE_READ) != 0:
        import ctypes

        code = ctypes.get_errno()
        if code != errno.EINVAL:
            raise OSError(code, os.strerror(code))
        _populates[0] = False


class InputFile:
    """A regular file opened read-only once; every read goes through the kept descriptor after
    checking that the file is still the one that was planned on."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise UserError(f"{self.path}: cannot open ({exc.strerror})") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise UserError(f"{self.path}: not a regular file")
        self.size = st.st_size
        self._mtime = st.st_mtime_ns
        self._id = (st.st_dev, st.st_ino)
        self._fd: int | None = fd
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()

    def _changed(self, why: str) -> None:
        raise UserError(f"{self.path} changed during the merge ({why}); nothing was written")

    def _reopen(self) -> int:
        """After :meth:`close`: open the path again, only if it is still the same file."""
        with self._lock:
            if self._fd is None:
                try:
                    fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    self._changed("removed")
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != self._id:
                    os.close(fd)
                    self._changed("replaced by another file")
                self._fd = fd
            return self._fd

    def check(self) -> int:
        """The kept descriptor, after checking size and mtime (fstat) and that the path still
        names the same inode (stat)."""
        fd = self._fd if self._fd is not None else self._reopen()
        st = os.fstat(fd)
        if st.st_size != self.size:
            self._changed(f"size {self.size} -> {st.st_size} bytes")
        if st.st_mtime_ns != self._mtime:
            self._changed("modified")
        try:
            now = os.stat(self.path)
        except OSError:
            self._changed("removed")
        if (now.st_dev, now.st_ino) != self._id:
            self._changed("replaced by another file")
        return fd

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the bytes at ``offset``; checked before and after reading."""
        fd = self.check()
        done, n = 0, len(view)
        while done < n:
            got = os.preadv(fd, [view[done:]], offset + done)
            if not got:
                self.check()
                self._changed("shorter than its header says")
            done += got
        self.check()

    def map_view(self, offset: int, nbytes: int) -> Any:
        """The ``nbytes`` at ``offset`` as a numpy uint8 array over a private mapping of just
        their pages (unmapped when the array and its views are freed), after :meth:`check`,
        the pages mapped here (``MADV_POPULATE_READ``, where the kernel has it) rather than
        on first touch. No copy out of the page cache. Only under the SIGBUS guard
        (:mod:`mergekit_math.kernels.sigbus`): a truncation after this check makes a page past
        the new end read as zeros, and the merge's last :meth:`check` stops it."""
        import numpy as np

        fd = self.check()
        first = offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        try:
            view = mmap.mmap(fd, offset + nbytes - first, access=mmap.ACCESS_COPY, offset=first)
            whole = np.frombuffer(view, np.uint8)
            _populate(whole.ctypes.data, len(whole))
        except OSError as exc:
            self.check()
            raise UserError(f"{self.path}: cannot map it ({exc.strerror})") from None
        return whole[offset - first : offset - first + nbytes]

    def pread(self, n: int, offset: int) -> bytes:
        buf = bytearray(n)
        self.read_into(memoryview(buf), offset)
        return bytes(buf)

    def mapping(self) -> mmap.mmap:
        """A private (copy-on-write) mapping of the planned size, after :meth:`check`."""
        fd = self.check()
        if self._map is None:
            with self._lock:
                if self._map is None:
                    # private: a stray in-place op on a view copies the page, never the file
                    self._map = mmap.mmap(fd, self.size, access=mmap.ACCESS_COPY)
        return self._map

    @property
    def mapped(self) -> mmap.mmap | None:
        return self._map

    def close(self) -> None:
        with self._lock:
            if self._map is not None:
                try:
                    self._map.close()
                except BufferError:  # a tensor still views it; it closes when that is freed
                    pass
                self._map = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


# =============================================================================== headers


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_safetensors_header(
    source: Path | InputFile, *, allow_empty: bool = False
) -> tuple[dict[str, Any], int]:
    """The validated JSON header of a safetensors file and the byte offset where its data
    starts. ``allow_empty``: a file with no tensors is valid (a patch with nothing to change)."""
    f = source if isinstance(source, InputFile) else InputFile(source)
    try:
        path = f.path
        if f.size < 8:
            raise UserError(f"{path}: not a safetensors file (too short: {f.size} bytes)")
        (size,) = struct.unpack("<Q", f.pread(8, 0))
        if size > MAX_HEADER:
            raise UserError(f"{path}: not a safetensors file (header size {size})")
        if 8 + size > f.size:
            raise UserError(
                f"{path}: truncated: the header is {size} bytes but the file has only "
                f"{f.size - 8} after the length"
            )
        raw = f.pread(size, 8)
        try:
            header = json.loads(raw, object_pairs_hook=_no_duplicates)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, duplicate names
            raise UserError(f"{path}: corrupt safetensors header ({exc})") from None
        validate_header(path, header, 8 + size, f.size, allow_empty)
    finally:
        if f is not source:
            f.close()
    return header, 8 + size


def validate_header(
    path: Path, header: Any, data_start: int, file_size: int, allow_empty: bool = False
) -> None:
    """Refuse anything in a parsed header that is not a well-formed, in-bounds tensor table:
    one error naming the file and the tensor."""
    if not isinstance(header, dict):
        raise UserError(
            f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)"
        )
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise UserError(f"{path}: corrupt safetensors header: __metadata__ is not a map of strings")
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ranges.append((*_entry_range(path, name, entry), name))
    if not ranges and not allow_empty:
        raise UserError(f"{path}: no tensors in this safetensors file")
    data_size = file_size - data_start
    ranges.sort()
    at = 0
    for begin, end, name in ranges:
        if begin < at:
            raise UserError(
                f"{path}: tensor {name}: data_offsets [{begin}, {end}] overlap another tensor"
            )
        if begin > at:
            raise UserError(
                f"{path}: tensor {name}: data_offsets [{begin}, {end}] leave a gap after byte {at}"
            )
        at = end
    if at > data_size:
        name = ranges[-1][2]
        raise UserError(
            f"{path}: truncated: tensor {name} ends at data byte {at} but the file holds "
            f"{data_size} bytes of data"
        )
    if at < data_size:
        raise UserError(
            f"{path}: corrupt safetensors file: {data_size - at} bytes after the last tensor"
        )


def _entry_range(path: Path, name: str, entry: Any) -> tuple[int, int]:
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: header entry is {entry!r}, not an object")
    code = entry.get("dtype")
    if code is None:
        raise UserError(f"{where}: no dtype")
    if code not in DTYPES:
        raise UserError(f"{where} has unsupported dtype {code}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise UserError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)):
        raise UserError(f"{where}: data_offsets {offsets!r} are not two non-negative integers")
    begin, end = offsets
    if begin > end:
        raise UserError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    nbytes = math.prod(shape) * DTYPES[code][1]
    if end - begin != nbytes:
        raise UserError(
            f"{where}: inconsistent data offsets: [{begin}, {end}] hold {end - begin} bytes, "
            f"{code}{shape} needs {nbytes}"
        )
    return begin, end


def read_tensor(f: InputFile, entry: dict[str, Any], data_start: int) -> torch.Tensor:
    """One tensor of a validated header, read through ``f`` into fresh memory."""
    import torch

    begin, end = entry["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8)
    if end > begin:
        f.read_into(memoryview(buf.numpy()), data_start + begin)
    return buf.view(getattr(torch, DTYPES[entry["dtype"]][0])).reshape(entry["shape"])

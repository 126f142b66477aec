"""Output parts laid out for direct writes (``merge.fused._laid_out`` with the writer's
``ShardedWriter.phase_of``): their whole blocks go to the disk from their own memory in one
``pwritev`` with the staged block before them, and the files are byte for byte those the
staging copy writes, also where ``O_DIRECT`` or the part's memory is refused."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mergekit_math.io import writer as writer_module
from mergekit_math.io.reader import TensorInfo
from mergekit_math.io.writer import HostPart, ShardedWriter
from mergekit_math.merge.fused import _laid_out

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT here")

# a bool tensor first, so that the bfloat16 tensors start off the blocks' bounds (at an
# even offset: at an odd one a laid-out array's elements would be misaligned)
_SHAPES = {"flags": (6,), "a": (300, 70), "b": (9001,), "c": (2, 3)}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {"flags": torch.tensor([True, False, True, True, False, True])}
    for name in ("a", "b", "c"):
        out[name] = torch.randn(_SHAPES[name], generator=g).to(torch.bfloat16)
    return out


def _write(folder, parts_of, laid_out: bool) -> ShardedWriter:
    """The tensors written in parts of 4099 elements (the last shorter), each part's array
    laid out by the writer's phase (``laid_out``) or allocated anywhere."""
    infos = [
        TensorInfo(n, folder / "in", "bool" if n == "flags" else "bfloat16", s)
        for n, s in _SHAPES.items()
    ]
    folder.mkdir()
    w = ShardedWriter(folder, infos, 10**9)
    for name, t in parts_of.items():
        if name == "flags":
            w.write_part(name, HostPart(t.numpy(), "bool"), True)
            continue
        bits = t.reshape(-1).view(torch.int16).numpy().view(np.uint16)
        for start in range(0, bits.size, 4099):
            chunk = bits[start : start + 4099]
            phase = w.phase_of(name) if laid_out else None
            out = _laid_out(chunk.size, np.dtype(np.uint16), phase, start)
            out[:] = chunk
            w.write_part(name, HostPart(out, "bfloat16"), start + 4099 >= bits.size)
    w.close()
    return w


def test_laid_out_parts_are_written_from_their_memory_with_the_same_bytes(tmp_path, monkeypatch):
    tensors = _tensors()
    calls: list[list[int]] = []
    real = os.pwritev

    def spy(fd, buffers, offset):
        calls.append([len(b) for b in buffers])
        return real(fd, buffers, offset)

    monkeypatch.setattr(writer_module.os, "pwritev", spy)
    _write(tmp_path / "staged", tensors, laid_out=False)
    assert not calls  # parts anywhere: the staging copy only
    _write(tmp_path / "direct", tensors, laid_out=True)
    # a's 21000 and b's 9001 elements: 5 + 3 parts of 4099 and a shorter last one, each of
    # them 2 blocks or more but a's and b's last (3604 and 817 elements)
    assert len(calls) == 5 + 2
    assert all(sum(sizes) % 4096 == 0 and sizes[-1] >= 4096 for sizes in calls)
    staged = (tmp_path / "staged" / "model.safetensors").read_bytes()
    assert (tmp_path / "direct" / "model.safetensors").read_bytes() == staged
    back = load_file(tmp_path / "direct" / "model.safetensors")
    for name, t in tensors.items():
        assert torch.equal(back[name], t), name


@pytest.mark.parametrize("when", ["first", "later"])
def test_a_refused_direct_write_falls_back_to_the_same_bytes(tmp_path, monkeypatch, when):
    """EINVAL on the first write: the file is written without O_DIRECT; later (this memory
    refused for direct IO): that part goes through the staging copy."""
    tensors = _tensors()
    _write(tmp_path / "staged", tensors, laid_out=False)
    real = os.pwritev
    seen = []

    def refuse(fd, buffers, offset):
        seen.append(offset)
        if (when == "first") == (offset == 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(writer_module.os, "pwritev", refuse)
    _write(tmp_path / "direct", tensors, laid_out=True)
    # refused on first use: no more direct writes; refused later: tried for every part
    assert seen == [0] if when == "first" else len(seen) == 5 + 2 and seen[0] == 0
    staged = (tmp_path / "staged" / "model.safetensors").read_bytes()
    assert (tmp_path / "direct" / "model.safetensors").read_bytes() == staged


def test_laid_out_arrays_have_the_phase_of_their_bytes_in_the_file():
    for phase, start in [(0, 0), (6, 4099), (4094, 1), (100, 10**6)]:
        a = _laid_out(5000, np.dtype(np.uint16), phase, start)
        assert a.size == 5000 and a.flags.c_contiguous
        assert a.ctypes.data % 4096 == (phase + 2 * start) % 4096
    assert _laid_out(5000, np.dtype(np.uint16), 3, 0).ctypes.data % 2 == 0  # odd: anywhere
    assert _laid_out(10, np.dtype(np.uint16), None, 0).size == 10

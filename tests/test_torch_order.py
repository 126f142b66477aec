"""kernels/torch_order.py: torch's float32 row sums in torch's order, against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergekit_math import kernels
from mergekit_math.kernels import torch_order


@pytest.mark.skipif(not kernels.torch_sums_known(), reason="torch's sum order unchecked here")
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e4])
def test_row_sums_are_torchs_bits(scale):
    """Every length up to 300 and longer rows up to the longest summed on one thread, of
    squares spread over several binades (where the order shows in the last bits), as
    ``torch.sum`` of the row and as a row of a 2-D ``sum(dim=1)``; zeros of both signs."""
    rng = np.random.default_rng(int(scale * 7) + 1)
    lengths = [*range(1, 301), 1000, 2047, 2048, 2049, 5632, 8191, 16384, 32767, 32768]
    differ = []
    for n in lengths:
        x = (rng.standard_normal(n) * scale).astype(np.float32)
        x *= rng.choice(np.array([1, 3, 1000], np.float32), n)
        got = torch_order.row_sum(x)
        rows = torch.from_numpy(np.stack([x, x[::-1].copy()]))
        want = (torch.from_numpy(x).sum(), rows.sum(dim=1)[0])
        if any(np.float32(got).view(np.int32) != w.numpy().view(np.int32) for w in want):
            differ.append(n)
    assert differ == []
    negative = np.array([-0.0] * 9, np.float32)
    assert np.float32(torch_order.row_sum(negative)).view(np.int32) == 0  # +0, as torch
    assert torch.from_numpy(negative).sum().numpy().view(np.int32) == 0


def test_known_only_on_x86_with_a_checked_torch(monkeypatch):
    import platform
    from importlib import metadata

    known = kernels.torch_sums_known
    known.cache_clear()
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert not known()
    known.cache_clear()
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(metadata, "version", lambda name: "2.99.0+cpu")
    assert not known()
    known.cache_clear()
    monkeypatch.setattr(metadata, "version", lambda name: "2.13.0+cpu")
    assert known()
    known.cache_clear()

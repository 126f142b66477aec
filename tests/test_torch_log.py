"""kernels/torch_log.py: MKL's log from torch's library, as torch takes it, and Arcee
Fusion's compiled preparation pass built on it (kernels.fusion.kl_importance_bins)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from numba import njit

from mergekit_math import kernels
from mergekit_math.kernels import torch_log
from mergekit_math.kernels.fusion import importance_bins, kl_importance_bins
from mergekit_math.kernels.select import BINS
from mergekit_math.methods.arcee_fusion import prepares_without_torch, row_kl

needs_ln = pytest.mark.skipif(not torch_log.ln_address(), reason="torch's log unchecked here")


@njit
def _ln(fn, x, out, mode):  # noqa: ANN001, ANN202
    args = np.empty(2, np.int64)
    args[0], args[1] = x.shape[0], mode
    torch_log.call_ln(fn, args.ctypes.data, x.ctypes.data, out.ctypes.data, args.ctypes.data + 8)


def _values(rng, n):
    x = np.abs(rng.standard_normal(n) * rng.choice(np.float32([1e-30, 1e-6, 1, 1e6]), n))
    x = x.astype(np.float32)
    x[::17] = np.float32(1e-42)  # subnormal
    return x


@needs_ln
def test_ln_is_torchs_log_bits():
    """Every length up to 200 and long arrays, values over many binades (subnormals among
    them), 0, negative, inf and NaN: torch's ``log_`` to the bit (NaN where it has NaN), and
    in place; another accuracy mode gives other bits (so this can fail)."""
    rng = np.random.default_rng(0)
    fn = torch_log.ln_address()
    for n in [*range(1, 201), 2048, 5632, 65536]:
        x = _values(rng, n)
        if n > 8:
            x[:5] = [0.0, -0.0, -1.0, np.inf, np.nan]
        want = torch.from_numpy(x.copy()).log_().numpy()
        got = np.empty_like(x)
        _ln(fn, x, got, torch_log.MODE)
        nan = np.isnan(want)
        assert (np.isnan(got) == nan).all(), n
        assert (got[~nan].view(np.int32) == want[~nan].view(np.int32)).all(), n
        _ln(fn, x, x, torch_log.MODE)  # in place, as the kernel calls it
        assert (x[~nan].view(np.int32) == want[~nan].view(np.int32)).all(), n
    x = _values(rng, 1 << 16)
    low = np.empty_like(x)
    _ln(fn, x, low, np.int64(0x1 | 0x140000 | 0x100))  # VML_LA
    assert (low.view(np.int32) != torch.from_numpy(x).log().numpy().view(np.int32)).any()


def test_available_only_with_a_checked_torch_on_x86(monkeypatch):
    import platform
    from importlib import metadata

    available, found = torch_log.ln_available, torch_log._library  # found: cached
    try:
        found.cache_clear()
        monkeypatch.setattr(metadata, "version", lambda name: "2.99.0")
        assert not available()
        found.cache_clear()
        monkeypatch.setattr(metadata, "version", lambda name: "2.13.0+cpu")
        monkeypatch.setattr(platform, "machine", lambda: "aarch64")
        assert not available()
    finally:
        found.cache_clear()


@needs_ln
@pytest.mark.parametrize("imported", [True, False])
def test_one_mkl_thread_gives_the_thread_its_setting_back(imported):
    """The kernels' MKL calls run on their thread and leave it as it was: torch's thread
    count on that thread afterwards is torch's default, whether torch was imported before
    the library was loaded or after (a fresh process each)."""
    code = (
        ("import torch\n" if imported else "") + "from mergekit_math.kernels import torch_log\n"
        "assert torch_log.ln_address()\n"
        "with torch_log.one_mkl_thread():\n"
        "    pass\n"
        "import os, torch\n"
        "print(torch.get_num_threads(), len(os.sched_getaffinity(0)))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    after, _ = map(int, run.stdout.split())
    plain = "import torch; print(torch.get_num_threads())"  # torch's own default here
    want = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, check=True)
    assert after == int(want.stdout)


@pytest.mark.skipif(not prepares_without_torch(), reason="torch's steps unchecked here")
@pytest.mark.parametrize(("row", "rows"), [(2048, 40), (700, 30), (5632, 6), (20, 100), (7, 60)])
def test_compiled_preparation_is_the_torch_steps(row, rows):
    """The KLs of the whole path (torch's softmaxes, ε, log, product and sums) bit for bit,
    and the importances' histogram and flags of the separate pass, from bfloat16 rows; rows
    of 7 whose KLs round below zero set the flag the selection reads (bit 1)."""
    rng = np.random.default_rng(row)
    base = torch.from_numpy((rng.standard_normal(rows * row) * 0.02).astype(np.float32))
    base = base.bfloat16()
    # rows of 7 nearly equal: some KLs round below zero
    scale = 0.0001 if row == 7 else 0.002
    noise = torch.from_numpy(rng.standard_normal(rows * row).astype(np.float32))
    model = (base.float() + noise * scale).bfloat16()
    b, m = (t.view(torch.int16).numpy().view(np.uint16) for t in (base, model))
    want = row_kl(model.float().view(-1, row), base.float().view(-1, row)).reshape(-1).numpy()
    hist_want = np.zeros(BINS, np.int32)
    flags_want = importance_bins(b, m, want, np.int64(row), hist_want)
    kl, hist = np.empty(rows, np.float32), np.zeros(BINS, np.int32)
    with torch_log.one_mkl_thread():
        flags = kl_importance_bins(
            b,
            m,
            np.int64(row),
            np.int64(kernels.softmax_lanes()),
            np.float32(1e-8),
            torch_log.ln_address(),
            kl,
            hist,
        )
    assert (kl.view(np.int32) == want.view(np.int32)).all()
    assert (hist == hist_want).all() and flags == flags_want
    if row == 7:
        assert (want < 0).any() and flags & 2


@pytest.mark.skipif(not prepares_without_torch(), reason="torch's steps unchecked here")
def test_compiled_preparation_reports_non_finite_inputs():
    base = np.ones(64, np.float32)
    model = np.ones(64, np.float32)
    model[50] = np.nan
    kl, hist = np.empty(2, np.float32), np.zeros(BINS, np.int32)
    flags = kl_importance_bins(
        base,
        model,
        np.int64(32),
        np.int64(kernels.softmax_lanes()),
        np.float32(1e-8),
        torch_log.ln_address(),
        kl,
        hist,
    )
    assert flags == -1

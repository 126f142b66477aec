"""kernels/torch_softmax.py: torch's float32 CPU softmax, bit for bit, and where it holds."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mergekit_math import kernels
from mergekit_math.kernels import torch_softmax

# one run per vector width torch dispatches to on this machine: AVX-512 (16 lanes) where the
# CPU has it, and AVX2 (8 lanes, forced with ATEN_CPU_CAPABILITY) where it has that
_CHECK = """
import sys
import numpy as np
import torch
from mergekit_math import kernels
from mergekit_math.kernels.torch_softmax import softmax_rows
lanes = kernels.softmax_lanes()
assert lanes == int(sys.argv[1]), lanes
rng = np.random.default_rng(5)
differ = []
for n in [*range(1, 300), 1000, 2047, 2048, 2049, 5632, 32000]:
    for scale in (1e-3, 1.0, 40.0, 300.0):
        x = (rng.standard_normal((3, n)) * scale).astype(np.float32)
        x[1] = np.round(x[1])  # ties for the maximum, exact zeros of both signs
        x[1, : n // 2] *= -1
        want = torch.softmax(torch.from_numpy(x), dim=-1).numpy().reshape(-1)
        got = np.empty(x.size, np.float32)
        assert softmax_rows(x.reshape(-1), np.int64(n), np.int64(lanes), got)
        if (got.view(np.int32) != want.view(np.int32)).any():
            differ.append((n, scale))
bf16 = torch.from_numpy((rng.standard_normal(64 * 2048) * 0.02).astype(np.float32)).bfloat16()
want = torch.softmax(bf16.float().view(-1, 2048), dim=-1).numpy().reshape(-1)
got = np.empty(want.size, np.float32)
assert softmax_rows(bf16.view(torch.int16).numpy().view(np.uint16), np.int64(2048),
                    np.int64(lanes), got)
if (got.view(np.int32) != want.view(np.int32)).any():
    differ.append("bfloat16")
print(differ)
"""

_WIDTHS = [("", 16), ("avx2", 8)]


@pytest.mark.parametrize(("capability", "lanes"), _WIDTHS)
def test_softmax_is_torchs_bits(capability, lanes):
    """Every row length up to 300 and long rows, at scales whose exponentials span the
    normal range, underflow to subnormals (two rounded scalings) and to 0 (below -104),
    with ties and signed zeros, from float32 and bfloat16 storage: torch's softmax to the
    bit, for each vector width torch runs here (16 lanes: AVX-512, 8: AVX2)."""
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    kernels.softmax_lanes.cache_clear()
    try:
        found = _lanes_under(capability)
    finally:
        kernels.softmax_lanes.cache_clear()
    if found != lanes:
        pytest.skip(f"torch's {lanes}-lane softmax is not what runs here")
    run = subprocess.run(
        [sys.executable, "-c", _CHECK, str(lanes)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


def _lanes_under(capability: str) -> int:
    old = os.environ.pop("ATEN_CPU_CAPABILITY", None)
    try:
        if capability:
            os.environ["ATEN_CPU_CAPABILITY"] = capability
        return kernels.softmax_lanes()
    finally:
        os.environ.pop("ATEN_CPU_CAPABILITY", None)
        if old is not None:
            os.environ["ATEN_CPU_CAPABILITY"] = old


def test_the_lane_count_shows_in_the_bits():
    """The sum's lane structure is not a detail: 16 lanes where torch ran 8 (or the
    reverse) gives other bits on some rows (so the test above can fail)."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 1000)) * 3).astype(np.float32)
    outs = {}
    for lanes in (8, 16):
        out = outs[lanes] = np.empty(x.size, np.float32)
        assert torch_softmax.softmax_rows(x.reshape(-1), np.int64(1000), np.int64(lanes), out)
    assert (outs[8].view(np.int32) != outs[16].view(np.int32)).any()
    # and both are softmaxes to within rounding
    want = torch.softmax(torch.from_numpy(x), dim=-1).numpy().reshape(-1)
    for got in outs.values():
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_expf_on_its_edges():
    """SLEEF's expf (u10: within one unit in the last place): 1 at ±0, exact powers of two
    where the reduction is exact, subnormal results near e^-100, 0 below -104. Its bits are
    torch's through the softmax test above (torch.exp itself runs MKL's, not SLEEF's)."""
    from numba import njit

    @njit
    def many(d, out):
        for i in range(d.size):
            out[i] = torch_softmax.expf(d[i])

    d = np.concatenate(
        [
            np.array([-0.0, 0.0, -103.0, -104.5, -200.0], np.float32),
            -np.linspace(0, 103.9, 4001, dtype=np.float32),
        ]
    )
    got = np.empty_like(d)
    many(d, got)
    want = np.exp(d.astype(np.float64))
    assert got[0] == 1 and got[1] == 1
    assert got[2] > 0 and got[3] == 0 and got[4] == 0  # a subnormal at -103, 0 below -104
    normal = want > np.finfo(np.float32).tiny
    ulp = np.spacing(want[normal].astype(np.float32)).astype(np.float64)
    assert (np.abs(got[normal] - want[normal]) <= ulp).all()
    assert (np.abs(got[~normal] - want[~normal]) <= 2 * np.float64(1.4e-45)).all()


def test_non_finite_input_is_reported_not_computed():
    x = np.ones(64, np.float32)
    x[40] = np.inf
    out = np.empty(64, np.float32)
    assert not torch_softmax.softmax_rows(x, np.int64(32), np.int64(16), out)
    p, q = np.empty(64, np.float32), np.empty(64, np.float32)
    ok = torch_softmax.smoothed_softmax_ratio(
        np.ones(64, np.float32), x, np.int64(32), np.int64(16), np.float32(1e-8), p, q
    )
    assert not ok


@pytest.mark.skipif(not kernels.softmax_lanes(), reason="torch's softmax unchecked here")
def test_smoothed_ratio_is_the_torch_steps():
    """p = softmax(m) + ε and q = p / (softmax(b) + ε) as Arcee Fusion's whole path
    computes them with torch."""
    rng = np.random.default_rng(3)
    b = torch.from_numpy((rng.standard_normal((40, 700)) * 0.05).astype(np.float32)).bfloat16()
    m = b.float() + 0.01 * torch.randn(40, 700, generator=torch.Generator().manual_seed(1))
    m = m.bfloat16()
    eps = 1e-8
    want_p = torch.softmax(m.float(), dim=-1) + eps
    want_q = want_p / (torch.softmax(b.float(), dim=-1) + eps)
    p, q = np.empty(28000, np.float32), np.empty(28000, np.float32)
    bits = [t.view(torch.int16).numpy().view(np.uint16).reshape(-1) for t in (b, m)]
    lanes = np.int64(kernels.softmax_lanes())
    assert torch_softmax.smoothed_softmax_ratio(*bits, np.int64(700), lanes, np.float32(eps), p, q)
    assert (p.view(np.int32) == want_p.numpy().reshape(-1).view(np.int32)).all()
    assert (q.view(np.int32) == want_q.numpy().reshape(-1).view(np.int32)).all()


def test_lanes_follow_torchs_dispatch(monkeypatch):
    """16 with AVX-512 (vl, bw, dq) and FMA, 8 with AVX2 and FMA, as torch picks; what
    ATEN_CPU_CAPABILITY forces; 0 off x86-64, for another torch, or for the default
    (unvectorised) kernels."""
    from importlib import metadata

    lanes = kernels.softmax_lanes
    avx512 = {"avx2", "fma", "avx512f", "avx512vl", "avx512bw", "avx512dq"}
    monkeypatch.setattr(metadata, "version", lambda name: "2.13.0+cpu")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    cases = [
        (avx512, None, 16),
        (avx512 - {"avx512dq"}, None, 8),
        ({"avx2", "fma"}, None, 8),
        ({"avx2"}, None, 0),
        (avx512, "avx2", 8),
        (avx512, "default", 0),
        ({"avx2", "fma"}, "avx512", 0),
    ]
    try:
        for flags, forced, want in cases:
            monkeypatch.setattr(kernels, "_cpu_flags", lambda flags=flags: set(flags))
            if forced is None:
                monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
            else:
                monkeypatch.setenv("ATEN_CPU_CAPABILITY", forced)
            lanes.cache_clear()
            assert lanes() == want, (flags, forced)
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        monkeypatch.setattr(kernels, "_cpu_flags", lambda: set(avx512))
        monkeypatch.setattr(metadata, "version", lambda name: "2.99.0")
        lanes.cache_clear()
        assert lanes() == 0
        import platform

        monkeypatch.setattr(metadata, "version", lambda name: "2.13.0")
        monkeypatch.setattr(platform, "machine", lambda: "aarch64")
        lanes.cache_clear()
        assert lanes() == 0
    finally:
        lanes.cache_clear()

"""Time DARE's keep-mask generation per element: the version-1 streams against version 2.

    PYTHONPATH=. python scripts/bench_masks.py [--elements 16777216] [--runs 5]

Version 1 was ``torch.rand(n, generator) < density`` (Mersenne Twister, one serial stream per
tensor; mmath drew it through numpy's MT19937 when it could, shown as its own row). Version 2
is one byte of Philox-4x64-10 per element, by element index, with ties refined from spare
words (``mergekit_math.methods.masks``): shown on one thread, as the engine runs it (2**18-
element chunks on a pool of threads with one intra-op thread each), and through the torch ops
the GPU uses, run on the CPU.
Prints the median of ``--runs`` runs in ns per element, and the CUDA row where a GPU is present.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


def _median_ns(fn: Callable[[], object], n: int, runs: int, sync: Callable[[], None]) -> float:
    fn()  # warm up
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / n * 1e9


def main() -> None:
    import numpy as np
    import torch

    from mergekit_math.methods.masks import MaskStream

    ap = argparse.ArgumentParser()
    ap.add_argument("--elements", type=int, default=1 << 24)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    n, density = args.elements, 0.3
    stream = MaskStream.of(0, 0, "model.layers.0.mlp.up_proj.weight")
    limit = int(np.ceil(np.float32(density) * 2.0**24))
    chunk = 1 << 18

    def v1_torch() -> object:
        return torch.rand(n, generator=torch.Generator().manual_seed(1)) < density

    def v1_numpy() -> object:
        words = np.random.Generator(np.random.MT19937(1)).integers(0, 2**32, n, dtype=np.uint32)
        return torch.from_numpy((words & 0xFFFFFF) < limit)

    def one_chunk(start: int) -> object:
        torch.set_num_threads(1)
        return stream.keep(start, min(chunk, n - start), density)

    pool = ThreadPoolExecutor(args.threads)

    def v2_pool() -> object:
        return list(pool.map(one_chunk, range(0, n, chunk)))

    def v2_one() -> object:
        return stream.keep(0, n, density)

    def nothing() -> None:
        return None

    rows = [
        ("v1 torch.rand(generator) < density", v1_torch, nothing, 1),
        ("v1 numpy MT19937 words < limit", v1_numpy, nothing, 1),
    ]
    torch.set_num_threads(1)
    results = [(name, _median_ns(fn, n, args.runs, sync), t) for name, fn, sync, t in rows]
    results.append(("v2 Philox bytes, whole tensor", _median_ns(v2_one, n, args.runs, nothing), 1))
    results.append(
        (
            "v2 Philox bytes, 256K chunks on a pool",
            _median_ns(v2_pool, n, args.runs, nothing),
            args.threads,
        )
    )
    from mergekit_math.methods import masks

    def v2_torch_ops() -> object:
        numpy_backend = masks._numpy_backend
        masks._numpy_backend = lambda device: False
        try:
            return stream.keep(0, min(n, 1 << 20), density)
        finally:
            masks._numpy_backend = numpy_backend

    ops_ns = _median_ns(v2_torch_ops, min(n, 1 << 20), args.runs, nothing)
    results.append(("v2 through the torch ops (the GPU path) on the CPU", ops_ns, 1))
    if torch.cuda.is_available():

        def v2_cuda() -> object:
            return stream.keep(0, n, density, "cuda")

        cuda_ns = _median_ns(v2_cuda, n, args.runs, torch.cuda.synchronize)
        results.append(("v2 Philox bytes on CUDA", cuda_ns, 0))
    print(f"{n} elements, density {density}, median of {args.runs} runs")
    print("| mask | threads | ns/element |\n|---|---|---|")
    for name, ns, threads in results:
        print(f"| {name} | {threads or 'GPU'} | {ns:.2f} |")


if __name__ == "__main__":
    main()

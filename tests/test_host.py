"""Merges on numpy arrays (mergekit_math.merge.host): a plan whose tensors all go through
compiled kernels is read, merged and written without torch, to the same bytes as the merge
with torch; a kernel that declines a range falls back to torch there."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import load_dir, make_model, write_recipe

from mergekit_math import kernels
from mergekit_math.io.reader import Checkpoint
from mergekit_math.io.writer import HostPart
from mergekit_math.merge import build_plan, execute, host
from mergekit_math.merge.fused import FusedRange
from mergekit_math.merge.host import prepares_with_torch, runs_on_numpy, runs_without_torch
from mergekit_math.methods.arcee_fusion import prepares_without_torch
from mergekit_math.recipe import load_recipe

_PARAMS = {
    "task_arithmetic": "parameters: {weight: 0.7}",
    "ties": "parameters: {weight: 1.0, density: 0.4}",
    "breadcrumbs": "parameters: {weight: 0.8, density: 0.6, gamma: 0.05}",
    "dare_ties": "parameters: {weight: 1.0, density: 0.5}",
    "dare_linear": "parameters: {weight: 0.6, density: 0.3}",
    "della": "parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}",
    "linear": "parameters: {weight: 0.6}",
    "ramplus_tl": "parameters: {}",
    "sce": "parameters: {}",
    "nuslerp": "parameters: {weight: 0.7}",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """bfloat16 base and fine-tunes with a non-float tensor each (a copied int64 buffer)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("host")
    base = make_model(root / "base32", seed=0)
    out = {
        "base": make_model(root / "base", seed=0, dtype="bfloat16"),
        "a": make_model(root / "a", base=base, seed=1, dtype="bfloat16"),
        "b": make_model(root / "b", base=base, seed=2, dtype="bfloat16"),
    }
    for folder in out.values():
        tensors = load_file(folder / "model.safetensors")
        tensors["model.layers.0.self_attn.steps"] = torch.arange(7, dtype=torch.int64)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return out


def _recipe(tmp_path, models, method: str, extra: str = "") -> object:
    if method == "arcee_fusion":  # one model besides the base
        others = f"  - model: {models['a']}\n"
    else:
        params = _PARAMS[method]
        others = f"  - model: {models['a']}\n    {params}\n  - model: {models['b']}\n    {params}\n"
    return write_recipe(
        tmp_path / f"{method}.yaml",
        f"merge_method: {method}\n"
        + ("" if method == "linear" else f"base_model: {models['base']}\n")
        + extra
        + "models:\n"
        + others,
    )


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_which_plans_run_without_torch(tmp_path, monkeypatch, models):
    """Kernels on (here forced: the models are small), CPU, plain files, every tensor fused
    or copied, preparations without torch (DELLA's keep decisions and L1 sums included)."""
    monkeypatch.setenv("MMATH_FUSED", "1")

    def plan(method: str, extra: str = ""):
        return build_plan(load_recipe(_recipe(tmp_path, models, method, extra)))

    host = ["task_arithmetic", "ties", "breadcrumbs", "dare_ties", "linear", "ramplus_tl", "della"]
    # SCE's short tensors' sums in torch's order where that is known (x86-64, torch checked)
    with_torch = ["nuslerp"]
    (host if kernels.torch_sums_known() else with_torch).append("sce")
    # Arcee Fusion's softmaxes, log and sums, where torch's are known here
    (host if prepares_without_torch() else with_torch).append("arcee_fusion")
    for method in host:
        assert runs_without_torch(plan(method), "cpu"), method
    assert not runs_without_torch(plan("task_arithmetic"), "cuda")
    # fused, but prepared with torch: on numpy arrays, torch imported in the background
    for method in with_torch:
        assert not runs_without_torch(plan(method), "cpu"), method
        assert runs_on_numpy(plan(method), "cpu") and prepares_with_torch(plan(method)), method
    assert not prepares_with_torch(plan("della"))
    # L1 rescaling of DARE drops has no kernel: those tensors need the torch path
    assert not runs_without_torch(plan("dare_ties", "parameters: {rescale: l1}\n"), "cpu")
    monkeypatch.setenv("MMATH_TORCH", "1")
    assert not runs_without_torch(plan("task_arithmetic"), "cpu")
    monkeypatch.delenv("MMATH_TORCH")
    monkeypatch.setenv("MMATH_FUSED", "0")
    assert not runs_without_torch(plan("task_arithmetic"), "cpu")


def _run_driver(driver: str, recipe, out, mode: str) -> subprocess.CompletedProcess:
    """``driver`` (a script merging ``recipe`` into ``out``) in a fresh interpreter, with
    the kernels on and ``MMATH_TORCH=mode``; it must succeed."""
    import os
    from pathlib import Path

    env = {**os.environ, "MMATH_FUSED": "1", "PYTHONPATH": str(Path.cwd()), "MMATH_TORCH": mode}
    run = subprocess.run(
        [sys.executable, "-c", driver, str(recipe), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return run


_DRIVER = textwrap.dedent(
    """
    import json, sys
    from mergekit_math.cli import main
    sys.argv = ["mmath", "merge", sys.argv[1], sys.argv[2], "--quiet"]
    try:
        main()
    except SystemExit as exc:
        assert not exc.code, exc.code
    from mergekit_math.merge.host import imported_here
    print(json.dumps({"torch": "torch" in sys.modules, "freeze": imported_here()}))
    """
)


# SCE prepares without torch where torch's order of its short sums is known here, Arcee
# Fusion where its softmax, log and sums are
_SCE = ["sce"] if kernels.torch_sums_known() else []
_ARCEE = ["arcee_fusion"] if prepares_without_torch() else []


@pytest.mark.parametrize(
    "method",
    ["task_arithmetic", "ties", "dare_ties", "linear", "ramplus_tl", "della", *_SCE, *_ARCEE],
)
def test_cli_merge_never_imports_torch_and_writes_the_same_bytes(
    tmp_path, monkeypatch, models, method
):
    """`mmath merge` of such a plan runs without importing torch, and its files are the
    bytes of the same merge with torch (MMATH_TORCH=1), the copied int64 tensor included."""
    recipe = _recipe(tmp_path, models, method)
    got = {}
    for mode in ("0", "1"):
        out = tmp_path / f"out{mode}"
        run = _run_driver(_DRIVER, recipe, out, mode)
        # either way the exit skips the final collections (cli.startup.freeze_for_exit)
        want = {"torch": mode == "1", "freeze": True}
        assert json.loads(run.stdout.strip().splitlines()[-1]) == want
        got[mode] = _files(out)
    assert got["0"] == got["1"]
    merged = load_dir(tmp_path / "out0")
    assert torch.equal(merged["model.layers.0.self_attn.steps"], torch.arange(7))
    # the merge changed the weights (the comparison above cannot pass by copying)
    base = load_dir(models["base"])
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(merged[name], base[name])


_BACKGROUND_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from mergekit_math.cli import main
    from mergekit_math.merge import host
    from mergekit_math.merge.fused import FusedRange
    call = FusedRange.__call__
    arrays = []
    def watch(self, raw, start, states):
        arrays.append(type(raw[0]).__name__)
        return call(self, raw, start, states)
    FusedRange.__call__ = watch
    sys.argv = ["mmath", "merge", sys.argv[1], sys.argv[2], "--quiet"]
    try:
        main()
    except SystemExit as exc:
        assert not exc.code, exc.code
    import torch
    print(json.dumps({
        "background": host._background is not None,
        "alive": host._background is not None and host._background.is_alive(),
        "arrays": sorted(set(arrays)),
        "threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)),
    }))
    """
)


@pytest.mark.parametrize(
    "method", ["nuslerp", *(["sce"] if not _SCE else []), *(["arcee_fusion"] if not _ARCEE else [])]
)
def test_merge_prepared_with_torch_reads_numpy_and_imports_torch_meanwhile(
    tmp_path, models, method
):
    """A plan whose tensors are all fused but whose preparation needs torch reads and merges
    numpy arrays while torch is imported on a thread of its own; the files are the bytes of
    the merge with torch (MMATH_TORCH=1), and torch's thread count is given back after."""
    recipe = _recipe(tmp_path, models, method)
    got, report = {}, {}
    for mode in ("0", "1"):
        out = tmp_path / f"out{mode}"
        run = _run_driver(_BACKGROUND_DRIVER, recipe, out, mode)
        report[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        got[mode] = _files(out)
    assert got["0"] == got["1"]
    assert report["0"]["background"] and not report["0"]["alive"]
    assert report["0"]["arrays"] == ["ndarray"] and report["1"]["arrays"] == ["Tensor"]
    assert not report["1"]["background"]
    # the merge's workers ran torch on one thread each; the process has its count back
    assert report["0"]["threads"] == report["0"]["cpus"]
    base = load_dir(models["base"])
    merged = load_dir(tmp_path / "out0")
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(merged[name], base[name])


def test_imported_torch_is_none_while_a_background_import_runs(monkeypatch):
    """While the background import runs, torch's half-made module is not handed out
    (``imported_torch`` is None) and ``wait_for_torch`` waits for the thread to end."""
    import threading

    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    monkeypatch.setattr(host, "_background", thread)
    try:
        assert host.imported_torch() is None
        assert not host.import_torch_in_background()  # one import at a time
        waited = threading.Thread(target=host.wait_for_torch)
        waited.start()
        waited.join(0.2)
        assert waited.is_alive()  # still waiting for the import thread
    finally:
        release.set()
    waited.join(5)
    assert not waited.is_alive()
    assert host.imported_torch() is torch


_DECLINING_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from mergekit_math.merge import build_plan, execute
    from mergekit_math.merge.fused import FusedRange
    from mergekit_math.recipe import load_recipe
    call = FusedRange.__call__
    def sometimes(self, raw, start, states):
        return None if (start // 1500) % 3 == 1 else call(self, raw, start, states)
    FusedRange.__call__ = sometimes
    execute(build_plan(load_recipe(sys.argv[1])), sys.argv[2], progress=False,
            chunk_elements=1500)
    import torch
    print(json.dumps({"threads": torch.get_num_threads(),
                      "cpus": len(os.sched_getaffinity(0))}))
    """
)


def test_torch_imported_for_declined_ranges_gives_its_thread_count_back(tmp_path, models):
    """A merge on numpy arrays whose kernel declines some ranges imports torch there, with
    one intra-op thread per worker; after the merge the process has its count back."""
    run = _run_driver(_DECLINING_DRIVER, _recipe(tmp_path, models, "ties"), tmp_path / "o", "0")
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["threads"] == report["cpus"]


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_declined_ranges_fall_back_to_torch(tmp_path, monkeypatch, models, method):
    """A kernel that declines some ranges of a merge on numpy arrays: those ranges go
    through the torch path (the inputs turned into tensors without a copy) and the files
    are those of the merge with torch."""
    monkeypatch.setenv("MMATH_FUSED", "1")
    recipe = _recipe(tmp_path, models, method)
    call = FusedRange.__call__
    declined, hosted = [], []

    def sometimes(self, raw, start, states):
        hosted.append(isinstance(raw[0], np.ndarray))
        if (start // 1500) % 3 == 1:
            declined.append(start)
            return None
        return call(self, raw, start, states)

    out = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("MMATH_TORCH", mode)
        monkeypatch.setattr(FusedRange, "__call__", sometimes if mode == "0" else call)
        plan = build_plan(load_recipe(recipe))
        execute(plan, tmp_path / mode, progress=False, chunk_elements=1500)
        out[mode] = _files(tmp_path / mode)
    assert declined and all(hosted)
    assert out["0"] == out["1"]


def test_reader_reads_ranges_into_numpy(models):
    """``read_host``: the stored bits in the numpy view of the dtype (bfloat16 as uint16),
    those of ``read_range``."""
    ckpt = Checkpoint(models["a"])
    name = "model.layers.1.mlp.up_proj.weight"
    want = ckpt.read(name).reshape(-1)[100:1100]
    buf = np.empty(2400, np.uint8)
    got = ckpt.read_host(name, 100, 1100, buf)
    assert got.dtype == np.uint16 and got.shape == (1000,)
    assert np.array_equal(got, want.view(torch.int16).numpy().view(np.uint16))
    steps = ckpt.read_host("model.layers.0.self_attn.steps", 2, 5, np.empty(64, np.uint8))
    assert steps.tolist() == [2, 3, 4]
    ckpt.close()


def test_writer_takes_host_parts(tmp_path):
    """The sharded writer writes numpy parts (bfloat16 bits, bool) as it writes tensors,
    and checks their dtype and count against the plan."""
    from safetensors.torch import load_file

    from mergekit_math.io.reader import TensorInfo
    from mergekit_math.io.writer import ShardedWriter

    x = torch.randn(3, 5).to(torch.bfloat16)
    flags = torch.tensor([True, False, True])
    infos = [
        TensorInfo("x", tmp_path / "in", "bfloat16", (3, 5)),
        TensorInfo("flags", tmp_path / "in", "bool", (3,)),
    ]
    writer = ShardedWriter(tmp_path, infos, 10**9)
    bits = x.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    writer.write_part("x", HostPart(bits[:7], "bfloat16"), False)
    writer.write_part("x", HostPart(bits[7:], "bfloat16"), True)
    with pytest.raises(RuntimeError, match="planned bool, computed uint8"):
        writer.write_part("flags", HostPart(np.zeros(3, np.uint8), "uint8"), True)
    writer.write_part("flags", HostPart(flags.numpy(), "bool"), True)
    writer.close()
    back = load_file(tmp_path / "model.safetensors")
    assert torch.equal(back["x"], x) and torch.equal(back["flags"], flags)


def test_linear_weight_sum_without_torch_is_torchs():
    """linear's normalising sum of up to four weights, added in order in float32 without
    torch, is torch's float32 sum to the bit (five values already are not always)."""
    from mergekit_math.methods.linear import LinearModel, _total, _total32

    rng = np.random.default_rng(0)
    differ = 0
    for trial in range(4000):
        n = 1 + trial % 5
        scale = rng.choice([1e-3, 1.0, 1e3], n)
        weights = (rng.standard_normal(n) * scale).astype(np.float32) + np.float32(0.01)
        params = [LinearModel(weight=float(w)) for w in weights]
        want = _total(params, torch.float32).item()
        if n <= 4:
            assert _total32(params) == np.float32(want), weights
        else:
            total = np.float32(params[0].weight)
            for p in params[1:]:
                total = np.float32(total + np.float32(p.weight))
            differ += total != np.float32(want)
            assert _total32(params) == np.float32(want)  # through torch
    assert differ  # in-order addition is not torch's sum from five values on


def test_merge_on_numpy_warms_the_kernels_on_a_thread_and_joins_it(tmp_path, monkeypatch, models):
    """A merge on numpy arrays sets numba's dispatch up on a thread of its own from its
    start (host.warm_kernels_in_background) and has joined it when it returns; a merge with
    torch starts none."""
    from mergekit_math.merge import execution

    monkeypatch.setenv("MMATH_FUSED", "1")
    started = []

    def spy(mapped=None):
        thread = host.warm_kernels_in_background(mapped)
        started.append(thread)
        return thread

    monkeypatch.setattr(execution, "warm_kernels_in_background", spy)
    recipe = _recipe(tmp_path, models, "ties")
    for mode in ("0", "1"):
        monkeypatch.setenv("MMATH_TORCH", mode)
        execute(build_plan(load_recipe(recipe)), tmp_path / mode, progress=False)
        assert len(started) == 1 and not started[0].is_alive()


def test_warming_loads_a_kernel_in_a_fresh_process():
    """The warm-up really compiles or loads a kernel (its failure would be silent)."""
    code = (
        "from mergekit_math.merge.host import warm_kernels_in_background\n"
        "warm_kernels_in_background().join()\n"
        "from mergekit_math.kernels.elementwise import widen_into\n"
        "print(len(widen_into.overloads))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["1"]

"""Helpers of scripts/bench_merge.py: synthetic checkpoints, one recipe per merge method, the
IO floor (``cat`` + ``dd``), page-cache control, process measurement and output comparison.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "7b": (4096, 11008, 32, 32, 32, 32000),  # Llama-2-7B
    "tinyllama": (2048, 5632, 22, 32, 4, 32000),
    "smol": (576, 1536, 30, 9, 3, 49152),
    "pico": (256, 768, 4, 4, 2, 8000),
}
SHARD_BYTES = 5 * 10**9

# Per method: which of base (B), ft_a (A), ft_b (C) it reads, and its recipe body. "{B}",
# "{A}", "{C}" are replaced by the checkpoint paths. Parameters follow recipes/NAME.yaml.
_DELTA = "base_model: {B}\nmodels:\n  - model: {A}\n    parameters: {P}\n  - model: {C}\n"
_DELTA += "    parameters: {P}\n"
_PLAIN2 = "base_model: {B}\nmodels:\n  - model: {A}\n  - model: {C}\n"
_ONE = "base_model: {B}\nmodels:\n  - model: {A}\n"
RECIPES: dict[str, tuple[str, str]] = {
    "task_arithmetic": ("BAC", _DELTA.replace("{P}", "{weight: 0.5}")),
    "linear": (
        "BAC",
        "models:\n  - model: {B}\n    parameters: {weight: 0.2}\n"
        "  - model: {A}\n    parameters: {weight: 0.4}\n"
        "  - model: {C}\n    parameters: {weight: 0.4}\n",
    ),
    "dare_ties": ("BAC", _DELTA.replace("{P}", "{weight: 0.5, density: 0.5}")),
    "dare_linear": ("BAC", _DELTA.replace("{P}", "{weight: 0.5, density: 0.5}")),
    "ties": ("BAC", _DELTA.replace("{P}", "{weight: 1.0, density: 0.5}")),
    "breadcrumbs": ("BAC", _DELTA.replace("{P}", "{weight: 0.6, density: 0.9, gamma: 0.01}")),
    "breadcrumbs_ties": (
        "BAC",
        _DELTA.replace("{P}", "{weight: 1.0, density: 0.8, gamma: 0.02}")
        + "parameters: {normalize: true}\n",
    ),
    "della": ("BAC", _DELTA.replace("{P}", "{weight: 1.0, density: 0.5, epsilon: 0.15}")),
    "della_linear": ("BAC", _DELTA.replace("{P}", "{weight: 0.5, density: 0.6, epsilon: 0.1}")),
    "arcee_fusion": ("BA", _ONE),
    "karcher": (
        "BAC",
        "models:\n  - model: {B}\n  - model: {A}\n  - model: {C}\n"
        "parameters: {max_iter: 10, tol: 1.0e-5}\n",
    ),
    "model_stock": ("BAC", _PLAIN2),
    "multislerp": (
        "BAC",
        "base_model: {B}\nmodels:\n  - model: {A}\n    parameters: {weight: 0.6}\n"
        "  - model: {C}\n    parameters: {weight: 0.4}\n",
    ),
    "nearswap": ("BA", _ONE + "parameters: {t: 0.001}\n"),
    "nuslerp": ("BAC", _DELTA.replace("{P}", "{weight: 1.0}")),
    "passthrough": ("A", "models:\n  - model: {A}\n"),
    "ram": ("BAC", _PLAIN2 + "parameters: {epsilon: 1.0e-5}\n"),
    "ramplus_tl": ("BAC", _PLAIN2 + "parameters: {epsilon: 1.0e-5, r: 0.1, alpha: 0.2}\n"),
    "sce": ("BAC", _PLAIN2 + "parameters: {select_topk: 0.1}\n"),
    "slerp": ("BA", _ONE + "parameters: {t: 0.5}\n"),
}
SELECTION = ("ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
# Issue 16's targets (time as a multiple of the IO floor of the same run)
TARGETS = {"task_arithmetic": 1.3, "linear": 1.3, "dare_ties": 1.5, "dare_linear": 1.5}
TARGETS |= dict.fromkeys(SELECTION, 2.0)
# the eight methods added by the method-contract issue
NEWER = ("nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl")
TARGETS |= dict.fromkeys(NEWER, 2.5)
UNNAMED_TARGET = 2.5  # slerp, model_stock, passthrough: the issue names none
TARGET_RSS = 0.3
COLD_TARGETS = {"task_arithmetic": 1.1}  # point 4: out of core, plus mmath's RSS under 1 GB
COLD_RSS_BYTES = 10**9


def recipe_text(method: str, paths: dict[str, Path]) -> str:
    _, body = RECIPES[method]
    for key, path in paths.items():
        body = body.replace("{" + key + "}", str(path))
    return f"merge_method: {method}\ndtype: bfloat16\n{body}"


def method_inputs(method: str, paths: dict[str, Path]) -> list[Path]:
    return [paths[k] for k in RECIPES[method][0]]


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


# ----------------------------------------------------------------------------- checkpoints


def tensor_shapes(shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    hidden, inter, layers, heads, kv, vocab = shape
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def checkpoint_bytes(shape: tuple[int, ...]) -> int:
    """bf16 bytes of one checkpoint's tensors (headers add a few KB)."""
    total = 0
    for s in tensor_shapes(shape).values():
        n = 1
        for d in s:
            n *= d
        total += 2 * n
    return total


def generate(folder: Path, shape: tuple[int, ...], seed: int, base: Path | None) -> None:
    """A Llama checkpoint: N(0, 0.02) 2-D weights, or ``base`` + N(0, 0.002) when given."""
    import torch

    from mergekit_math.io.reader import Checkpoint, TensorInfo
    from mergekit_math.io.writer import ShardedWriter

    shapes = tensor_shapes(shape)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    infos = [TensorInfo(n, Path(), "bfloat16", s) for n, s in shapes.items()]
    writer = ShardedWriter(tmp, infos, SHARD_BYTES)
    g = torch.Generator().manual_seed(seed)
    source = Checkpoint(base) if base is not None else None
    for name, s in shapes.items():
        if source is None:
            t = torch.randn(s, generator=g) * 0.02 if len(s) == 2 else torch.ones(s)
        else:
            t = source.read(name).float()
            t += torch.randn(s, generator=g) * 0.002
        writer.write(name, t.to(torch.bfloat16))
        del t
    writer.close()
    if source is not None:
        source.close()
    hidden, inter, layers, heads, kv, vocab = shape
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    os.replace(tmp, folder)


def checkpoint_paths(work: Path, shape_name: str, shape: tuple[int, ...]) -> dict[str, Path]:
    root = work / f"{shape_name}-{'x'.join(map(str, shape))}"
    return {"B": root / "base", "A": root / "ft_a", "C": root / "ft_b"}


def missing(paths: dict[str, Path]) -> list[Path]:
    return [p for p in paths.values() if not (p / "config.json").is_file()]


def ensure_checkpoints(paths: dict[str, Path], shape: tuple[int, ...]) -> None:
    """Generate what is missing (base first: the fine-tunes are base + noise)."""
    for key, seed in (("B", 0), ("A", 1), ("C", 2)):
        folder = paths[key]
        if not (folder / "config.json").is_file():
            print(f"generating {folder} ...", file=sys.stderr, flush=True)
            generate(folder, shape, seed, None if key == "B" else paths["B"])


def check_space(work: Path, paths: dict[str, Path], shape: tuple[int, ...]) -> str:
    """Refuse (SystemExit) when the missing checkpoints plus two outputs do not fit."""
    one = checkpoint_bytes(shape)
    need = len(missing(paths)) * one + 2 * one + 10**9  # two outputs at once, 1 GB margin
    free = shutil.disk_usage(work).free
    note = f"{human(free)} free in {work}, {human(need)} needed"
    if free < need:
        raise SystemExit(
            f"not enough disk space: {note} ({len(missing(paths))} checkpoints of "
            f"{human(one)} to generate, plus two outputs of {human(one)} and 1 GB margin); "
            "free space, choose --work elsewhere or a smaller --shape"
        )
    return note


# ----------------------------------------------------------------------------- measuring


@dataclass
class Run:
    seconds: float
    peak: int  # bytes
    timings: dict[str, float] | None = None  # MMATH_TIMINGS of an mmath run


def _peak_rss(p: Any) -> int:
    """A process's peak RSS so far: VmHWM where /proc has it (exact up to the last poll), else
    its current RSS."""
    try:
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return p.memory_info().rss


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Wall time and peak RSS of the process tree of ``cmd`` (which must succeed).

    The peak is polled from the tree (VmHWM), not taken from ``wait4``'s ``ru_maxrss``: Linux
    keeps a process's maxrss across ``execve``, so a child forked from this script starts with
    this script's RSS at the fork (which grows once outputs are compared) as its "peak".
    """
    import psutil

    peak_tree = 0
    done = threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def poll() -> None:
        nonlocal peak_tree
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        peaks: dict[int, int] = {}
        tree = [root]
        polls = 0
        while not done.is_set():
            try:
                # finding the children reads every process's /proc entry: 20-30% of a core
                # at every poll, taken from the run it measures; VmHWM is a peak already, so
                # the tree is looked up every 0.5 s and its known members read every 20 ms
                if polls % 25 == 0:
                    tree = [root, *root.children(recursive=True)]
                for p in tree:
                    peaks[p.pid] = max(peaks.get(p.pid, 0), _peak_rss(p))
            except psutil.Error:
                pass
            peak_tree = max(peak_tree, sum(peaks.values()))
            polls += 1
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, _ = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    poller.join()
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    return Run(seconds, peak_tree)


def compile_bytecode() -> str:
    """Byte-compile mmath's modules, as `pip install` does for an installed package (and did
    for mergekit): from a working tree run under PYTHONDONTWRITEBYTECODE=1 every `mmath`
    process would otherwise compile its ~150 modules from source (0.15-0.2 s here)."""
    import compileall

    import mergekit_math

    folder = Path(mergekit_math.__file__).resolve().parent
    if not compileall.compile_dir(folder, quiet=1, workers=1):
        raise SystemExit(f"could not byte-compile {folder}")
    return f"mmath's modules byte-compiled before the runs (`compileall {folder.name}`)"


def drop_cache(files: list[Path]) -> None:
    """Evict ``files`` from the page cache (after an fsync: dirty pages are not dropped)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[Path]) -> None:
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


def floor(files: list[Path], out_bytes: int, out_dir: Path) -> tuple[Run, Run, Run]:
    """The IO floor with the plainest tools: ``cat`` of the inputs to /dev/null, then ``dd``
    of the output's size from /dev/zero with ``conv=fsync``. The caller warms or drops the
    inputs' pages first. Returns (cat, the faster dd, the slower dd).

    The ``dd`` runs twice and the faster one is the floor's: on this VM the first write after
    a while into page cache spends most of its time in the copy into pages the host had taken
    back (``perf``: 96% in ``copy_folio_from_iter_atomic``; 2.2 GB in 15-19 s against 1.4-2.5
    s for the same command right after), and a second write of 13.5 GB right after a first
    took 28-35 s against 6.4-7.2 s (the host still flushing the first). Either slow one would
    flatter every tool measured against it."""
    read = measure(["cat", *map(str, files)])
    target = out_dir / "floor.bin"
    count = -(-out_bytes // (16 << 20))
    cmd = ["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}", "conv=fsync"]
    try:
        first = measure([*cmd, "status=none"])
        target.unlink()
        second = measure([*cmd, "status=none"])
    finally:
        target.unlink(missing_ok=True)
    return (read, first, second) if first.seconds <= second.seconds else (read, second, first)


def compare(ours: Path, theirs: Path) -> tuple[float, float]:
    """Max abs difference and the fraction of elements that differ."""
    from safetensors import safe_open

    def files(folder: Path) -> dict[str, Path]:
        out = {}
        for f in shards(folder):
            with safe_open(f, "pt") as h:
                out |= {k: f for k in h.keys()}
        return out

    mine, ref = files(ours), files(theirs)
    if set(mine) != set(ref):
        raise SystemExit(f"tensor names differ: {sorted(set(mine) ^ set(ref))[:5]}")
    worst, differing, total = 0.0, 0, 0
    for name in mine:
        with safe_open(mine[name], "pt") as a, safe_open(ref[name], "pt") as b:
            x, y = a.get_tensor(name).float(), b.get_tensor(name).float()
        d = (x - y).abs()
        worst = max(worst, float(d.max()) if d.numel() else 0.0)
        differing += int(d.count_nonzero())
        total += d.numel()
    return worst, differing / max(total, 1)


def selection_ns(method: str, paths: dict[str, Path], reps: int = 3) -> tuple[float, int]:
    """ns per element of the method's whole-tensor selection on the largest tensor, median
    of ``reps`` after a warm-up, in this process (one thread), with the recipe's parameters;
    and that tensor's element count. TIES and Breadcrumbs: the selection the engine runs
    with the compiled kernels, from the stored pairs in 1M-element ranges (threshold(s)
    and per-range tie rules; ``methods/selection.py``); DELLA: its keep decisions and L1
    sums as the engine prepares them (``methods/magprune.py``: compiled row ranks, the mask
    stream, the sums), from the same ranges."""
    import statistics

    import torch

    from mergekit_math.io.reader import Checkpoint
    from mergekit_math.merge.fused import _as_numpy
    from mergekit_math.methods import PrepareInputs
    from mergekit_math.methods.magprune import della_keeps
    from mergekit_math.methods.masks import MaskStream
    from mergekit_math.methods.selection import StoredMagnitude
    from mergekit_math.methods.sparsify import MagnitudeTrim, RankWindow, breadcrumbs_window

    base, ft = Checkpoint(paths["B"]), Checkpoint(paths["A"])
    name = "model.embed_tokens.weight"
    stored_base, stored_ft = base.read(name), ft.read(name)
    shape = tuple(stored_base.shape)
    stored_base, stored_ft = stored_base.reshape(-1), stored_ft.reshape(-1)
    base.close()
    ft.close()
    n = stored_base.numel()
    ranges = [(s, min(s + (1 << 20), n)) for s in range(0, n, 1 << 20)]
    stored = StoredMagnitude(
        [(_as_numpy(stored_base[a:b]), _as_numpy(stored_ft[a:b])) for a, b in ranges], n
    )

    def window(density: float, gamma: float) -> RankWindow:
        return RankWindow(stored, *breadcrumbs_window(n, density, gamma), ranges)

    held = [(b, [m]) for b, m in stored.parts]

    def della(density: float, epsilon: float) -> object:
        inputs = PrepareInputs(None, [], None, n, ranges, None, None, held=held, shape=shape)
        stream = MaskStream.of(0, 0, name)
        return della_keeps(inputs, {0: (density, epsilon, stream)}, True, shape[-1])[0]

    runs = {
        "ties": lambda: MagnitudeTrim(stored, 0.5, ranges),
        "breadcrumbs": lambda: window(0.9, 0.01),
        "breadcrumbs_ties": lambda: window(0.8, 0.02),
        "della": lambda: della(0.5, 0.15),
        "della_linear": lambda: della(0.6, 0.1),
    }
    seconds = []
    with torch.inference_mode():
        runs[method]()  # warm-up: first-call costs (allocator, kernels) are not the pass
        for _ in range(reps):
            began = time.perf_counter()
            runs[method]()
            seconds.append(time.perf_counter() - began)
    return statistics.median(seconds) * 1e9 / n, n


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil
    import torch

    try:
        from importlib.metadata import version

        mk = version("mergekit")
    except Exception:
        mk = "not installed"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores, {human(psutil.virtual_memory().total)} RAM, "
        f"load average {load} at start, Python {platform.python_version()}, "
        f"torch {torch.__version__}, mergekit {mk}"
    )

"""Benchmark `mmath merge` against mergekit on synthetic checkpoints, side by side in one run.

    python scripts/bench_merge.py --shape tinyllama --reps 3 --markdown docs/benchmarks.md

Generates a base and two "fine-tunes" (base + small noise) of the chosen shape in bf16 (kept in
--work and reused), then runs each recipe as a subprocess under mmath and, when installed,
mergekit-yaml, alternating A B A B. For every run it records wall time and the peak RSS of the
whole process tree (the larger of the kernel's max-RSS for the child and a 10 ms psutil poll of
the summed tree). The IO floor is measured the same way: reading every input file once from the
page cache, and writing and syncing as many bytes as the output has. Deterministic methods are
checked against mergekit's output (max abs difference and the share of differing elements).
Prints a markdown table of medians and ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "tinyllama": (2048, 5632, 22, 32, 4, 32000),
    "smol": (576, 1536, 30, 9, 3, 49152),
    "pico": (256, 768, 4, 4, 2, 8000),
}

RECIPES = {
    "task_arithmetic": "",
    "ties": "density: 0.3, ",
    "dare_ties": "density: 0.1, ",
}
DETERMINISTIC = {"task_arithmetic", "ties"}
TARGET_TIME, TARGET_RSS = 0.25, 0.3


@dataclass
class Run:
    seconds: float
    peak: int  # bytes


# ----------------------------------------------------------------------------- checkpoints


def generate(folder: Path, shape: tuple[int, ...], seed: int, base: Path | None) -> None:
    """A Llama checkpoint: N(0, 0.02) 2-D weights, or ``base`` + N(0, 0.002) when given."""
    import torch

    from mergekit_math.io.reader import Checkpoint, TensorInfo
    from mergekit_math.io.writer import ShardedWriter

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
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    infos = [TensorInfo(n, Path(), "bfloat16", s) for n, s in shapes.items()]
    writer = ShardedWriter(tmp, infos, 10**9)
    g = torch.Generator().manual_seed(seed)
    source = Checkpoint(base) if base is not None else None
    for name, s in shapes.items():
        if base is None:
            t = torch.randn(s, generator=g) * 0.02 if len(s) == 2 else torch.ones(s)
        else:
            assert source is not None
            t = source.read(name).float()
            t += torch.randn(s, generator=g) * 0.002
        writer.write(name, t.to(torch.bfloat16))
    writer.close()
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


def checkpoints(work: Path, shape_name: str, shape: tuple[int, ...]) -> list[Path]:
    root = work / f"{shape_name}-{'x'.join(map(str, shape))}"
    base, a, b = root / "base", root / "ft_a", root / "ft_b"
    for folder, seed, origin in ((base, 0, None), (a, 1, base), (b, 2, base)):
        if not (folder / "config.json").is_file():
            print(f"generating {folder} ...", file=sys.stderr, flush=True)
            generate(folder, shape, seed, origin)
    return [base, a, b]


def recipe_text(method: str, base: Path, a: Path, b: Path) -> str:
    extra = RECIPES[method]
    return (
        f"merge_method: {method}\nbase_model: {base}\ndtype: bfloat16\nmodels:\n"
        f"  - model: {a}\n    parameters: {{{extra}weight: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{{extra}weight: 0.5}}\n"
    )


# ----------------------------------------------------------------------------- measuring


def measure(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Wall time and peak RSS of the process tree of ``cmd`` (which must succeed)."""
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
        while not done.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    total += p.memory_info().rss
            except psutil.Error:
                pass
            peak_tree = max(peak_tree, total)
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    poller.join()
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    return Run(seconds, max(peak_tree, usage.ru_maxrss * 1024))


FLOOR = """
import os, sys, time
files, out, size = [f for f in sys.argv[1].split(",") if f], sys.argv[2], int(sys.argv[3])
buf = bytearray(64 << 20)
view = memoryview(buf)
for name in files:
    with open(name, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
if out != "-":
    with open(out, "wb", buffering=0) as f:
        left = size
        while left:
            n = f.write(view[: min(left, len(buf))])
            left -= n
        os.fsync(f.fileno())
    os.unlink(out)
"""


def floor_runs(inputs: list[Path], out_bytes: int, work: Path) -> tuple[Run, Run]:
    files = ",".join(str(f) for m in inputs for f in sorted(m.glob("*.safetensors")))
    read = measure([sys.executable, "-c", FLOOR, files, "-", "0"])
    write = measure([sys.executable, "-c", FLOOR, "", str(work / "floor.bin"), str(out_bytes)])
    return read, write


def compare(ours: Path, theirs: Path) -> tuple[float, float]:
    """Max abs difference and the fraction of elements that differ."""
    from safetensors import safe_open

    def files(folder: Path) -> dict[str, Path]:
        out = {}
        for f in folder.glob("*.safetensors"):
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
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, {human(psutil.virtual_memory().total)} RAM{gpu}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, mergekit {mk}"
    )


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument(
        "--size",
        help="explicit shape instead: hidden,intermediate,layers,heads,kv_heads,vocab",
    )
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated methods")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmath-bench"))
    ap.add_argument("--no-mergekit", action="store_true", help="time mmath only")
    ap.add_argument("--mmath-args", default="", help="extra arguments for mmath merge")
    ap.add_argument("--markdown", type=Path, help="also write the report to this file")
    ap.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda: mmath gets --device, mergekit gets --cuda (compute on the GPU)",
    )
    ap.add_argument("--mergekit-cmd", help="how to run mergekit-yaml (default: found on PATH)")
    args = ap.parse_args()

    shape_name = args.shape
    shape = SHAPES[args.shape]
    if args.size:
        shape = tuple(int(x) for x in args.size.split(","))
        if len(shape) != 6:
            ap.error("--size needs six numbers")
        shape_name = "custom"
    methods = [m.strip() for m in args.recipes.split(",") if m.strip()]
    for m in methods:
        if m not in RECIPES:
            ap.error(f"unknown recipe {m!r}; known: {', '.join(RECIPES)}")
    mergekit = shutil.which("mergekit-yaml") or (
        str(Path(sys.executable).with_name("mergekit-yaml"))
        if Path(sys.executable).with_name("mergekit-yaml").exists()
        else None
    )
    if args.mergekit_cmd:
        mergekit = args.mergekit_cmd
    if args.no_mergekit:
        mergekit = None

    args.work.mkdir(parents=True, exist_ok=True)
    base, a, b = checkpoints(args.work, shape_name, shape)
    input_bytes = sum(f.stat().st_size for m in (base, a, b) for f in m.glob("*.safetensors"))
    out_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    started = datetime.datetime.now(datetime.timezone.utc)

    floors: dict[str, list[Run]] = {"read": [], "write": []}
    results: dict[str, dict[str, list[Run]]] = {m: {"mmath": [], "mergekit": []} for m in methods}
    diffs: dict[str, tuple[float, float]] = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for rep in range(args.reps):
        read, write = floor_runs([base, a, b], out_bytes, args.work)
        floors["read"].append(read)
        floors["write"].append(write)
        for method in methods:
            recipe = args.work / f"{method}.yaml"
            recipe.write_text(recipe_text(method, base, a, b))
            tools = ["mmath", "mergekit"] if mergekit else ["mmath"]
            if rep % 2:
                tools.reverse()
            for tool in tools:
                out = args.work / f"out-{method}-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                if tool == "mmath":
                    cmd = [sys.executable, "-m", "mergekit_math", "merge", str(recipe), str(out)]
                    cmd += ["-q", "--device", args.device, *args.mmath_args.split()]
                else:
                    cmd = [*mergekit.split(), str(recipe), str(out)]  # type: ignore[union-attr]
                    if args.device.startswith("cuda"):
                        cmd.append("--cuda")
                run = measure(cmd, env)
                results[method][tool].append(run)
                print(
                    f"rep {rep + 1} {method:16} {tool:8} {run.seconds:7.2f} s "
                    f"{human(run.peak):>10}",
                    file=sys.stderr,
                    flush=True,
                )
            if rep == args.reps - 1 and mergekit and method in DETERMINISTIC:
                diffs[method] = compare(
                    args.work / f"out-{method}-mmath", args.work / f"out-{method}-mergekit"
                )
            for tool in tools:
                shutil.rmtree(args.work / f"out-{method}-{tool}", ignore_errors=True)

    def med(runs: list[Run]) -> tuple[float, int]:
        return statistics.median(r.seconds for r in runs), int(
            statistics.median(r.peak for r in runs)
        )

    lines = [
        f"Shape `{shape_name}` (hidden, intermediate, layers, heads, kv heads, vocab = "
        f"{', '.join(map(str, shape))}), bf16, 3 checkpoints of {human(out_bytes)} "
        f"({human(input_bytes)} read per merge), weights 0.5/0.5, `dtype: bfloat16`; "
        f"median of {args.reps} alternating runs, warm page cache.",
        "",
        f"Machine: {machine()}. Run {started:%Y-%m-%d %H:%M} UTC"
        + (f"; compute on `{args.device}` (mergekit `--cuda`)" if args.device != "cpu" else "")
        + (f"; mmath args: `{args.mmath_args}`" if args.mmath_args else "")
        + ".",
        "",
    ]
    rf, rm = med(floors["read"])
    wf, wm = med(floors["write"])
    lines += [
        f"IO floor: reading all inputs {rf:.2f} s, writing + fsync of {human(out_bytes)} "
        f"{wf:.2f} s (sum {rf + wf:.2f} s).",
        "",
    ]
    if mergekit:
        lines += [
            "| recipe | mergekit s | mmath s | time ratio | mergekit peak RSS | "
            "mmath peak RSS | RSS ratio | max abs diff (differing) | targets met |",
            "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
        ]
    else:
        lines += ["| recipe | mmath s | × IO floor | mmath peak RSS |", "|---|---:|---:|---:|"]
    for method in methods:
        ms, mp = med(results[method]["mmath"])
        if mergekit:
            ks, kp = med(results[method]["mergekit"])
            tr, pr = ms / ks, mp / kp
            diff = "n/a (random)"
            if method in diffs:
                worst, frac = diffs[method]
                diff = f"{worst:.3g} ({frac:.2%})"
            ok = "yes" if tr <= TARGET_TIME and pr <= TARGET_RSS else "**no**"
            lines.append(
                f"| {method}{' ' + RECIPES[method].strip(', ') if RECIPES[method] else ''} "
                f"| {ks:.2f} | {ms:.2f} | {tr:.3f}× | {human(kp)} | {human(mp)} | {pr:.3f}× "
                f"| {diff} | {ok} |"
            )
        else:
            lines.append(f"| {method} | {ms:.2f} | {ms / (rf + wf):.2f}× | {human(mp)} |")
    lines += [
        "",
        f"Targets: time ≤ {TARGET_TIME}× and peak RSS ≤ {TARGET_RSS}× mergekit's in the same run.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report + "\n")


if __name__ == "__main__":
    main()

"""Benchmark `mmath merge` against mergekit and the IO floor, side by side in one run.

    python scripts/bench_merge.py --shape tinyllama --reps 3 --markdown docs/benchmarks.md
    python scripts/bench_merge.py --shape tinyllama --reps 3 --mergekit-reps 1
    python scripts/bench_merge.py --shape 7b --cold --methods task_arithmetic --reps 1

Generates a base and two "fine-tunes" (base + small noise) of the chosen shape in bf16, sharded
at 5 GB (kept in --work and reused), writes one recipe per merge method (base + 2 fine-tunes;
methods that take one model get ft_a) and runs, per method and repetition, three things in
alternating order (A B C, C B A, ...):

- the IO floor, with the plainest tools: `cat` of the method's input shards to /dev/null, then
  `dd if=/dev/zero of=WORK/floor.bin bs=16M count=N conv=fsync` of the output's size, twice,
  the faster counted (on a VM either can pay for the host: pages it took back, its flush);
- `mmath merge` (which fsyncs its output), with MMATH_TIMINGS to see inside its merge loop;
- `mergekit-yaml` when installed (which does not sync its output).

Before every one of them the method's inputs are read once (warm page cache), or with --cold
evicted from the page cache (fsync + posix_fadvise DONTNEED per file); after each, `sync`
(untimed) so that no run pays for the previous one's dirty pages. Each run records wall time
and the peak RSS of its process tree. Deterministic methods are compared with mergekit's
output (max abs difference, share of differing elements). The selection methods also get the
ns/element of their whole-tensor selection pass, timed here on the largest tensor.
Prints markdown tables of medians and ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lib import (  # noqa: E402
    COLD_RSS_BYTES,
    COLD_TARGETS,
    NEWER,
    RECIPES,
    SELECTION,
    SHAPES,
    TARGET_RSS,
    TARGETS,
    UNNAMED_TARGET,
    Run,
    check_space,
    checkpoint_paths,
    compare,
    compile_bytecode,
    drop_cache,
    ensure_checkpoints,
    floor,
    human,
    machine,
    measure,
    method_inputs,
    recipe_text,
    selection_ns,
    shards,
    warm,
)


@dataclass
class Result:
    """Every run of one method."""

    read: list[Run] = field(default_factory=list)  # floor: cat
    write: list[Run] = field(default_factory=list)  # floor: dd conv=fsync
    mmath: list[Run] = field(default_factory=list)
    mergekit: list[Run] = field(default_factory=list)
    diff: tuple[float, float] | None = None
    selection: tuple[float, int] | None = None  # ns/element, elements


@dataclass
class Bench:
    args: argparse.Namespace
    paths: dict[str, Path]
    out_bytes: int
    mergekit: str | None
    deterministic: set[str]
    space: str = ""  # free disk space against what the run needs
    log: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        self.log.append(line)
        print(line, file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--size", help="explicit shape: hidden,intermediate,layers,heads,kv,vocab")
    ap.add_argument("--methods", default="all", help="comma-separated methods (default: all)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="evict the inputs before every run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmath-bench"))
    ap.add_argument("--no-mergekit", action="store_true", help="time mmath and the floor only")
    ap.add_argument(
        "--mergekit-reps",
        type=int,
        help="run mergekit in the first N repetitions only (default: all of them; it takes "
        "10-200 s a method where mmath takes 3-9, so one repetition gives its columns)",
    )
    ap.add_argument("--mmath-args", default="", help="extra arguments for mmath merge")
    ap.add_argument("--markdown", type=Path, help="also write the report to this file")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (mergekit gets --cuda)")
    ap.add_argument("--mergekit-cmd", help="how to run mergekit-yaml (default: found on PATH)")
    args = ap.parse_args()
    from mergekit_math.methods import all_methods

    # in the order: targets from the tightest, then the methods it names no target for
    order = list(TARGETS)
    registered = sorted(
        (m.name for m in all_methods()),
        key=lambda m: (order.index(m) if m in order else len(order), m),
    )
    if set(registered) != set(RECIPES):
        ap.error(f"no benchmark recipe for {sorted(set(registered) - set(RECIPES))}")
    args.deterministic = {m.name for m in all_methods() if not m.random}
    wanted = args.methods.split(",") if args.methods != "all" else registered
    args.method_list = [m.strip() for m in wanted if m.strip()]
    for m in args.method_list:
        if m not in RECIPES:
            ap.error(f"unknown method {m!r}; known: {', '.join(registered)}")
    if args.mergekit_reps is None or args.mergekit_reps > args.reps:
        args.mergekit_reps = args.reps
    if args.mergekit_reps < 1:
        ap.error("--mergekit-reps needs at least 1 (or --no-mergekit)")
    args.shape_name, args.shape_tuple = args.shape, SHAPES[args.shape]
    if args.size:
        args.shape_tuple = tuple(int(x) for x in args.size.split(","))
        if len(args.shape_tuple) != 6:
            ap.error("--size needs six numbers")
        args.shape_name = "custom"
    return args


def find_mergekit(args: argparse.Namespace) -> str | None:
    if args.no_mergekit:
        return None
    if args.mergekit_cmd:
        return args.mergekit_cmd
    beside = Path(sys.executable).with_name("mergekit-yaml")
    return shutil.which("mergekit-yaml") or (str(beside) if beside.exists() else None)


# ----------------------------------------------------------------------------- running


def tool_run(bench: Bench, tool: str, method: str, recipe: Path, out: Path) -> Run:
    args = bench.args
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if tool == "mmath":
        timings = args.work / "timings.json"
        timings.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "mergekit_math", "merge", str(recipe), str(out), "-q"]
        cmd += ["--device", args.device, *args.mmath_args.split()]
        run = measure(cmd, {**env, "MMATH_TIMINGS": str(timings)})
        if timings.is_file():
            run.timings = json.loads(timings.read_text())
        return run
    assert bench.mergekit is not None
    cmd = [*bench.mergekit.split(), str(recipe), str(out)]
    if args.device.startswith("cuda"):
        cmd.append("--cuda")
    return measure(cmd, env)


def run_method(bench: Bench, method: str, rep: int, result: Result) -> None:
    """One repetition of one method: floor, mmath, mergekit in alternating order."""
    args = bench.args
    files = [f for p in method_inputs(method, bench.paths) for f in shards(p)]
    recipe = args.work / f"{method}.yaml"
    recipe.write_text(recipe_text(method, bench.paths))
    with_mergekit = bench.mergekit is not None and rep < args.mergekit_reps
    tools = ["floor", "mmath", "mergekit"] if with_mergekit else ["floor", "mmath"]
    if rep % 2:
        tools.reverse()
    outs = {t: args.work / f"out-{method}-{t}" for t in tools if t != "floor"}
    for out in outs.values():  # an interrupted run's outputs are not this one's
        shutil.rmtree(out, ignore_errors=True)
    for tool in tools:
        if tool in outs:
            shutil.rmtree(outs[tool], ignore_errors=True)
        drop_cache(files) if args.cold else warm(files)
        if tool == "floor":
            read, write, slower = floor(files, bench.out_bytes, args.work)
            result.read.append(read)
            result.write.append(write)
            line = f"{read.seconds:7.2f} + {write.seconds:.2f} s (cat + dd)"
            line += f"  (the other dd {slower.seconds:.2f} s)"
        else:
            run = tool_run(bench, tool, method, recipe, outs[tool])
            getattr(result, tool).append(run)
            line = f"{run.seconds:7.2f} s {human(run.peak):>10}"
        os.sync()  # untimed: the next run does not pay for this one's dirty pages
        bench.say(f"rep {rep + 1} {method:16} {tool:8} {line}")
        if all(o.exists() for o in outs.values()):
            last = rep == args.mergekit_reps - 1
            if last and with_mergekit and method in bench.deterministic:
                result.diff = compare(outs["mmath"], outs["mergekit"])
            for o in outs.values():
                shutil.rmtree(o, ignore_errors=True)


# ----------------------------------------------------------------------------- report


def med(runs: list[Run]) -> tuple[float, int]:
    return statistics.median(r.seconds for r in runs), int(statistics.median(r.peak for r in runs))


def target_of(method: str, cold: bool) -> tuple[float, str]:
    if cold and method in COLD_TARGETS:
        return COLD_TARGETS[method], f"≤ {COLD_TARGETS[method]}×, RSS < 1 GB"
    if method in TARGETS:
        return TARGETS[method], f"≤ {TARGETS[method]}×"
    return UNNAMED_TARGET, f"≤ {UNNAMED_TARGET}×¹"


def main_table(bench: Bench, results: dict[str, Result]) -> list[str]:
    mk = bench.mergekit is not None
    head = "| method | target × floor | "
    head += "mergekit s | " if mk else ""
    head += "mmath s | floor s (cat + dd) | mmath/floor | "
    head += "mergekit/floor | mmath/mergekit | mergekit RSS | " if mk else ""
    head += "mmath RSS | "
    head += "RSS ratio | max abs diff (differing) | " if mk else ""
    head += "met |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for method, r in results.items():
        if not r.mmath:
            continue
        ms, mp = med(r.mmath)
        rs, ws = med(r.read)[0], med(r.write)[0]
        fl = rs + ws
        goal, goal_text = target_of(method, bench.args.cold)
        ok = ms / fl <= goal
        if bench.args.cold and method in COLD_TARGETS:
            ok = ok and mp < COLD_RSS_BYTES
        cells = [method, goal_text]
        if mk:
            ks, kp = med(r.mergekit)
            ok = ok and mp / kp <= TARGET_RSS
            cells.append(f"{ks:.2f}")
        cells += [f"{ms:.2f}", f"{fl:.2f} ({rs:.2f} + {ws:.2f})", f"{ms / fl:.2f}×"]
        if mk:
            cells += [f"{ks / fl:.2f}×", f"{ms / ks:.3f}×", human(kp)]
        cells.append(human(mp))
        if mk:
            diff = "n/a (random)"
            if r.diff is not None:
                diff = f"{r.diff[0]:.3g} ({r.diff[1]:.2%})"
                diff += "²" if method == "arcee_fusion" else ""
            cells += [f"{mp / kp:.3f}×", diff]
        cells.append("yes" if ok else "**no**")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def loop_table(results: dict[str, Result]) -> list[str]:
    lines = [
        "| method | mmath s | outside the loop s | loop s | read-wait s | compute s | "
        "write-wait s | reader busy s | writer busy s | overlap | selection ns/element |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, r in results.items():
        timed = [x.timings for x in r.mmath if x.timings]
        if not timed:
            continue
        t = {k: statistics.median(x[k] for x in timed) for k in timed[0]}
        total = med(r.mmath)[0]
        overlap = (t["read_busy"] + t["compute"] + t["write_busy"]) / max(t["wall"], 1e-9)
        sel = "–"
        if r.selection is not None:
            sel = f"{r.selection[0]:.2f} ({r.selection[1] / 1e6:.1f} M elements)"
        lines.append(
            f"| {method} | {total:.2f} | {total - t['wall']:.2f} | {t['wall']:.2f} "
            f"| {t['read_wait']:.2f} | {t['compute']:.2f} | {t['write_wait']:.2f} "
            f"| {t['read_busy']:.2f} | {t['write_busy']:.2f} | {overlap:.2f}× | {sel} |"
        )
    return lines


def report(bench: Bench, results: dict[str, Result], started: datetime.datetime) -> str:
    args = bench.args
    input_bytes = sum(f.stat().st_size for p in bench.paths.values() for f in shards(p))
    cache = "cold inputs (evicted before every run)" if args.cold else "warm page cache"
    lines = [
        f"Shape `{args.shape_name}` (hidden, intermediate, layers, heads, kv heads, vocab = "
        f"{', '.join(map(str, args.shape_tuple))}), bf16, 3 checkpoints of "
        f"{human(bench.out_bytes)} in 5 GB shards ({human(input_bytes)} in all), "
        f"`dtype: bfloat16`; median of {args.reps} alternating runs, {cache}"
        + (
            f" (mergekit: {args.mergekit_reps} of them)."
            if bench.mergekit and args.mergekit_reps < args.reps
            else "."
        ),
        "",
        f"Machine: {machine()}. Run {started:%Y-%m-%d %H:%M} UTC; {bench.space}; "
        "mmath's modules byte-compiled first, as an install has them"
        + (f"; compute on `{args.device}` (mergekit `--cuda`)" if args.device != "cpu" else "")
        + (f"; mmath args: `{args.mmath_args}`" if args.mmath_args else "")
        + ".",
        "",
        "IO floor per method: `cat` of its input shards to /dev/null "
        + ("(cold)" if args.cold else "(after a warm-up read)")
        + f" + `dd if=/dev/zero bs=16M conv=fsync` of {human(bench.out_bytes)} (the output), "
        "the faster of two (on this VM either can pay for the host: pages it had taken back, "
        "or its flush of the other).",
        "",
        *main_table(bench, results),
        "",
        "Targets (issue 16): time as a multiple of the same run's IO floor; task_arithmetic and "
        "linear ≤ 1.3×, dare_ties and dare_linear ≤ 1.5×, ties, breadcrumbs, breadcrumbs_ties, "
        f"della and della_linear ≤ 2×, the eight newer methods ({', '.join(NEWER)}) ≤ 2.5×; "
        f"peak RSS ≤ {TARGET_RSS}× mergekit's."
        + (" Out of core (--cold): task_arithmetic ≤ 1.1× and mmath's RSS < 1 GB." * args.cold),
        "¹ slerp, model_stock and passthrough: no target in the issue; 2.5× used.",
        "² mergekit's arcee_fusion samples 1M entries at random on larger tensors.",
        "",
        "Inside mmath's merge loop (MMATH_TIMINGS, medians): the main thread's waits for the "
        "reader and writer threads and the rest (compute); overlap = (reader busy + compute + "
        "writer busy) / loop. Selection: the whole-tensor selection on the largest tensor "
        "(embed_tokens), in-process on one thread, median of 3 (TIES, Breadcrumbs: the "
        "compiled selection from the stored pairs, as the merge runs it; DELLA: its drop).",
        "",
        *loop_table(results),
        "",
        "Per run, in order:",
        "",
        "```text",
        *bench.log,
        "```",
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = checkpoint_paths(args.work, args.shape_name, args.shape_tuple)
    space = check_space(args.work, paths, args.shape_tuple)
    ensure_checkpoints(paths, args.shape_tuple)
    out_bytes = sum(f.stat().st_size for f in shards(paths["B"]))
    bench = Bench(args, paths, out_bytes, find_mergekit(args), args.deterministic, space)
    bench.say(compile_bytecode())
    import psutil

    if not args.cold and 3 * out_bytes > 0.8 * psutil.virtual_memory().total:
        bench.say(
            f"warning: 3 × {human(out_bytes)} of inputs do not fit in the page cache of "
            f"{human(psutil.virtual_memory().total)} RAM: this run is not warm; use --cold"
        )
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {m: Result() for m in args.method_list}
    for rep in range(args.reps):
        for method in args.method_list:
            run_method(bench, method, rep, results[method])
    for method in args.method_list:
        if method in SELECTION:
            results[method].selection = selection_ns(method, paths)
    text = report(bench, results, started)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()

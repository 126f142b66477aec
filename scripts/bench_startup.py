"""Time `mmath` start-up on tiny checkpoints: `--help`, `merge --dry-run` and a whole merge.

    PYTHONPATH=. python scripts/bench_startup.py [--runs 5] [--compare OTHER_CHECKOUT]

Builds a 22-layer tiny Llama base and two fine-tunes (tests/conftest.py helpers; 201 tensors,
as many as TinyLlama, so planning does the same work) and a task_arithmetic recipe, then runs
each command ``--runs`` times in fresh interpreters, alternating between this tree and
``--compare`` (e.g. an older checkout made with ``git archive REV | tar -x -C DIR``). Prints
medians of wall and CPU seconds; for the merge also the phases inside the process (seconds
since it started: command modules imported, plan built, torch import begun and done, first
tensor read, command done), the rest of the wall time being the interpreter's exit.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs `mmath ARGS` through the console entry (`cli.run`, whose exit after a merge skips the
# interpreter's teardown) and prints phase marks on stderr from an atexit handler.
PROBE = r"""
import atexit, os, sys, time
def now():
    with open("/proc/self/stat") as f:
        start = int(f.read().rsplit(")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start / os.sysconf("SC_CLK_TCK")
marks = {}
from mergekit_math.cli import run
marks["imports"] = now()
import mergekit_math.merge as mm, mergekit_math.merge.execution as ex
def wrap(mod, name, before=None, after=None):
    orig = getattr(mod, name)
    def w(*a, **k):
        if before: marks.setdefault(before, now())
        out = orig(*a, **k)
        if after: marks.setdefault(after, now())
        return out
    setattr(mod, name, w)
wrap(mm, "build_plan", after="planned")
import builtins
_import = builtins.__import__
def timed_import(name, *a, **k):
    if name != "torch" or "torch" in sys.modules:
        return _import(name, *a, **k)
    marks.setdefault("torch_from", now())
    out = _import(name, *a, **k)
    marks.setdefault("torch_to", now())
    return out
builtins.__import__ = timed_import
wrap(ex, "_read_range", before="first read")
def report():
    marks["done"] = now()
    print("MARKS", *(f"{k.replace(' ', '_')}={v:.4f}" for k, v in marks.items()), file=sys.stderr)
atexit.register(report)
sys.argv = ["mmath"] + sys.argv[1:]
run()
"""

PHASES = ("imports", "planned", "torch_from", "torch_to", "first_read", "done")


def build_models(root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_model

    base = make_model(root / "base", seed=0, layers=22)
    for i, name in enumerate("ab", start=1):
        make_model(root / name, base=base, seed=i)
    recipe = root / "ta.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {root / 'a'}\n    parameters: {{weight: 0.6}}\n"
        f"  - model: {root / 'b'}\n    parameters: {{weight: 0.6}}\n"
    )
    return recipe


def run_once(tree: Path, args: list[str], probe: bool) -> tuple[float, float, dict]:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
    cmd = (
        [sys.executable, "-c", PROBE, *args]
        if probe
        else [sys.executable, "-m", "mergekit_math", *args]
    )
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{out.stderr}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    m = re.search(r"^MARKS (.*)$", out.stderr, re.M)
    marks = dict((k, float(v)) for k, v in (x.split("=") for x in m[1].split())) if m else {}
    return wall, cpu, marks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--compare", type=Path, help="another checkout, run alternately")
    a = ap.parse_args()
    trees = {"this": ROOT} | ({"compare": a.compare.resolve()} if a.compare else {})
    with tempfile.TemporaryDirectory(prefix="mmath-startup-") as tmp:
        work = Path(tmp)
        recipe = build_models(work / "models")
        out = work / "out"
        commands = {
            "--help": (["--help"], False),
            "merge --dry-run": (["merge", str(recipe), str(out), "--dry-run"], False),
            "merge": (["merge", "-q", str(recipe), str(out)], True),
        }
        res: dict = {(t, c): [] for t in trees for c in commands}
        for _ in range(a.runs):
            for c, (args, probe) in commands.items():
                for t, tree in trees.items():
                    shutil.rmtree(out, ignore_errors=True)
                    res[t, c].append(run_once(tree, args, probe))
    print(f"medians of {a.runs} runs, seconds")
    for (t, c), runs in res.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        line = f"{t:8s} {c:16s} wall {wall:6.3f}  cpu {cpu:6.3f}"
        if runs[0][2]:
            line += "  " + "  ".join(
                f"{p} {statistics.median(r[2].get(p, float('nan')) for r in runs):.3f}"
                for p in PHASES
            )
        print(line)


if __name__ == "__main__":
    main()

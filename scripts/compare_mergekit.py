"""Run the same recipes through mergekit 0.1.5 and mmath on real checkpoints and compare the
output tensors: max abs difference and max difference in units of the output dtype's last place.

    python scripts/compare_mergekit.py --base demo/base --models demo/math_a demo/math_b \\
        [--dtype bfloat16|float32] [--methods linear,ties,...] [--work /tmp/mmath-compare]

Prints a markdown table. Times are wall seconds: mergekit runs in this process (imports
already paid), mmath as a subprocess (about 3 s of it is importing torch), so they are a rough
indication only; speed and memory belong to a side-by-side benchmark.

Where both tools compute in float32, differences come from (1) entries that tie exactly at
TIES/Breadcrumbs' trim threshold (common when the inputs are bf16: mergekit breaks ties by an
unstable argsort, mmath keeps the lowest indices), and (2) norms and dot products of tensors
over 32768 elements, which mmath accumulates in float64 so the result does not depend on the
thread count.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
    "  - model: {b}\n    parameters: {{weight: 0.4}}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
    "  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n"
    "    parameters: {{weight: [0.2, 0.8]}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    "    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {b}\n"
    "    parameters: {{weight: 0.5, density: 0.3}}\n",
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    "    parameters: {{weight: 0.5, density: 0.6}}\n  - model: {b}\n"
    "    parameters: {{weight: 0.5, density: 0.6, gamma: 0.02}}\n",
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
    "  - model: {a}\nparameters:\n  t: [{{filter: self_attn, value: [0, 0.5, 1]}}, "
    "{{value: 0.4}}]\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    "  - model: {b}\n",
}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    mag = x.abs().double().clamp(min=info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def tensors(folder: Path):
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                yield name, h.get_tensor(name)


def compare(ours: Path, theirs: Path) -> tuple[float, float, int, float]:
    ref = dict(tensors(theirs))
    worst_abs, worst_ulp, n = 0.0, 0.0, 0
    differing, total = 0, 0
    for name, got in tensors(ours):
        exp = ref.pop(name)
        if got.shape != exp.shape or got.dtype != exp.dtype:
            raise SystemExit(
                f"{name}: {got.dtype}{list(got.shape)} vs {exp.dtype}{list(exp.shape)}"
            )
        diff = (got.double() - exp.double()).abs()
        worst_abs = max(worst_abs, diff.max().item())
        worst_ulp = max(worst_ulp, (diff / ulp(exp.double(), exp.dtype)).max().item())
        differing += int((diff > 0).sum())
        total += diff.numel()
        n += 1
    if ref:
        raise SystemExit(f"only in mergekit's output: {sorted(ref)[:3]}")
    return worst_abs, worst_ulp, n, differing / max(total, 1)


def run_mergekit(text: str, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(text)),
        str(out),
        options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--models", type=Path, nargs=2, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--compute-dtype", default=None, help="mmath's compute_dtype")
    parser.add_argument("--methods", default=",".join(RECIPES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmath-compare"))
    args = parser.parse_args()

    paths = {
        "base": args.base.resolve(),
        "a": args.models[0].resolve(),
        "b": args.models[1].resolve(),
    }
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods.split(","):
        text = RECIPES[method].format(**paths) + f"dtype: {args.dtype}\n"
        ours_text = text + (f"compute_dtype: {args.compute_dtype}\n" if args.compute_dtype else "")
        recipe = args.work / f"{method}.yaml"
        recipe.write_text(ours_text)
        ours, theirs = args.work / f"{method}-mmath", args.work / f"{method}-mergekit"
        for d in (ours, theirs):
            shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        run_mergekit(text, theirs)
        t1 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "mergekit_math", "merge", str(recipe), str(ours), "-q"],
            check=True,
        )
        t2 = time.perf_counter()
        worst_abs, worst_ulp, n, frac = compare(ours, theirs)
        rows.append((method, n, worst_abs, worst_ulp, frac, t1 - t0, t2 - t1))
        shutil.rmtree(ours)
        shutil.rmtree(theirs)
    compute = args.compute_dtype or "float32"
    print(f"\ndtype {args.dtype}, mmath compute_dtype {compute}\n")
    print(
        "| method | tensors | max abs diff | max diff (ulp) | entries differing "
        "| mergekit s | mmath s |"
    )
    print("|---|---|---|---|---|---|---|")
    for method, n, a, u, frac, tm, to in rows:
        print(f"| {method} | {n} | {a:.3g} | {u:.3g} | {frac:.2e} | {tm:.1f} | {to:.1f} |")


if __name__ == "__main__":
    main()

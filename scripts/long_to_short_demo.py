"""Long-to-short search on two tiny models trained here: `mmath search` over the weight of a
short-chain model's task vector added to a long-chain model, for accuracy against tokens.

A long-chain model L learns to answer ``What is a + b * c?`` with a two-step worked chain; a
short-chain model S is L tuned further to answer ``#### N`` alone (the models of
``scripts/valve_demo.py``). The recipe is task arithmetic with base L and S at weight w:
θ(w) = L + w (S − L). The search samples w in [0, 1.25] with Optuna (two objectives: exact
match, max; mean generated tokens, min), evaluates L and S as reference points
(``--baselines``) and writes the Pareto front, its plot, the picked recipe and the timing:

    python scripts/long_to_short_demo.py docs/long_to_short      # outputs there

The point is the command working end to end with a front that means something; the models
memorise their few problems, so the numbers say nothing about real models (see
docs/fidelity/ for the small-scale reproductions).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from valve_demo import mmath, train_pair  # noqa: E402

RECIPE = """merge_method: task_arithmetic
base_model: {long}
models:
  - model: {short}
    parameters:
      weight: 0.5
dtype: float32
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for pareto.md, pareto.png, best_recipe.yaml")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--problems", type=int, default=6)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--in-memory", action="store_true", help="mmath search --in-memory")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mmath-l2s-demo-"))
    try:
        _, data, long, short = train_pair(work, args.problems)
        recipe = work / "l2s.yaml"
        recipe.write_text(RECIPE.format(long=long, short=short))
        search = work / "search"
        began = time.perf_counter()
        mmath(
            "search",
            "run",
            recipe,
            "--space",
            "models[0].parameters.weight=0:1.25",
            "--objective",
            "gsm8k_local:exact_match,flexible-extract:max",
            "--objective",
            "tokens:min",
            "--trials",
            args.trials,
            "--workers",
            args.workers,
            "--tasks",
            "gsm8k_local",
            "--data",
            data,
            "--num-fewshot",
            "0",
            "--gen-kwargs",
            "max_gen_toks=64",
            "--pick",
            "min-tokens-within:0.01",
            "--baselines",
            *(["--in-memory"] if args.in_memory else []),
            "-o",
            search,
        )
        seconds = time.perf_counter() - began
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("pareto.md", "pareto.png", "best_recipe.yaml"):
            shutil.copy(search / name, args.out / name)
        timing = {"trials": args.trials, "workers": args.workers, "in_memory": args.in_memory}
        timing["seconds"] = round(seconds, 1)  # training excluded; baselines' evals included
        timing["points_per_hour"] = round(args.trials / seconds * 3600, 1)
        (args.out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
        print(json.dumps(timing))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

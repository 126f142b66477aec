"""Effect 3 (CoT-Valve, Ma et al. 2025) in the fidelity setting: θ(α) = θ_long + α·(θ_short −
θ_long) trades chain length for accuracy smoothly.

    python scripts/fidelity_valve.py                       # work in out/fidelity/
    python scripts/fidelity_valve.py --docs docs/fidelity  # also write the table, JSON, plot

The models come from ``scripts/fidelity_lib.py`` (trained once, cached under WORK/models):
``long`` is the base fine-tuned on worked chains of both skills, ``short`` is ``long`` tuned
further on the short form (``47+38=85``). The direction is stored by ``mmath valve extract``
and swept by ``mmath valve sweep`` on held-out problems of both skills (gsm8k_local zero-shot,
greedy, strict ``#### N`` match).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity_lib as lib  # noqa: E402

ALPHAS = (0.0, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.0)
TOLERANCE = 0.05  # accuracy points allowed below the long model


def run(work: Path, scale: lib.Scale, alphas: tuple[float, ...] = ALPHAS) -> dict:
    """Train (or reuse) long and short, extract the direction, sweep α; the numbers."""
    models = lib.build(work, scale, ("base", "long", "short"))
    rows = [
        r
        for skill in lib.SKILLS
        for r in lib.eval_rows(skill, "long", scale.eval_n // 2, scale.seed)
    ]
    data = work / "eval_both.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    valve = work / "valve"
    if not (valve / "dir").is_dir():
        lib.mmath(
            "valve", "extract", "--long", models / "long", "--short", models / "short",
            "-o", valve / "dir", "-q",
        )  # fmt: skip
    lib.mmath(
        "valve", "sweep", "--model", models / "long", "--direction", valve / "dir",
        "--alphas", ",".join(map(str, alphas)), "--tasks", "gsm8k_local",
        "--metric", "exact_match,strict-match", "--data", data, "--num-fewshot", "0",
        "--gen-kwargs", f"max_gen_toks={lib.MAX_GEN_TOKS}", "--batch-size", "50",
        "--tolerance", TOLERANCE, "-o", valve / "sweep",
    )  # fmt: skip
    points = [
        json.loads(line)
        for line in (valve / "sweep" / "valve.jsonl").read_text().split("\n")
        if line
    ]
    points = [{k: v for k, v in p.items() if k != "model"} for p in points]  # no local paths
    points.sort(key=lambda p: p["alpha"])
    return {"setting": scale.__dict__, "points": points, **summary(points)}


def summary(points: list[dict]) -> dict:
    """Whether tokens never rise with α, at how many steps of the α grid they fall by more than
    a token, and the shortest chain (as a fraction of the long model's) reached while every α
    up to it stays within TOLERANCE of the long model."""
    tokens = [p["mean_tokens"] for p in points]
    first = points[0]
    shortest = 1.0
    for p in points:
        if p["accuracy"] < first["accuracy"] - TOLERANCE:
            break
        shortest = p["mean_tokens"] / first["mean_tokens"]
    return {
        "tokens_monotone": all(a >= b for a, b in zip(tokens, tokens[1:])),
        "falling_steps": sum(a - b > 1 for a, b in zip(tokens, tokens[1:])),
        "shortest_within_tolerance": shortest,
    }


def table(result: dict) -> str:
    first = result["points"][0]
    lines = [
        "| α | accuracy | Δ acc vs α=0 | mean tokens | tokens vs α=0 |",
        "|---|---|---|---|---|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['alpha']} | {p['accuracy']:.3f} | "
            f"{100 * (p['accuracy'] - first['accuracy']):+.1f} pts | {p['mean_tokens']:.1f} | "
            f"{p['mean_tokens'] / first['mean_tokens']:.0%} |"
        )
    lines.append("")
    lines.append(f"tokens never rise with α: {result['tokens_monotone']}; steps of the α grid "
                 f"where they fall by more than a token: {result['falling_steps']}; shortest chain "
                 f"within {TOLERANCE * 100:.0f} points of α=0: "
                 f"{result['shortest_within_tolerance']:.0%} of the long model's")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("out/fidelity"))
    parser.add_argument("--docs", type=Path, help="Write valve.md, valve.json, valve.png here.")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    result = run(work, lib.Scale())
    text = table(result)
    print(text)
    if args.docs is not None:
        args.docs.mkdir(parents=True, exist_ok=True)
        (args.docs / "valve.md").write_text(text)
        (args.docs / "valve.json").write_text(json.dumps(result, indent=2) + "\n")
        shutil.copy2(work / "valve" / "sweep" / "valve.png", args.docs / "valve.png")


if __name__ == "__main__":
    main()

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
# a finer grid inside the step (0.25 to 0.35), and the α whose answers are sorted by form
FINE = (0.26, 0.28, 0.3, 0.32, 0.34)
FORMS_AT = (0.0, 0.25, 0.26, 0.28, 0.3, 0.32, 0.34, 0.35, 0.4, 1.0)
TOLERANCE = 0.05  # accuracy points allowed below the long model


def run(
    work: Path,
    scale: lib.Scale,
    alphas: tuple[float, ...] = ALPHAS,
    forms_at: tuple[float, ...] = (),
    short: str = "short",
) -> dict:
    """Train (or reuse) long and ``short`` (or the variant ``short_50``), extract the
    direction, sweep α, and sort the answers at each α of ``forms_at`` (swept too) by chain
    form; the numbers."""
    alphas = tuple(sorted(set(alphas) | set(forms_at)))
    models = lib.build(work, scale, ("base", "long", short))
    rows = [
        r
        for skill in lib.SKILLS
        for r in lib.eval_rows(skill, "long", scale.eval_n // 2, scale.seed)
    ]
    data = work / "eval_both.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    valve = work / ("valve" if short == "short" else f"valve_{short}")
    if not (valve / "dir").is_dir():
        lib.mmath(
            "valve", "extract", "--long", models / "long", "--short", models / short,
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
    result = {"setting": scale.__dict__, "short": short, "points": points, **summary(points)}
    if forms_at:
        result["forms"] = [forms(valve, models, data, a) for a in forms_at]
    return result


def form_of(response: str) -> str:
    """``long`` (a worked sentence with a ``<<a+b=c>>`` annotation), ``short`` (a bare
    equation before ``####``) or ``other``."""
    body = response.split("####")[0].strip()
    if "<<" in body:
        return "long"
    if body and all(c in "0123456789+-*/= " for c in body):
        return "short"
    return "other"


def forms(valve: Path, models: Path, data: Path, alpha: float) -> dict:
    """θ(α)'s answers (``mmath eval``'s samples, from its cache after the sweep) by form: the
    fraction of each, the mean tokens and accuracy within each, and one example of each."""
    from transformers import AutoTokenizer

    if alpha == 0:
        folder = models / "long"
    else:
        folder = valve / "sweep" / "models" / f"alpha_{alpha:g}"
    out = valve / "samples" / f"alpha_{alpha:g}"
    lib.evaluate(folder, data, out)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in (out / "samples_gsm8k_local.jsonl").open() if line]
    by: dict[str, list[tuple[int, float, str]]] = {"long": [], "short": [], "other": []}
    for row in rows:
        resps = row["resps"][0]
        text = resps[0] if isinstance(resps, list) else resps
        text = text.split("\n\n")[0]
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        by[form_of(text)].append((n, float(row["exact_match"]), text))
    entry: dict = {"alpha": alpha, "n": len(rows)}
    for form, items in by.items():
        entry[form] = {
            "fraction": len(items) / max(len(rows), 1),
            "mean_tokens": sum(i[0] for i in items) / len(items) if items else None,
            "accuracy": sum(i[1] for i in items) / len(items) if items else None,
            "example": items[0][2] if items else None,
        }
    return entry


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
    if "forms" in result:
        lines += [
            "",
            "| α | long form | short form | other | tokens, long answers | "
            "tokens, short answers | accuracy, long / short |",
            "|---|---|---|---|---|---|---|",
        ]
        for f in result["forms"]:
            cells = [f"{f[k]['fraction']:.0%}" for k in ("long", "short", "other")]
            cells += [_num(f[k]["mean_tokens"], "{:.1f}") for k in ("long", "short")]
            acc = " / ".join(_num(f[k]["accuracy"], "{:.2f}") for k in ("long", "short"))
            lines.append(f"| {f['alpha']} | " + " | ".join(cells) + f" | {acc} |")
    return "\n".join(lines) + "\n"


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else fmt.format(x)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("out/fidelity"))
    parser.add_argument("--docs", type=Path, help="Write valve.md, valve.json, valve.png here.")
    parser.add_argument(
        "--short", default="short", choices=("short", "short_50"),
        help="The short model: S (200 steps from L) or short_50 (50 steps); short_50's files "
        "are valve_short_50.md/.json/.png.",
    )  # fmt: skip
    args = parser.parse_args(argv)
    work = args.work.resolve()
    result = run(work, lib.Scale(), forms_at=FORMS_AT, short=args.short)
    text = table(result)
    print(text)
    if args.docs is not None:
        stem = "valve" if args.short == "short" else f"valve_{args.short}"
        lib.write_docs(args.docs, stem, text, result)  # the stem names its work folder too
        shutil.copy2(work / stem / "sweep" / "valve.png", args.docs / f"{stem}.png")


if __name__ == "__main__":
    main()

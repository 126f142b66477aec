"""Effect 1 (TIES, Yadav et al. 2023; DARE, Yu et al. 2024) in the fidelity setting: merging two
specialists fine-tuned briefly from one pretrained base keeps both skills, where a weight average
loses more; DARE can drop most of a fine-tune's delta before accuracy falls.

    python scripts/fidelity_merge.py                       # work in out/fidelity/
    python scripts/fidelity_merge.py --docs docs/fidelity  # also write the table, JSON, plot

The models come from ``scripts/fidelity_lib.py`` (trained once, cached under WORK/models):
``addsub`` and ``muldiv`` are the base fine-tuned 200 steps at a low rate on held-in addition /
subtraction and multiplication / division word problems. Every merge is an ``mmath merge`` of a
recipe written here, every score an ``mmath eval --tasks gsm8k_local`` of held-out problems
(questions no model trained on), zero-shot, greedy, strict ``#### N`` match.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity_lib as lib  # noqa: E402

# name: (recipe body, what it is); {m} is the models folder
MERGES: dict[str, tuple[str, str]] = {
    "average": (
        "merge_method: linear\nmodels:\n"
        "  - {{model: {m}/addsub, parameters: {{weight: 0.5}}}}\n"
        "  - {{model: {m}/muldiv, parameters: {{weight: 0.5}}}}\n",
        "weight average (0.5, 0.5)",
    ),
    "task_arithmetic": (
        "merge_method: task_arithmetic\nbase_model: {m}/base\nmodels:\n"
        "  - {{model: {m}/addsub, parameters: {{weight: 1.0}}}}\n"
        "  - {{model: {m}/muldiv, parameters: {{weight: 1.0}}}}\n",
        "task arithmetic, λ = 1",
    ),
    "ties": (
        "merge_method: ties\nbase_model: {m}/base\nmodels:\n"
        "  - {{model: {m}/addsub, parameters: {{weight: 1.0, density: 0.5}}}}\n"
        "  - {{model: {m}/muldiv, parameters: {{weight: 1.0, density: 0.5}}}}\n"
        "parameters: {{normalize: true}}\n",
        "TIES, density 0.5, disjoint mean, λ = 1",
    ),
    "dare_ties": (
        "merge_method: dare_ties\nbase_model: {m}/base\nmodels:\n"
        "  - {{model: {m}/addsub, parameters: {{weight: 1.0, density: 0.5}}}}\n"
        "  - {{model: {m}/muldiv, parameters: {{weight: 1.0, density: 0.5}}}}\n"
        "parameters: {{normalize: true}}\nseed: 0\n",
        "DARE-TIES, density 0.5, λ = 1",
    ),
}
DROP_RATES = (0.0, 0.5, 0.9, 0.99)
# the TIES / DARE-TIES grid: each specialist's density × the recipe's ``lambda`` (the scale of
# the merged delta; per-model weights would cancel in the disjoint mean)
GRID_METHODS = ("ties", "dare_ties")
DENSITIES = (0.2, 0.5, 0.8)
LAMBDAS = (0.5, 0.75, 1.0)
GRID = (
    "merge_method: {method}\nbase_model: {m}/base\nmodels:\n"
    "  - {{model: {m}/addsub, parameters: {{weight: 1.0, density: {density}}}}}\n"
    "  - {{model: {m}/muldiv, parameters: {{weight: 1.0, density: {density}}}}}\n"
    "parameters: {{normalize: true, lambda: {lam}}}\nseed: 0\n"
)
BAR = 0.9  # the claim: each skill keeps at least 90% of its specialist's accuracy
DARE = (
    "merge_method: dare_linear\nbase_model: {m}/base\nmodels:\n"
    "  - {{model: {m}/{model}, parameters: {{weight: 1.0}}}}\n"
    "parameters: {{density: {density}, rescale: paper, normalize: false}}\nseed: 0\n"
)


def merged(work: Path, name: str, body: str) -> Path:
    """``mmath merge`` the recipe ``body`` into WORK/merges/NAME (skipped when there)."""
    out = work / "merges" / name
    if not (out / "model.safetensors").is_file():
        recipe = work / "recipes" / f"{name}.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(f"# mmath merge {recipe} {out}\n" + body)
        lib.mmath("merge", recipe, out, "--force", "-q")
    return out


def scores(work: Path, model: Path, data: dict[str, Path], tag: str, limit: int | None) -> dict:
    return {
        skill: lib.evaluate(model, path, work / "evals" / tag / skill, limit)
        for skill, path in data.items()
    }


def run(
    work: Path,
    scale: lib.Scale,
    merges: tuple[str, ...] = tuple(MERGES),
    dare_on: tuple[str, ...] = lib.SKILLS,
    grid_methods: tuple[str, ...] = (),
) -> dict:
    """Train (or reuse) the models, merge (the recipes named in ``merges``), evaluate, sweep
    DARE's drop rate on the deltas of the specialists in ``dare_on``, and the density × λ grid
    of each method in ``grid_methods``; the numbers."""
    models = lib.build(work, scale, ("base", "addsub", "muldiv"))
    data = lib.write_eval(work, scale.eval_n, scale.seed)
    rows: dict[str, dict] = {}
    for name in ("base", "addsub", "muldiv"):
        rows[name] = {"what": name, **scores(work, models / name, data, name, None)}
    for name in merges:
        body, what = MERGES[name]
        model = merged(work, name, body.format(m=models))
        rows[name] = {"what": what, **scores(work, model, data, name, None)}
    dare: dict[str, list[dict]] = {}
    for specialist in dare_on:
        dare[specialist] = []
        for p in DROP_RATES:
            if p == 0:
                acc = rows[specialist][specialist]
            else:
                body = DARE.format(m=models, model=specialist, density=round(1 - p, 4))
                model = merged(work, f"dare_{specialist}_{p}", body)
                acc = lib.evaluate(
                    model, data[specialist], work / "evals" / f"dare_{specialist}_{p}"
                )
            dare[specialist].append({"drop_rate": p, **acc})
    result = {"setting": scale.__dict__, "merges": rows, "dare": dare}
    if grid_methods:
        result["grid"] = grid(work, models, data, grid_methods)
    return result


def grid(work: Path, models: Path, data: dict[str, Path], methods: tuple[str, ...]) -> list[dict]:
    """Every method × density × λ point of the grid, merged and scored on both skills."""
    points = []
    for method in methods:
        for density in DENSITIES:
            for lam in LAMBDAS:
                name = f"grid_{method}_d{density}_l{lam}"
                body = GRID.format(method=method, m=models, density=density, lam=lam)
                acc = scores(work, merged(work, name, body), data, name, None)
                points.append({"method": method, "density": density, "lambda": lam, **acc})
                print(f"  {name}: {acc}", flush=True)
    return points


def kept(result: dict, name: str) -> dict[str, float]:
    """Each skill's accuracy on a merge as a fraction of its specialist's."""
    rows = result["merges"]
    return {s: rows[name][s]["accuracy"] / max(rows[s][s]["accuracy"], 1e-9) for s in lib.SKILLS}


def table(result: dict) -> str:
    lines = [
        "| model | addsub acc | muldiv acc | addsub kept | muldiv kept | mean tokens |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["merges"].items():
        k = kept(result, name)
        tokens = (row["addsub"]["mean_tokens"] + row["muldiv"]["mean_tokens"]) / 2
        lines.append(
            f"| {name} ({row['what']}) | {row['addsub']['accuracy']:.3f} | "
            f"{row['muldiv']['accuracy']:.3f} | {k['addsub']:.0%} | {k['muldiv']:.0%} | "
            f"{tokens:.1f} |"
        )
    lines += ["", "| specialist | drop rate | accuracy | Δ vs drop 0 |", "|---|---|---|---|"]
    for specialist, points in result["dare"].items():
        first = points[0]["accuracy"]
        for pt in points:
            lines.append(
                f"| {specialist} | {pt['drop_rate']} | {pt['accuracy']:.3f} | "
                f"{100 * (pt['accuracy'] - first):+.1f} pts |"
            )
    return "\n".join(lines) + "\n"


def grid_table(result: dict) -> str:
    """The grid, each skill's accuracy and what it keeps of its specialist's, with the weight
    average's row to compare."""
    rows = result["merges"]
    spec = {s: max(rows[s][s]["accuracy"], 1e-9) for s in lib.SKILLS}
    lines = [
        "| method | density | λ | addsub acc | muldiv acc | addsub kept | muldiv kept | "
        "min kept | mean kept | ≥ 90% both | mean tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    avg = {"method": "weight average", "density": "", "lambda": ""}
    for p in [{**avg, **{s: rows["average"][s] for s in lib.SKILLS}}, *result["grid"]]:
        k = [p[s]["accuracy"] / spec[s] for s in lib.SKILLS]
        tokens = sum(p[s]["mean_tokens"] for s in lib.SKILLS) / len(lib.SKILLS)
        lines.append(
            f"| {p['method']} | {p['density']} | {p['lambda']} | {p['addsub']['accuracy']:.3f} | "
            f"{p['muldiv']['accuracy']:.3f} | {k[0]:.0%} | {k[1]:.0%} | {min(k):.0%} | "
            f"{sum(k) / 2:.0%} | {'yes' if min(k) >= BAR else 'no'} | {tokens:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_grid(result: dict, path: Path) -> None:
    """One heatmap per method: the smaller kept fraction of the two skills (the claim's bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["merges"]
    spec = {s: max(rows[s][s]["accuracy"], 1e-9) for s in lib.SKILLS}
    methods = sorted({p["method"] for p in result["grid"]}, key=GRID_METHODS.index)
    average = min(rows["average"][s]["accuracy"] / spec[s] for s in lib.SKILLS)
    fig, axes = plt.subplots(
        1,
        len(methods),
        figsize=(4.6 * len(methods), 3.8),
        squeeze=False,
        layout="constrained",
    )
    for ax, method in zip(axes[0], methods):
        cells = [[0.0] * len(LAMBDAS) for _ in DENSITIES]
        for p in result["grid"]:
            if p["method"] == method:
                k = min(p[s]["accuracy"] / spec[s] for s in lib.SKILLS)
                cells[DENSITIES.index(p["density"])][LAMBDAS.index(p["lambda"])] = k
        image = ax.imshow(cells, vmin=0.5, vmax=1.0, cmap="viridis", origin="lower")
        for i, row in enumerate(cells):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center",
                        color="white" if v < 0.8 else "black")  # fmt: skip
        ax.set_xticks(range(len(LAMBDAS)), [str(x) for x in LAMBDAS])
        ax.set_yticks(range(len(DENSITIES)), [str(x) for x in DENSITIES])
        ax.set_xlabel("λ")
        ax.set_ylabel("density")
        ax.set_title(f"{method}: min kept (average: {average:.0%})")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(result["merges"])
    xs = range(len(names))
    for i, skill in enumerate(lib.SKILLS):
        values = [result["merges"][n][skill]["accuracy"] for n in names]
        left.bar([x + 0.4 * i - 0.2 for x in xs], values, width=0.4, label=skill)
    left.set_xticks(list(xs), names, rotation=30, ha="right")
    left.set_ylabel("held-out accuracy")
    left.set_title("merging two specialists")
    left.legend()
    for specialist, points in result["dare"].items():
        right.plot(
            [str(p["drop_rate"]) for p in points], [p["accuracy"] for p in points], "o-",
            label=f"DARE({specialist} - base)",
        )  # fmt: skip
    right.set_xlabel("drop rate")
    right.set_ylabel("accuracy on its own skill")
    right.set_title("DARE on one specialist's delta")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("out/fidelity"))
    parser.add_argument("--docs", type=Path, help="Write merge.md, merge.json, merge.png here.")
    parser.add_argument(
        "--grid", default="",
        help="Also run the density × λ grid of these methods (comma-separated, e.g. "
        "ties,dare_ties: 18 more merges, about 8 minutes).",
    )  # fmt: skip
    args = parser.parse_args(argv)
    methods = tuple(m for m in args.grid.split(",") if m)
    result = run(args.work.resolve(), lib.Scale(), grid_methods=methods)
    text = table(result)
    if methods:
        text += "\n" + grid_table(result)
    print(text)
    if args.docs is not None:
        lib.write_docs(args.docs, "merge", text, result)
        plot(result, args.docs / "merge.png")
        if methods:
            plot_grid(result, args.docs / "merge_grid.png")


if __name__ == "__main__":
    main()

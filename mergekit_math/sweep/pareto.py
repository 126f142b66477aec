"""The search's reports, rebuilt from ``results.jsonl`` and ``search.json``: ``pareto.md``
(the non-dominated points with their values and objectives, then every point),
``pareto.png`` (accuracy against mean tokens, the front highlighted, the pick starred) and
``best_recipe.yaml`` (the ``--pick`` point's resolved recipe, which `mmath merge` rebuilds)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_math.errors import UserError
from mergekit_math.sweep.baselines import read_baselines
from mergekit_math.sweep.grid import describe, format_value, short_names
from mergekit_math.sweep.objectives import (
    Objective,
    Pick,
    objective_value,
    pareto_front,
    pick_point,
    roles,
)
from mergekit_math.sweep.point import recipe_text
from mergekit_math.sweep.report import DPI, PNG_SIZE
from mergekit_math.sweep.results import RESULTS, latest_rows, read_rows

PARETO_MD = "pareto.md"
PARETO_PNG = "pareto.png"
BEST_RECIPE = "best_recipe.yaml"
REF_MARKERS = ["D", "s", "^", "v", "P", "X"]


@dataclass
class Scored:
    """A recorded point with its objective values."""

    row: dict[str, Any]
    values: list[float]

    @property
    def id(self) -> str:
        return self.row["id"]


@dataclass
class ParetoFiles:
    """What :func:`write_pareto` wrote, and what it found."""

    markdown: Path
    plot: Path | None
    best_recipe: Path
    points: list[Scored]
    front: list[Scored]
    picked: Scored
    warnings: list[str]
    baselines: list[Scored]


def score(rows: list[dict[str, Any]], objectives: list[Objective]) -> list[Scored]:
    """The rows whose every objective has a value, with those values."""
    out = []
    for row in rows:
        try:
            out.append(Scored(row, [objective_value(o, row) for o in objectives]))
        except (UserError, KeyError):
            continue
    return out


def choose(points: list[Scored], objectives: list[Objective], pick: Pick) -> Scored:
    """The ``--pick`` point among ``points`` (the front): with one objective, the best."""
    quality, cost = roles(objectives)
    up = [o.direction == "maximize" for o in objectives]

    def oriented(p: Scored, i: int | None, higher: bool) -> float:
        if i is None:
            return 0.0
        v = p.values[i] if up[i] else -p.values[i]  # now higher is better
        return v if higher else -v

    pairs = [(oriented(p, quality, True), oriented(p, cost, False)) for p in points]
    return points[pick_point(pairs, pick)]


def write_pareto(
    folder: Path,
    manifest: Any,
    pick: Pick,
    trials: dict[str, list[int]] | None = None,
) -> ParetoFiles:
    """Write pareto.md, pareto.png and best_recipe.yaml into the search folder ``folder``;
    ``manifest`` is its SearchManifest, ``trials`` maps point ids to trial numbers."""
    objectives: list[Objective] = manifest.objectives
    rows = latest_rows(read_rows(folder / RESULTS))
    points = score(rows, objectives)
    if not points:
        raise UserError(f"{folder}: no trial is complete yet")
    up = [o.direction == "maximize" for o in objectives]
    front = [points[i] for i in pareto_front([p.values for p in points], up)]
    picked = choose(front, objectives, pick)
    refs = score(read_baselines(folder), objectives)  # the input models, for reference only
    warnings: list[str] = []
    best = folder / BEST_RECIPE
    header = (
        f"# mmath merge {BEST_RECIPE} OUT_DIR   (search pick {pick.text}: point {picked.id}; "
        + ", ".join(f"{_label(o)} {_fmt(o, v)}" for o, v in zip(objectives, picked.values))
        + ")\n"
    )
    _write_atomic(best, recipe_text(picked.row["recipe"], header))
    plot_path: Path | None = folder / PARETO_PNG
    try:
        plot(plot_path, manifest, points, front, picked, refs)  # type: ignore[arg-type]
    except ImportError:
        warnings.append(f"{PARETO_PNG} not written: the plot needs matplotlib")
        plot_path = None
    text = markdown(manifest, points, front, picked, pick, trials or {}, plot_path is not None)
    text += reference_table(manifest, refs)
    md = folder / PARETO_MD
    _write_atomic(md, text)
    return ParetoFiles(md, plot_path, best, points, front, picked, warnings, refs)


# ----------------------------------------------------------------------------- markdown


def _label(o: Objective) -> str:
    return "tokens" if o.is_tokens else o.spec.split(":", 1)[1]


def _fmt(o: Objective, v: float) -> str:
    return f"{v:.1f}" if o.is_tokens else f"{v:.4f}"


def table(
    manifest: Any, points: list[Scored], picked: Scored | None, trials: dict[str, list[int]]
) -> str:
    """The points as a Markdown table, in the order given."""
    short = short_names(manifest.keys)
    header = ["#", *(f"`{short[k]}`" for k in manifest.keys)]
    header += [f"{_label(o)} ({o.direction[:3]})" for o in manifest.objectives]
    header += ["trials", "point"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * (len(header) - 1) + ":---|"]
    for rank, p in enumerate(points, 1):
        cells = [str(rank), *(format_value(p.row["point"].get(k, "")) for k in manifest.keys)]
        cells += [_fmt(o, v) for o, v in zip(manifest.objectives, p.values)]
        cells.append(", ".join(str(n) for n in trials.get(p.id, [])) or "-")
        cells.append(f"`{p.id}`" + (" (picked)" if picked is not None and p is picked else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(
    manifest: Any,
    points: list[Scored],
    front: list[Scored],
    picked: Scored,
    pick: Pick,
    trials: dict[str, list[int]],
    with_plot: bool,
) -> str:
    objectives: list[Objective] = manifest.objectives
    quality, _ = roles(objectives)
    sign = 1.0 if objectives[quality].direction == "maximize" else -1.0

    def order(p: Scored) -> tuple[float, ...]:
        return (-sign * p.values[quality], *p.values)

    ev = manifest.eval
    settings = [f"tasks {', '.join(ev['tasks'])}"]
    if ev.get("limit") is not None:
        settings.append(f"limit {ev['limit']}")
    if ev.get("gen_kwargs"):
        settings.append(", ".join(f"{k}={v}" for k, v in ev["gen_kwargs"].items()))
    done = sum(len(v) for v in trials.values())
    out = [
        f"# Search of `{Path(manifest.recipe).name}` ({manifest.method})",
        "",
        f"{len(points)} points"
        + (f" from {done} completed trials" if done else "")
        + " over "
        + ", ".join(f"`{d.describe()}`" for d in manifest.space)
        + "; objectives "
        + ", ".join(f"`{o.text}`" for o in objectives)
        + "; "
        + "; ".join(settings)
        + ". Tokens are the mean number of tokens generated per sample.",
        "",
        f"**Picked ({pick.text}):** {describe(picked.row['point'])}: "
        + ", ".join(f"{_label(o)} {_fmt(o, v)}" for o, v in zip(objectives, picked.values))
        + f" (point `{picked.id}`); its recipe is [{BEST_RECIPE}]({BEST_RECIPE}).",
        "",
    ]
    if with_plot:
        out += [f"![pareto]({PARETO_PNG})", ""]
    out += [
        f"## Pareto front ({len(front)} non-dominated of {len(points)} points)",
        "",
        table(manifest, sorted(front, key=order), picked, trials),
        "",
        "## All points",
        "",
        table(manifest, sorted(points, key=order), picked, trials),
        "",
    ]
    return "\n".join(out)


# ----------------------------------------------------------------------------- plot


def plot(
    path: Path,
    manifest: Any,
    points: list[Scored],
    front: list[Scored],
    picked: Scored,
    refs: list[Scored] | None = None,
) -> None:
    """pareto.png, ``PNG_SIZE`` pixels: the 'accuracy' objective against the 'cost' one (mean
    tokens), every point grey, the front joined and highlighted, the pick starred; with one
    objective, its value per point in the order recorded."""
    from matplotlib.figure import Figure

    objectives: list[Objective] = manifest.objectives
    quality, cost = roles(objectives)
    fig = Figure(figsize=(PNG_SIZE[0] / DPI, PNG_SIZE[1] / DPI), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()

    def xy(ps: list[Scored]) -> tuple[list[float], list[float]]:
        xs = [p.values[cost] if cost is not None else float(points.index(p)) for p in ps]
        return xs, [p.values[quality] for p in ps]

    ax.scatter(*xy(points), color="0.6", s=24, label="trials", zorder=2)
    line = sorted(front, key=lambda p: xy([p])[0][0])
    ax.plot(*xy(line), color="tab:blue", marker="o", lw=1.8, label="Pareto front", zorder=3)
    ax.plot(*xy([picked]), marker="*", ms=18, color="crimson", ls="none", label="picked", zorder=4)
    if cost is not None:
        _plot_refs(ax, refs or [], quality, cost)
    ax.set_xlabel(
        "tokens generated per sample (mean)"
        if cost is not None and objectives[cost].is_tokens
        else (objectives[cost].spec if cost is not None else "point (order recorded)")
    )
    ax.set_ylabel(objectives[quality].spec)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    keys = ", ".join(short_names(manifest.keys).values())
    ax.set_title(f"{manifest.method} over {keys}: {len(points)} points", fontsize=10)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, path)


def _plot_refs(ax: Any, refs: list[Scored], quality: int, cost: int) -> None:
    """The input models (--baselines): a distinct marker each, labelled with its name."""
    for p, marker in zip(refs, REF_MARKERS * (1 + len(refs) // len(REF_MARKERS))):
        x, y = p.values[cost], p.values[quality]
        name = Path(p.row["model"]).name
        ax.plot(x, y, marker=marker, ms=10, color="darkorange", mec="black", ls="none", zorder=5)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if refs:
        ax.plot(
            [],
            [],
            marker=REF_MARKERS[0],
            color="darkorange",
            mec="black",
            ls="none",
            label="input models",
        )
        ax.legend(loc="best", fontsize=8)


def reference_table(manifest: Any, refs: list[Scored]) -> str:
    """pareto.md's section of the input models: reference rows, not in the front."""
    if not refs:
        return ""
    objectives: list[Objective] = manifest.objectives
    header = ["input model", *(f"{_label(o)} ({o.direction[:3]})" for o in objectives)]
    lines = [
        "## Input models (reference, not part of the front)",
        "",
        "| " + " | ".join(header) + " |",
        "|:---|" + "---:|" * len(objectives),
    ]
    for p in refs:
        cells = [f"`{p.row['model']}`", *(_fmt(o, v) for o, v in zip(objectives, p.values))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # never write through a link planted there
    tmp.write_text(text)
    os.replace(tmp, path)

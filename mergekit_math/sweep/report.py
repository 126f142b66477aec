"""The sweep's reports, rebuilt from ``results.jsonl`` alone: ``report.md`` (every point,
sorted by the primary metric), ``sweep.png`` (metric against the swept key, a heatmap for
two keys, the best points for more) and ``best_recipe.yaml`` (the best point's resolved
recipe, which `mmath merge` rebuilds)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_math.errors import UserError
from mergekit_math.sweep.grid import describe, format_value, short_names
from mergekit_math.sweep.point import MODEL, recipe_text
from mergekit_math.sweep.results import (
    POINTS,
    RESULTS,
    Manifest,
    latest_rows,
    read_manifest,
    read_rows,
)

PNG_SIZE = (800, 500)
"""Width and height of sweep.png in pixels."""
DPI = 100
BEST_N = 10
LOG_AXIS_RATIO = 30
"""A swept key whose positive values span this ratio or more is drawn on a log axis."""
HEATMAP_MAX = 25
"""Beyond this many distinct values per key, two keys are drawn as a scatter plot."""

_NAME = re.compile(r"^[^\s:,]+$")
METRIC_FORM = "TASK:METRIC[,FILTER], e.g. gsm8k_local:exact_match,strict-match"


def parse_metric(spec: str) -> tuple[str, str, str | None]:
    """``TASK:METRIC[,FILTER]`` -> (task, metric, filter or None)."""
    task, colon, rest = spec.strip().partition(":")
    metric, comma, filt = rest.partition(",")
    if not colon or not _NAME.match(task) or not _NAME.match(metric):
        raise UserError(f"--metric: expected {METRIC_FORM}, got {spec!r}")
    if comma and not _NAME.match(filt):
        raise UserError(f"--metric: expected {METRIC_FORM}, got {spec!r}")
    return task, metric, filt if comma else None


def resolve_metric(spec: str | None, available: list[str]) -> str:
    """The results key (``TASK:METRIC,FILTER``) that ``spec`` names; without a spec, the first
    metric of the first task. A spec without filter names the metric's only filter."""
    if not available:
        raise UserError("the recorded points have no metrics")
    if spec is None:
        return available[0]
    task, metric, filt = parse_metric(spec)
    if filt is not None:
        key = f"{task}:{metric},{filt}"
        matches = [key] if key in available else []
    else:
        matches = [k for k in available if k.startswith(f"{task}:{metric},")]
        if f"{task}:{metric},none" in matches:
            matches = [f"{task}:{metric},none"]
    if len(matches) == 1:
        return matches[0]
    what = "is ambiguous" if matches else "is not in the results"
    raise UserError(f"--metric {spec} {what}; recorded metrics: {', '.join(available)}")


class Ranking:
    """Orders rows by the primary metric (lm-eval's higher_is_better; missing values last)."""

    def __init__(self, spec: str | None):
        if spec is not None:
            parse_metric(spec)
        self.spec = spec
        self._key: str | None = None

    def key(self, rows: list[dict[str, Any]]) -> str | None:
        if self._key is None:
            for row in rows:
                if row.get("metrics"):
                    self._key = resolve_metric(self.spec, list(row["metrics"]))
                    break
        return self._key

    def value(self, row: dict[str, Any]) -> float | None:
        key = self.key([row])
        v = row.get("metrics", {}).get(key) if key else None
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    def higher_is_better(self, rows: list[dict[str, Any]]) -> bool:
        key = self.key(rows)
        if key is None:
            return True
        name = key.rsplit(",", 1)[0]
        for row in rows:
            if name in row.get("higher_is_better", {}):
                return bool(row["higher_is_better"][name])
        return True

    def sort(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sign = -1.0 if self.higher_is_better(rows) else 1.0

        def order(row: dict[str, Any]) -> tuple[int, float]:
            v = self.value(row)
            return (1, 0.0) if v is None else (0, sign * v)

        return sorted(rows, key=order)  # stable: ties keep the order they were recorded in

    def best(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        ordered = self.sort(rows)
        return ordered[0] if ordered and self.value(ordered[0]) is not None else None

    def better(self, a: dict[str, Any], b: dict[str, Any]) -> bool:
        va, vb = self.value(a), self.value(b)
        if va is None:
            return False
        if vb is None:
            return True
        return va > vb if self.higher_is_better([a, b]) else va < vb

    def summary(self, row: dict[str, Any]) -> str:
        """One line: the primary metric, tokens generated, timings."""
        key = self.key([row])
        value = self.value(row)
        parts = [f"{key} {value:.4f}" if value is not None else f"{key} -"]
        err = row.get("stderr", {}).get(key) if key else None
        if value is not None and err is not None:
            parts[0] += f" ± {err:.4f}"
        task = key.split(":", 1)[0] if key else None
        lengths = row.get("lengths", {}).get(task) if task else None
        if lengths and lengths.get("n"):
            parts.append(f"tokens {lengths['mean']:.1f}")
        parts.append(f"merge {row['merge_seconds']:.1f} s, eval {row['eval_seconds']:.1f} s")
        return "  ".join(parts)


@dataclass
class ReportFiles:
    """What :func:`write_report` wrote, and the rows it ranked (best first)."""

    markdown: Path
    plot: Path | None
    best_recipe: Path | None
    manifest: Manifest
    ranking: Ranking
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    warnings: list[str]


def write_report(folder: Path, metric: str | None = None) -> ReportFiles:
    """Write report.md, sweep.png and best_recipe.yaml into the sweep folder ``folder`` from
    its results; ``metric`` overrides the sweep's primary metric."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise UserError(f"{folder}: not a sweep folder (no sweep.json)")
    rows = latest_rows(read_rows(folder / RESULTS))
    if not rows:
        raise UserError(f"{folder}: no point is recorded yet")
    ranking = Ranking(metric if metric is not None else manifest.metric)
    ordered = ranking.sort(rows)
    key = ranking.key(ordered)
    best = ranking.best(ordered)
    warnings: list[str] = []
    best_path = None
    if best is not None:
        best_path = folder / "best_recipe.yaml"
        header = (
            "# mmath merge best_recipe.yaml OUT_DIR   "
            f"(best of {len(rows)} sweep points by {key} = {ranking.value(best):.4f}; "
            f"point {best['id']})\n"
        )
        _write_atomic(best_path, recipe_text(best["recipe"], header))
    plot_path: Path | None = folder / "sweep.png"
    try:
        plot(plot_path, manifest, ordered, ranking)  # type: ignore[arg-type]
    except ImportError:
        warnings.append("sweep.png not written: the plot needs matplotlib (pip install matplotlib)")
        plot_path = None
    table = markdown_table(manifest, ordered, ranking)
    text = _markdown(folder, manifest, ordered, ranking, table, plot_path is not None)
    md = folder / "report.md"
    _write_atomic(md, text)
    return ReportFiles(md, plot_path, best_path, manifest, ranking, ordered, best, warnings)


# ----------------------------------------------------------------------------- markdown


def _metric_keys(rows: list[dict[str, Any]], primary: str | None) -> list[str]:
    keys: list[str] = [primary] if primary else []
    for row in rows:
        for k in row.get("metrics", {}):
            if k not in keys:
                keys.append(k)
    return keys


def _length_tasks(rows: list[dict[str, Any]]) -> list[str]:
    tasks: list[str] = []
    for row in rows:
        for t, stats in row.get("lengths", {}).items():
            if stats.get("n") and t not in tasks:
                tasks.append(t)
    return tasks


def markdown_table(
    manifest: Manifest, rows: list[dict[str, Any]], ranking: Ranking, limit: int | None = None
) -> str:
    """The points as a Markdown table, in ``rows`` order (best first)."""
    primary = ranking.key(rows)
    metrics = _metric_keys(rows, primary)
    tasks = {k.split(":", 1)[0] for k in metrics}
    short_keys = short_names(manifest.keys)
    length_tasks = _length_tasks(rows)
    header = ["#", *(f"`{short_keys[k]}`" for k in manifest.keys)]
    for k in metrics:
        label = k.split(":", 1)[1] if len(tasks) == 1 else k
        header.append(f"**{label}**" if k == primary else label)
    for t in length_tasks:
        header.append("tokens mean" if len(length_tasks) == 1 else f"tokens mean ({t})")
    header += ["merge s", "eval s", "point"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * (len(header) - 1) + ":---|"]
    for rank, row in enumerate(rows[:limit] if limit else rows, 1):
        cells = [str(rank)]
        cells += [format_value(row["point"].get(k, "")) for k in manifest.keys]
        for k in metrics:
            v = row.get("metrics", {}).get(k)
            cell = f"{v:.4f}" if isinstance(v, (int, float)) else "-"
            err = row.get("stderr", {}).get(k)
            if k == primary and err is not None and isinstance(v, (int, float)):
                cell += f" ± {err:.3f}"
            cells.append(cell)
        for t in length_tasks:
            stats = row.get("lengths", {}).get(t) or {}
            cells.append(f"{stats['mean']:.1f}" if stats.get("n") else "-")
        cells += [f"{row['merge_seconds']:.1f}", f"{row['eval_seconds']:.1f}", f"`{row['id'][:8]}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(
    folder: Path,
    manifest: Manifest,
    rows: list[dict[str, Any]],
    ranking: Ranking,
    table: str,
    with_plot: bool,
) -> str:
    key = ranking.key(rows)
    best = ranking.best(rows)
    ev = manifest.eval
    settings = [f"tasks {', '.join(ev['tasks'])}"]
    if ev.get("data"):
        settings.append(f"data `{Path(ev['data']).name}`")
    if ev.get("limit") is not None:
        settings.append(f"limit {ev['limit']}")
    if ev.get("num_fewshot") is not None:
        settings.append(f"{ev['num_fewshot']}-shot")
    if ev.get("gen_kwargs"):
        settings.append(", ".join(f"{k}={v}" for k, v in ev["gen_kwargs"].items()))
    if ev.get("apply_chat_template"):
        settings.append("chat template")
    merge_s = sum(r["merge_seconds"] for r in rows)
    eval_s = sum(r["eval_seconds"] for r in rows)
    direction = "higher" if ranking.higher_is_better(rows) else "lower"
    out = [
        f"# Sweep of `{Path(manifest.recipe).name}` ({manifest.method})",
        "",
        f"{len(rows)} points over "
        + ", ".join(f"`{k}`" for k in manifest.keys)
        + "; "
        + "; ".join(settings)
        + f". Ranked by `{key}` ({direction} is better). "
        + f"Merging took {merge_s:.0f} s and evaluating {eval_s:.0f} s in all.",
        "",
    ]
    if best is not None:
        err = best.get("stderr", {}).get(key)
        value = f"{ranking.value(best):.4f}" + (f" ± {err:.4f}" if err is not None else "")
        out.append(
            f"**Best:** {describe(best['point'])}: {value} (point `{best['id'][:8]}`); "
            "its recipe is [best_recipe.yaml](best_recipe.yaml)"
            + (
                f", its weights are in `{POINTS}/{best['id']}/{MODEL}`."
                if (folder / POINTS / best["id"] / MODEL).is_dir()
                else "."
            )
        )
        out.append("")
    if with_plot:
        out += ["![sweep](sweep.png)", ""]
    out += [table, ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- plot


def plot(path: Path, manifest: Manifest, rows: list[dict[str, Any]], ranking: Ranking) -> None:
    """sweep.png, ``PNG_SIZE`` pixels: the primary metric against the swept key (with tokens
    generated on a second axis), a heatmap for two keys, the best points as a table for more."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PNG_SIZE[0] / DPI, PNG_SIZE[1] / DPI), dpi=DPI, layout="constrained")
    keys = manifest.keys
    if len(keys) == 1:
        _line(fig, manifest, rows, ranking)
    elif len(keys) == 2:
        _heatmap(fig, manifest, rows, ranking)
    else:
        _best_table(fig, manifest, rows, ranking)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, path)


def _axis_values(rows: list[dict[str, Any]], key: str) -> list[Any]:
    values = []
    for row in rows:
        v = row["point"].get(key)
        if v not in values:
            values.append(v)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sorted(values)
    return values


def _positions(values: list[Any]) -> tuple[list[float], bool]:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return ([float(v) for v in values] if numeric else list(range(len(values)))), numeric


def _line(fig: Any, manifest: Manifest, rows: list[dict[str, Any]], ranking: Ranking) -> None:
    key = manifest.keys[0]
    primary = ranking.key(rows)
    xs = _axis_values(rows, key)
    pos, numeric = _positions(xs)
    by_value = {_tag(r["point"].get(key)): r for r in rows}
    ordered = [by_value[_tag(v)] for v in xs]
    ax = fig.add_subplot()
    task = primary.split(":", 1)[0] if primary else None
    for k in _metric_keys(rows, primary):
        if k.split(":", 1)[0] != task:
            continue
        ys = [r.get("metrics", {}).get(k, math.nan) for r in ordered]
        label = k.split(":", 1)[1]
        style = (
            {"lw": 2.2, "marker": "o"} if k == primary else {"lw": 1, "marker": ".", "alpha": 0.7}
        )
        ax.plot(pos, ys, label=label, **style)
    best = ranking.best(rows)
    if best is not None:
        i = xs.index(best["point"].get(key))
        ax.plot(
            [pos[i]],
            [ranking.value(best)],
            marker="*",
            ms=16,
            color="crimson",
            ls="none",
            label="best",
            zorder=5,
        )
    ax.set_xlabel(key)
    ax.set_ylabel(primary.split(":", 1)[0] if primary else "metric")
    if not numeric:
        ax.set_xticks(pos, [format_value(v) for v in xs])
    elif min(pos) > 0 and max(pos) / min(pos) >= LOG_AXIS_RATIO:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    lengths = [((r.get("lengths") or {}).get(task) or {}).get("mean") for r in ordered]
    if task and any(v is not None for v in lengths):
        ax2 = ax.twinx()
        ax2.plot(
            pos,
            [math.nan if v is None else v for v in lengths],
            color="gray",
            ls="--",
            marker="x",
            label="tokens generated (mean)",
        )
        ax2.set_ylabel("tokens generated (mean)")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=8)
    else:
        ax.legend(loc="best", fontsize=8)
    ax.set_title(f"{manifest.method}: {primary} against {key}", fontsize=10)


def _heatmap(fig: Any, manifest: Manifest, rows: list[dict[str, Any]], ranking: Ranking) -> None:
    import numpy as np

    kx, ky = manifest.keys
    primary = ranking.key(rows)
    xs, ys = _axis_values(rows, kx), _axis_values(rows, ky)
    ax = fig.add_subplot()
    best = ranking.best(rows)
    if len(xs) > HEATMAP_MAX or len(ys) > HEATMAP_MAX:
        px = [r["point"][kx] for r in rows]
        py = [r["point"][ky] for r in rows]
        values = [ranking.value(r) for r in rows]
        sc = ax.scatter(px, py, c=[math.nan if v is None else v for v in values], cmap="viridis")
        fig.colorbar(sc, ax=ax, label=primary)
        if best is not None:
            ax.plot([best["point"][kx]], [best["point"][ky]], marker="*", ms=16, color="crimson")
    else:
        grid = np.full((len(ys), len(xs)), np.nan)
        xi = {_tag(v): i for i, v in enumerate(xs)}
        yi = {_tag(v): i for i, v in enumerate(ys)}
        for r in rows:
            v = ranking.value(r)
            if v is not None:
                grid[yi[_tag(r["point"][ky])], xi[_tag(r["point"][kx])]] = v
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax, label=primary)
        ax.set_xticks(range(len(xs)), [format_value(v) for v in xs])
        ax.set_yticks(range(len(ys)), [format_value(v) for v in ys])
        finite = grid[np.isfinite(grid)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0
        if len(xs) * len(ys) <= 150:
            for (j, i), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    ax.text(
                        i,
                        j,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="black" if v > middle else "white",
                    )
        if best is not None:
            from matplotlib.patches import Rectangle

            i, j = xi[_tag(best["point"][kx])], yi[_tag(best["point"][ky])]
            ax.add_patch(Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, ec="crimson", lw=2.5))
    ax.set_xlabel(kx)
    ax.set_ylabel(ky)
    ax.set_title(f"{manifest.method}: {primary}", fontsize=10)


def _best_table(fig: Any, manifest: Manifest, rows: list[dict[str, Any]], ranking: Ranking) -> None:
    primary = ranking.key(rows)
    short = short_names(manifest.keys)
    ax = fig.add_subplot()
    ax.axis("off")
    cells = []
    for rank, row in enumerate(rows[:BEST_N], 1):
        v = ranking.value(row)
        cells.append(
            [
                str(rank),
                *(format_value(row["point"].get(k, "")) for k in manifest.keys),
                "-" if v is None else f"{v:.4f}",
            ]
        )
    n = len(manifest.keys)
    table = ax.table(
        cellText=cells,
        colLabels=[
            "#",
            *(short[k] for k in manifest.keys),
            primary.split(":", 1)[1] if primary else "metric",
        ],
        colWidths=[0.06, *([0.64 / n] * n), 0.3],
        loc="center",
        cellLoc="center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.3)
    ax.set_title(
        f"{manifest.method}: best {min(BEST_N, len(rows))} of {len(rows)} points by {primary}",
        fontsize=10,
    )


def _tag(v: Any) -> Any:
    """A dict key under which 1 and 1.0 are the same value and True is not 1."""
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, (int, float)):
        return ("num", float(v))
    return ("str", str(v))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

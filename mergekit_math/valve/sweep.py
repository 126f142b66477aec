"""`mmath valve sweep`: accuracy and chain length per α, the paper's figure, the cheapest α."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_math.errors import UserError
from mergekit_math.valve.build import alpha_name, build_alpha, built_for

if TYPE_CHECKING:
    from mergekit_math.eval.run import EvalOptions, EvalReport

DEFAULT_METRIC = "exact_match,flexible-extract"


@dataclass
class ValveRow:
    alpha: float
    accuracy: float
    stderr: float | None
    mean_tokens: float
    median_tokens: float
    p90_tokens: float
    tokens_saved: float  # vs α = 0, in tokens (negative: longer)
    saved_fraction: float  # tokens_saved / mean tokens at α = 0
    model: str
    fingerprint: str
    build_seconds: float
    eval_seconds: float


def pick_metric(report: EvalReport, task: str, metric: str | None) -> str:
    """The result key to call accuracy: ``metric`` if given, else exact_match with the
    flexible-extract filter when the task has it, else its first metric."""
    res = report.results.get(task, {})
    keys = [k for k in res if "," in k and "_stderr," not in k]
    if metric is not None:
        key = metric if "," in metric else f"{metric},none"
        if key not in res:
            raise UserError(f"--metric: {task} has no {key!r}; it has {', '.join(keys)}")
        return key
    if DEFAULT_METRIC in res:
        return DEFAULT_METRIC
    if not keys:
        raise UserError(f"{task}: no metric in the results")
    return keys[0]


def best_alpha(rows: list[ValveRow], tolerance: float) -> ValveRow | None:
    """The α with the fewest mean tokens whose accuracy is within ``tolerance`` of α = 0."""
    base = next((r for r in rows if r.alpha == 0), None)
    if base is None:
        return None
    ok = [r for r in rows if r.accuracy >= base.accuracy - tolerance - 1e-12]
    return min(ok, key=lambda r: (r.mean_tokens, -r.accuracy, abs(r.alpha)))


def run_sweep(
    model: Path,
    direction: Path,
    alphas: list[float],
    options: EvalOptions,
    out_dir: Path,
    *,
    metric: str | None = None,
    device: str = "cpu",
    keep_models: bool = True,
    tolerance: float = 0.01,
    echo: Callable[[str], None] = print,
) -> list[ValveRow]:
    """Build (or reuse) θ(α) for every α, evaluate it on the first task of ``options``, and
    write ``valve.jsonl``, ``valve.md`` and ``valve.png`` into ``out_dir``."""
    from mergekit_math.eval.run import evaluate

    if len(options.tasks) != 1:
        raise UserError("--tasks: a valve sweep evaluates exactly one task")
    task = options.tasks[0]
    if 0.0 not in alphas:
        alphas = [0.0, *alphas]  # the reference every α is compared with
    out_dir.mkdir(parents=True, exist_ok=True)
    models = out_dir / "models"
    results = []
    for i, alpha in enumerate(alphas, 1):
        t0 = time.perf_counter()
        if alpha == 0:
            folder = Path(model).resolve()  # θ(0) is the model itself, exactly
        else:
            folder = models / alpha_name(alpha)
            if built_for(folder, model, direction, alpha):
                echo(f"[{i}/{len(alphas)}] α = {alpha:g}: reusing {folder}")
            else:
                echo(f"[{i}/{len(alphas)}] α = {alpha:g}: building {folder}")
                build_alpha(model, direction, alpha, folder, device=device, force=True)
        built = time.perf_counter() - t0
        t1 = time.perf_counter()
        report = evaluate(folder, options)
        evaluated = time.perf_counter() - t1
        results.append((alpha, folder, report, built, evaluated))
        if alpha != 0 and not keep_models:
            shutil.rmtree(folder, ignore_errors=True)
    key = pick_metric(results[0][2], task, metric)
    rows = _rows(results, task, key)
    write_outputs(rows, out_dir, task, key, tolerance)
    return rows


def _rows(results: list, task: str, key: str) -> list[ValveRow]:
    rows = []
    base_tokens = None
    for alpha, folder, report, built, evaluated in results:
        lengths = report.lengths.get(task)
        if not lengths or not lengths.get("n"):
            raise UserError(f"{task} is not a generative task: it has no chain length to measure")
        res = report.results[task]
        stderr_key = key.replace(",", "_stderr,", 1)
        stderr = res.get(stderr_key)
        if alpha == 0:
            base_tokens = lengths["mean"]
        rows.append(
            ValveRow(
                alpha=alpha,
                accuracy=float(res[key]),
                stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
                mean_tokens=lengths["mean"],
                median_tokens=lengths["median"],
                p90_tokens=lengths["p90"],
                tokens_saved=0.0,
                saved_fraction=0.0,
                model=str(folder),
                fingerprint=report.fingerprint,
                build_seconds=round(built, 2),
                eval_seconds=round(evaluated, 2),
            )
        )
    assert base_tokens is not None
    for r in rows:
        r.tokens_saved = base_tokens - r.mean_tokens
        r.saved_fraction = r.tokens_saved / base_tokens if base_tokens else 0.0
    return sorted(rows, key=lambda r: r.alpha)


def markdown(rows: list[ValveRow], task: str, key: str, tolerance: float) -> str:
    best = best_alpha(rows, tolerance)
    metric = key.replace(",none", "")
    lines = [
        f"# CoT-Valve sweep: {task}, accuracy = `{metric}`",
        "",
        "| α | accuracy | ± stderr | mean tokens | median tokens | p90 tokens "
        "| tokens saved vs α=0 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = " **←**" if best is not None and r.alpha == best.alpha and r.alpha != 0 else ""
        stderr = "" if r.stderr is None else f"{r.stderr:.4f}"
        lines.append(
            f"| {r.alpha:g} | {r.accuracy:.4f} | {stderr} | {r.mean_tokens:.1f} | "
            f"{r.median_tokens:g} | {r.p90_tokens:g} | {r.tokens_saved:+.1f} "
            f"({r.saved_fraction:+.1%}){mark} |"
        )
    lines.append("")
    lines.append(best_sentence(rows, tolerance))
    return "\n".join(lines) + "\n"


def best_sentence(rows: list[ValveRow], tolerance: float) -> str:
    best = best_alpha(rows, tolerance)
    if best is None:
        return "No α = 0 row: nothing to compare with."
    base = next(r for r in rows if r.alpha == 0)
    if best.alpha == 0:
        return (
            f"No α shortens the chains while keeping accuracy within {tolerance:g} of α = 0 "
            f"({base.accuracy:.4f})."
        )
    return (
        f"Cheapest α within {tolerance:g} of α = 0's accuracy ({base.accuracy:.4f}): "
        f"α = {best.alpha:g}, accuracy {best.accuracy:.4f}, {best.mean_tokens:.1f} mean tokens "
        f"({best.saved_fraction:.0%} fewer than {base.mean_tokens:.1f})."
    )


def plot(rows: list[ValveRow], path: Path, task: str, key: str) -> None:
    """Accuracy against mean generated tokens, each point labelled by its α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    xs = [r.mean_tokens for r in rows]
    ys = [r.accuracy for r in rows]
    ax.plot(xs, ys, "-o", color="tab:blue")
    for r in rows:
        ax.annotate(
            f"α={r.alpha:g}",
            (r.mean_tokens, r.accuracy),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=8,
        )
    ax.set_xlabel("mean generated tokens")
    ax.set_ylabel(f"accuracy ({key.replace(',none', '')})")
    ax.set_title(f"CoT-Valve: {task}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(
    rows: list[ValveRow], out_dir: Path, task: str, key: str, tolerance: float = 0.01
) -> None:
    with open(out_dir / "valve.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"task": task, "metric": key, **asdict(r)}) + "\n")
    (out_dir / "valve.md").write_text(markdown(rows, task, key, tolerance))
    plot(rows, out_dir / "valve.png", task, key)

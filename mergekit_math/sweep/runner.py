"""Planning a sweep (every check before any tensor is read) and running its points in this
process or in local worker processes; the Ray backend is in :mod:`.ray_backend`."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mergekit_math.errors import UserError
from mergekit_math.sweep.grid import (
    Axis,
    Point,
    apply_point,
    check_axes,
    describe,
    grid_points,
    parse_set,
    random_points,
)
from mergekit_math.sweep.point import MODEL, PointTask, point_id, recipe_hash, run_point_safe
from mergekit_math.sweep.results import (
    MANIFEST,
    POINTS,
    RESULTS,
    Manifest,
    append_row,
    eval_identity,
    latest_rows,
    manifest_differences,
    read_manifest,
    read_rows,
    refuse_symlinks,
    sweep_lock,
    write_manifest,
)

Echo = Callable[[str], None]
# What --force removes from a sweep folder (and nothing else).
SWEEP_FILES = (RESULTS, MANIFEST, "report.md", "sweep.png", "best_recipe.yaml")
BEST = "best"
"""Where --push-best merges the best point again when its weights were not kept."""


class SweepSettings(BaseModel):
    """A sweep as the command line gives it."""

    model_config = ConfigDict(extra="forbid")

    recipe: Path
    sets: list[str] = Field(description="The --set KEY=VALUES texts.")
    out: Path = Field(description="SWEEP_DIR: results.jsonl, points/, reports.")
    eval: dict[str, Any] = Field(description="EvalOptions, as JSON data.")
    random: int | None = Field(None, description="Sample this many grid points.")
    seed: int = Field(0, description="Seed of the random sample.")
    metric: str | None = Field(None, description="Primary metric TASK:METRIC[,FILTER].")
    keep: Literal["none", "all", "best"] = "none"
    jobs: int = Field(1, ge=1)
    threads: int | None = Field(None, ge=1, description="torch threads per point.")
    backend: Literal["local", "ray"] = "local"
    address: str | None = None
    cpus_per_point: float = Field(1.0, gt=0)
    gpus_per_point: float = Field(0.0, ge=0)
    device: str = "cpu"
    force: bool = False


@dataclass(frozen=True)
class PlannedPoint:
    id: str
    hash: str
    point: Point
    recipe: dict[str, Any]


@dataclass
class Sweep:
    """A planned sweep: its points, which of them are recorded already, and the rest."""

    settings: SweepSettings
    axes: list[Axis]
    points: list[PlannedPoint]
    todo: list[PlannedPoint]
    rows: list[dict[str, Any]]
    manifest: Manifest
    warnings: list[str] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.settings.out


def plan_sweep(settings: SweepSettings) -> Sweep:
    """Check the recipe, the keys and values, the input checkpoints (headers only) and the
    sweep folder; resolve every point's recipe and find the points already recorded."""
    from mergekit_math.engine import build_plan
    from mergekit_math.eval.run import EvalOptions
    from mergekit_math.io.model_files import resolved_recipe
    from mergekit_math.recipe import load_recipe

    warnings: list[str] = []
    path = settings.recipe
    recipe = load_recipe(path)
    for block in ("evaluate", "push"):
        if getattr(recipe, block) is not None:
            setattr(recipe, block, None)
            warnings.append(
                f"{path}: the recipe's {block}: block is not used; the sweep evaluates every "
                "point with its own options" + (" (see --push-best)" if block == "push" else "")
            )
    axes = check_axes([parse_set(s) for s in settings.sets], recipe, str(path))
    if settings.random is not None:
        points = random_points(axes, settings.random, settings.seed)
        if settings.random > len(points):
            warnings.append(
                f"--random {settings.random}: the grid has only {len(points)} points; "
                "sweeping all of them"
            )
    else:
        points = grid_points(axes)

    # One plan of the recipe itself checks every checkpoint and gives the resolved recipe
    # (absolute paths, seed, defaults); a point's resolved recipe is that one with the
    # point's keys set, since sweepable keys are exactly the ones resolution leaves alone.
    plan = build_plan(recipe, recipe_dir=path.resolve().parent)
    try:
        base = resolved_recipe(plan)
        warnings += plan.warnings
    finally:
        for c in plan.checkpoints.values():
            c.close()
    planned: dict[str, PlannedPoint] = {}
    for point in points:
        data = apply_point(base, point)
        digest = recipe_hash(data)
        planned.setdefault(digest, PlannedPoint(point_id(digest), digest, point, data))

    options = EvalOptions(**settings.eval)
    if not options.tasks:
        raise UserError("--tasks: name at least one task (e.g. gsm8k_local)")
    manifest = Manifest(
        recipe=str(path.resolve()),
        method=recipe.merge_method,
        keys=[a.key for a in axes],
        eval=options.model_dump(mode="json"),
        identity=eval_identity(options),
        metric=settings.metric,
    )
    out = settings.out
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: exists and is not a folder")
    old = read_manifest(out) if out.is_dir() else None
    if out.is_dir() and old is None and any(out.iterdir()):
        raise UserError(f"-o {out}: exists and is not a sweep folder (no {MANIFEST})")
    if out.is_dir():
        refuse_symlinks(out)
    rows: list[dict[str, Any]] = []
    if old is not None and not settings.force:
        diff = manifest_differences(old, manifest)
        if diff:
            raise UserError(
                f"-o {out}: its recorded points were made with other settings ("
                + "; ".join(diff)
                + "); use another folder, or --force to discard them"
            )
        manifest.created = old.created
        if manifest.metric is None:
            manifest.metric = old.metric
        rows = latest_rows(read_rows(out / RESULTS))
    if rows and manifest.metric is not None:
        from mergekit_math.sweep.report import Ranking

        Ranking(manifest.metric).key(rows)  # a --metric the recorded rows lack fails now
    recorded = {r.get("recipe_hash") for r in rows}
    todo = [p for p in planned.values() if p.hash not in recorded]
    return Sweep(settings, axes, list(planned.values()), todo, rows, manifest, warnings)


# ----------------------------------------------------------------------------- running


@dataclass
class Outcome:
    ran: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """Points another process had recorded by the time they were reached, or holds now."""
    busy: list[tuple[str, str]] = field(default_factory=list)
    """Points another live process holds: neither recorded nor run by this sweep."""


class Tracker:
    """Follows finished points on the driver: records rows (when workers do not), keeps the
    best point's weights under ``--keep best``, moves the progress bar and prints a line
    per point."""

    def __init__(
        self,
        sweep: Sweep,
        *,
        record: bool,
        remove: Callable[[dict[str, Any]], None],
        echo: Echo,
        progress: bool,
    ):
        from mergekit_math.io.progress import progress as tqdm
        from mergekit_math.sweep.report import Ranking

        self.sweep = sweep
        self.record = record
        self.remove = remove
        self.echo = echo
        self.outcome = Outcome()
        self.points = {p.id: p for p in sweep.todo}
        self.recorded = {r.get("recipe_hash") for r in sweep.rows}
        self.ranking = Ranking(sweep.manifest.metric)
        self.best: dict[str, Any] | None = None
        kept = [r for r in sweep.rows if _model_dir(sweep, r).is_dir()]
        if kept and sweep.settings.keep == "best":
            self.best = self.ranking.best(kept)
            for r in kept:
                if r is not self.best:
                    remove(r)
        self.bar = tqdm(
            total=len(sweep.todo),
            unit="point",
            desc="sweep",
            disable=not progress,
            dynamic_ncols=True,
        )

    def handle(self, outcome: tuple[str, str, Any]) -> None:
        status, pid, payload = outcome
        point = self.points[pid].point
        if status == "ok":
            row = payload
            if self.record and row["recipe_hash"] not in self.recorded:  # one row per point
                append_row(self.sweep.out / RESULTS, row)
                self.recorded.add(row["recipe_hash"])
            self.outcome.ran.append(row)
            if self.sweep.settings.keep == "best":
                self._keep_best(row)
            line = f"{pid[:8]}  {describe(point)}  {self.ranking.summary(row)}"
            best = self.ranking.best(self.sweep.rows + self.outcome.ran)
            value = self.ranking.value(best) if best is not None else None
            if value is not None:
                self.bar.set_postfix_str(f"best {value:.4g}", refresh=False)
        elif status in ("skipped", "busy"):
            self.outcome.skipped.append((pid, payload))
            if status == "busy":
                self.outcome.busy.append((pid, payload))
            line = f"{pid[:8]}  {describe(point)}  skipped: {payload}"
        else:
            self.outcome.failed.append((pid, payload))
            line = f"{pid[:8]}  {describe(point)}  FAILED: {payload}"
        with self.bar.external_write_mode():
            self.echo(line)
        self.bar.update(1)

    def _keep_best(self, row: dict[str, Any]) -> None:
        if self.best is None or self.ranking.better(row, self.best):
            if self.best is not None:
                self.remove(self.best)
            self.best = row
        else:
            self.remove(row)

    def close(self) -> None:
        self.bar.close()


def _model_dir(sweep: Sweep, row: dict[str, Any]) -> Path:
    return sweep.out / POINTS / row["id"] / MODEL


def tasks_for(sweep: Sweep, threads: int | None, record: bool) -> list[PointTask]:
    s = sweep.settings
    out = s.out.resolve()
    return [
        PointTask(
            id=p.id,
            recipe_hash=p.hash,
            point=p.point,
            recipe=p.recipe,
            folder=str(out / POINTS / p.id),
            eval=sweep.manifest.eval,
            device=s.device,
            threads=threads,
            keep=s.keep != "none",
            results=str(out / RESULTS) if record else None,
        )
        for p in sweep.todo
    ]


def reset_folder(out: Path) -> None:
    """--force: remove what a sweep wrote there (and nothing else)."""
    for name in SWEEP_FILES:
        (out / name).unlink(missing_ok=True)
    for name in (POINTS, BEST):
        shutil.rmtree(out / name, ignore_errors=True)


def run_sweep(sweep: Sweep, *, echo: Echo, progress: bool = True) -> Outcome:
    """Run the points not recorded yet. Rows are appended as points finish, so an interrupt
    (KeyboardInterrupt, SIGTERM) loses only the points in flight; it is re-raised after the
    workers are stopped."""
    s = sweep.settings
    out = s.out
    out.mkdir(parents=True, exist_ok=True)
    with sweep_lock(out), _sigterm_interrupts():
        refuse_symlinks(out)
        if s.force:
            reset_folder(out)
        write_manifest(out, sweep.manifest)
        (out / POINTS).mkdir(exist_ok=True)
        if s.backend == "ray":
            from mergekit_math.sweep.ray_backend import run_ray

            return run_ray(sweep, echo=echo, progress=progress)
        threads = s.threads or max(1, (os.cpu_count() or 1) // s.jobs)
        tracker = Tracker(
            sweep,
            record=False,
            remove=lambda row: shutil.rmtree(_model_dir(sweep, row), ignore_errors=True),
            echo=echo,
            progress=progress,
        )
        try:
            run_local(tasks_for(sweep, threads, record=True), s.jobs, threads, tracker.handle)
        finally:
            tracker.close()
        return tracker.outcome


def run_local(
    tasks: list[PointTask],
    jobs: int,
    threads: int | None,
    handle: Callable[[tuple[str, str, Any]], None],
) -> None:
    """In this process for one job; else ``jobs`` spawned worker processes, each taking one
    point at a time (so at most ``jobs`` points hold weights on disk). On an interrupt the
    workers are terminated: a merge in progress removes its partial output."""
    if jobs == 1 or len(tasks) <= 1:
        for task in tasks:
            handle(run_point_safe(task))
        return
    ctx = multiprocessing.get_context("spawn")
    # Each worker dies with this process, however it ends (see point.die_with_parent).
    pool = ctx.Pool(
        min(jobs, len(tasks)), initializer=_init_worker, initargs=(threads, os.getpid())
    )
    try:
        for outcome in pool.imap_unordered(run_point_safe, tasks, chunksize=1):
            handle(outcome)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _init_worker(threads: int | None, parent: int | None = None) -> None:
    from mergekit_math.sweep.point import init_worker

    init_worker(threads, parent)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops the sweep as Ctrl-C does (workers stopped, recorded rows kept)."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

"""Planning a sweep (every check before any tensor is read) and running its points in this
process or in local worker processes; the Ray backend is in :mod:`.ray_backend`."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mergekit_math.errors import UserError
from mergekit_math.io.atomic import sigterm_raises
from mergekit_math.sweep.best_model import BEST
from mergekit_math.sweep.grid import (
    apply_point,
    check_axes,
    grid_points,
    parse_set,
    random_points,
)
from mergekit_math.sweep.point import PointTask, point_id, recipe_hash, run_point_safe
from mergekit_math.sweep.results import (
    MANIFEST,
    POINTS,
    RESULTS,
    Manifest,
    eval_identity,
    latest_rows,
    manifest_differences,
    read_manifest,
    read_rows,
    refuse_symlinks,
    sweep_lock,
    write_manifest,
)
from mergekit_math.sweep.tracker import (
    Echo,
    Outcome,
    PlannedPoint,
    Sweep,
    SweepSettings,
    Tracker,
    _model_dir,
    tasks_for,
)

# What --force removes from a sweep folder (and nothing else).
SWEEP_FILES = (RESULTS, MANIFEST, "report.md", "sweep.png", "best_recipe.yaml")


# Long: the resume rules (which recorded, failed, busy or changed points run again) read best
# as one sequence.
def plan_sweep(settings: SweepSettings) -> Sweep:
    """Check the recipe, the keys and values, the input checkpoints (headers only) and the
    sweep folder; resolve every point's recipe and find the points already recorded."""
    from mergekit_math.eval.run import EvalOptions

    warnings: list[str] = []
    path = settings.recipe
    recipe = load_swept_recipe(path, settings.lenient, warnings)
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

    base = resolve_base(recipe, path, settings.lenient, warnings)
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


def load_swept_recipe(path: Path, lenient: bool, warnings: list[str]) -> Any:
    """The recipe a sweep or search varies, without its evaluate: and push: blocks (every
    point is evaluated with the command's own options); warnings are appended."""
    from mergekit_math.recipe import load_recipe

    recipe = load_recipe(path, warnings=warnings if lenient else None)
    for block in ("evaluate", "push"):
        if getattr(recipe, block) is not None:
            setattr(recipe, block, None)
            warnings.append(
                f"{path}: the recipe's {block}: block is not used; every point is evaluated "
                "with the command's own options" + (" (see --push-best)" if block == "push" else "")
            )
    return recipe


def resolve_base(recipe: Any, path: Path, lenient: bool, warnings: list[str]) -> dict[str, Any]:
    """The resolved recipe (absolute paths, seed, defaults) that every point starts from.

    One plan of the recipe itself checks every checkpoint (headers only); a point's resolved
    recipe is this one with the point's keys set, since sweepable keys are exactly the ones
    resolution leaves alone. With ``lenient`` the plan drops unknown parameters from the
    recipe: the points' resolved recipes (made from it) are strict."""
    from mergekit_math.io.model_files import resolved_recipe
    from mergekit_math.merge import build_plan

    plan = build_plan(recipe, recipe_dir=path.resolve().parent, lenient=lenient)
    try:
        base = resolved_recipe(plan)
        warnings += plan.warnings
    finally:
        for c in plan.checkpoints.values():
            c.close()
    return base


# ----------------------------------------------------------------------------- running


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
    with sweep_lock(out), sigterm_raises():
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
        with interrupts_noted() as noted:
            for task in tasks:
                outcome = run_point_safe(task)
                if noted and outcome[0] == "error":
                    # a library turned the interrupt into its own error (pydantic wraps a
                    # KeyboardInterrupt raised while it builds a validator): not the point's
                    raise KeyboardInterrupt(f"signal {noted[0]}")
                handle(outcome)
                if noted:
                    raise KeyboardInterrupt(f"signal {noted[0]}")
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
def interrupts_noted() -> Iterator[list[int]]:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt as usual, and are also noted in the list
    yielded, so an interrupt that a library caught and wrapped still stops the sweep."""
    noted: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        noted.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield noted
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

"""`mmath search`: an Optuna study over merge settings, each trial a sweep point.

A trial asks the sampler for values of the ``--space`` keys, sets them in the resolved recipe
and runs that point exactly as `mmath sweep` does (:func:`~.point.run_point_safe`: merge,
evaluate, one row appended to ``results.jsonl``); its ``--objective`` values are read off the
row and told to the study. A point recorded already (a repeated suggestion, or a trial whose
row was written just before an interrupt) is not merged again: its row is reused.

The study lives in ``SEARCH_DIR/study.db`` (SQLite), or at ``--storage URL``. The same command
again resumes it: ``--trials N`` is the number of completed trials wanted in all, so completed
trials are not repeated; a trial interrupted by Ctrl-C or SIGTERM is marked failed and its
values enqueued, so the next trial to start runs them again. ``--workers N`` local processes
share the study; claiming a trial happens under a lock in the folder, so together they stop at
exactly N completed trials. Optuna is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import multiprocessing
import os
import signal
import socket
import time
import warnings as py_warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mergekit_math import __version__
from mergekit_math.errors import UserError
from mergekit_math.io.atomic import pid_alive
from mergekit_math.sweep.best_model import BEST
from mergekit_math.sweep.grid import apply_point
from mergekit_math.sweep.objectives import (
    Dim,
    Objective,
    check_objectives,
    check_space,
    objective_value,
    parse_objective,
    parse_pick,
    parse_space,
    typed_value,
)
from mergekit_math.sweep.point import PointTask, point_id, recipe_hash, run_point_safe
from mergekit_math.sweep.results import (
    POINTS,
    RESULTS,
    eval_identity,
    latest_rows,
    open_no_follow,
    read_rows,
    refuse_symlinks,
)

STUDY_DB = "study.db"
SEARCH_MANIFEST = "search.json"
CLAIM = ".search.claim"
"""Held (``flock``) while a worker counts the study's trials and claims the next one."""
SEARCH_FILES = (
    RESULTS,
    SEARCH_MANIFEST,
    STUDY_DB,
    "pareto.md",
    "pareto.png",
    "best_recipe.yaml",
    "baselines.jsonl",
)
MAX_FAILURES = 3
"""A worker stops after this many failed trials in one run (a broken setup fails them all)."""
POLL_SECONDS = 0.5
Samplers = Literal["tpe", "nsga2", "cmaes", "random"]
Show = Callable[["TrialDone"], None]


class SearchSettings(BaseModel):
    """A search as the command line gives it."""

    model_config = ConfigDict(extra="forbid")

    recipe: Path
    space: list[str] = Field(description="The --space KEY=RANGE texts.")
    objectives: list[str] = Field(description="The --objective texts.")
    trials: int = Field(ge=1, description="Completed trials wanted in the study, in all.")
    out: Path = Field(description="SEARCH_DIR: study.db, results.jsonl, points/, reports.")
    eval: dict[str, Any] = Field(description="EvalOptions, as JSON data.")
    sampler: Samplers = "tpe"
    seed: int = Field(0, description="Seed of the sampler.")
    workers: int = Field(1, ge=1, description="Local worker processes sharing the study.")
    storage: str | None = Field(None, description="Optuna RDB URL; default SEARCH_DIR/study.db.")
    study_name: str | None = Field(None, description="Default: the folder's name.")
    pick: str = "knee"
    threads: int | None = Field(None, ge=1, description="torch threads per trial.")
    device: str = "cpu"
    force: bool = False
    lenient: bool = False
    baselines: bool = Field(False, description="Also evaluate the recipe's input models.")
    in_memory: bool = Field(False, description="Merge into a model kept loaded (--in-memory).")


class SearchManifest(BaseModel):
    """``search.json``: what every trial of the folder was made with. A rerun must match it."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["mmath-search"] = "mmath-search"
    version: int = 1
    recipe: str = Field(description="The searched recipe, absolute path.")
    method: str
    space: list[Dim]
    objectives: list[Objective]
    eval: dict[str, Any] = Field(description="The evaluation options (as `mmath eval`).")
    identity: dict[str, Any] = Field(description="What decides the results; checked on rerun.")
    study: str = Field(description="The Optuna study's name.")
    storage: Literal["folder", "url"] = Field(description="study.db here, or --storage URL.")
    created: str = ""
    mmath_version: str = __version__

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.space]

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]


@dataclass
class Search:
    """A planned search: the checked space and objectives and the recipe every point starts
    from. Plain data, so it pickles for worker processes."""

    settings: SearchSettings
    manifest: SearchManifest
    base: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.settings.out

    @property
    def storage_url(self) -> str:
        return self.settings.storage or f"sqlite:///{(self.out / STUDY_DB).resolve()}"


@dataclass(frozen=True)
class TrialDone:
    number: int
    point: dict[str, Any]
    values: list[float] | None
    error: str | None = None
    point_id: str | None = None


@dataclass
class SearchOutcome:
    complete: int = 0
    """Completed trials in the study at the end."""
    ran: list[TrialDone] = field(default_factory=list)
    failed: list[TrialDone] = field(default_factory=list)


# ----------------------------------------------------------------------------- planning


def plan_search(settings: SearchSettings) -> Search:
    """Check the recipe, the space, the objectives, the pick rule, the input checkpoints
    (headers only) and the search folder; nothing runs."""
    from mergekit_math.eval.run import EvalOptions
    from mergekit_math.sweep.runner import load_swept_recipe, resolve_base

    warnings: list[str] = []
    path = settings.recipe
    recipe = load_swept_recipe(path, settings.lenient, warnings)
    dims = check_space([parse_space(s) for s in settings.space], recipe, str(path))
    objectives = check_objectives([parse_objective(o) for o in settings.objectives])
    parse_pick(settings.pick)
    if settings.sampler == "cmaes" and len(objectives) > 1:
        raise UserError("--sampler cmaes optimises one objective; use tpe or nsga2 for several")
    base = resolve_base(recipe, path, settings.lenient, warnings)
    options = EvalOptions(**settings.eval)
    if not options.tasks:
        raise UserError("--tasks: name at least one task (e.g. gsm8k_local)")
    out = settings.out
    manifest = SearchManifest(
        recipe=str(path.resolve()),
        method=recipe.merge_method,
        space=dims,
        objectives=objectives,
        eval=options.model_dump(mode="json"),
        identity=eval_identity(options),
        study=settings.study_name or out.resolve().name,
        storage="url" if settings.storage else "folder",
    )
    old = _check_folder(out, settings.force)
    if old is not None and not settings.force:
        diff = manifest_differences(old, manifest)
        if diff:
            raise UserError(
                f"-o {out}: its trials were made with other settings ("
                + "; ".join(diff)
                + "); use another folder, or --force to discard them"
            )
        manifest.created = old.created
    return Search(settings, manifest, base, warnings)


def _check_folder(out: Path, force: bool) -> SearchManifest | None:
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: exists and is not a folder")
    if not out.is_dir():
        return None
    for name in (*SEARCH_FILES, CLAIM):
        if (out / name).is_symlink():
            raise UserError(f"{out / name} is a symlink; a search folder holds its own files only")
    refuse_symlinks(out)
    old = read_search_manifest(out)
    if old is None and any(out.iterdir()):
        raise UserError(f"-o {out}: exists and is not a search folder (no {SEARCH_MANIFEST})")
    return old


def read_search_manifest(folder: Path) -> SearchManifest | None:
    path = folder / SEARCH_MANIFEST
    if not path.is_file():
        return None
    try:
        return SearchManifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: not a search manifest ({str(exc).splitlines()[0]})") from None


def manifest_differences(old: SearchManifest, new: SearchManifest) -> list[str]:
    """Why the trials of ``old`` cannot be resumed by ``new`` (empty when they can)."""
    out = []
    if old.recipe != new.recipe:
        out.append(f"recipe {old.recipe} -> {new.recipe}")
    if old.space != new.space:
        out.append(
            "space "
            + ", ".join(d.describe() for d in old.space)
            + " -> "
            + ", ".join(d.describe() for d in new.space)
        )
    if old.objectives != new.objectives:
        out.append(
            "objectives "
            + ", ".join(o.text for o in old.objectives)
            + " -> "
            + ", ".join(o.text for o in new.objectives)
        )
    for k in sorted(set(old.identity) | set(new.identity)):
        a, b = old.identity.get(k), new.identity.get(k)
        if a != b:
            out.append(f"{k} {a!r} -> {b!r}")
    return out


# ----------------------------------------------------------------------------- the study


def _quiet_optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    py_warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def make_sampler(name: str, seed: int, trials: int) -> Any:
    """The Optuna sampler ``--sampler`` names, seeded."""
    optuna = _quiet_optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "nsga2":  # a generation of about a third of the trials, so several evolve
        size = max(2, min(50, trials // 3))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=size)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise UserError("--sampler cmaes needs the cmaes package (pip install cmaes)") from None
        return optuna.samplers.CmaEsSampler(seed=seed)
    raise UserError(f"--sampler: expected tpe, nsga2, cmaes or random, got {name!r}")


def open_study(search: Search, sampler: Any = None, create: bool = False) -> Any:
    """The search's study (created when ``create``), with the given sampler."""
    optuna = _quiet_optuna()
    url = search.storage_url
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):  # workers wait for each other's writes instead of failing
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    try:
        storage = optuna.storages.RDBStorage(url, **kwargs)
        if create:
            return optuna.create_study(
                storage=storage,
                study_name=search.manifest.study,
                directions=search.manifest.directions,
                sampler=sampler,
                load_if_exists=True,
            )
        return optuna.load_study(study_name=search.manifest.study, storage=storage, sampler=sampler)
    except (ValueError, ImportError, KeyError) as exc:
        raise UserError(f"--storage {url}: {exc}") from None


def reset_folder(search: Search) -> None:
    """--force: remove what a search wrote there (and nothing else), and its study."""
    import shutil

    out = search.out
    for name in SEARCH_FILES:
        (out / name).unlink(missing_ok=True)
    for name in (POINTS, BEST):
        shutil.rmtree(out / name, ignore_errors=True)
    if search.settings.storage:
        optuna = _quiet_optuna()
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=search.manifest.study, storage=search.storage_url)


def reclaim_stale(study: Any) -> int:
    """Trials left running by a process of this host that is gone (killed, or a worker
    stopped by its parent) are marked failed and their values enqueued to run again."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    count = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or (isinstance(pid, int) and pid_alive(pid)):
            continue
        # Optuna has no public setter for another process's trial: the storage's is used.
        if study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
            study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted")
            _enqueue_again(study, t.params, t.number)
            count += 1
    return count


def _enqueue_again(study: Any, params: dict[str, Any], number: int) -> None:
    if params:
        study.enqueue_trial(params, user_attrs={"retry_of": number})


@contextlib.contextmanager
def _claim(out: Path) -> Iterator[None]:
    fd = open_no_follow(out / CLAIM, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def trial_points(study: Any) -> dict[str, list[int]]:
    """Point id -> numbers of the completed trials that evaluated it."""
    from optuna.trial import TrialState

    out: dict[str, list[int]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        pid = t.user_attrs.get("point")
        if isinstance(pid, str):
            out.setdefault(pid, []).append(t.number)
    return out


def count_states(study: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


# ----------------------------------------------------------------------------- trials


def work(search: Search, index: int, threads: int | None, show: Show, noted: list[int]) -> None:
    """One worker: claim a trial while fewer than --trials are complete or running, run it,
    tell its values; stop after MAX_FAILURES failed trials. ``noted`` holds the signals
    received (see :func:`~.runner.interrupts_noted`)."""
    study = open_study(search)
    study.sampler = make_sampler(
        search.settings.sampler,
        # a resumed run and each worker draw afresh, not the first run's values again
        search.settings.seed + 7919 * index + len(study.get_trials(deepcopy=False)),
        search.settings.trials,
    )
    host, failures = socket.gethostname(), 0
    while failures < MAX_FAILURES:
        with _claim(search.out):
            reclaim_stale(study)
            counts = count_states(study)
            if counts.get("COMPLETE", 0) + counts.get("RUNNING", 0) >= search.settings.trials:
                return
            trial = study.ask()
            trial.set_user_attr("host", host)
            trial.set_user_attr("pid", os.getpid())
        done = run_trial(search, study, trial, threads, noted)
        show(done)
        failures += done.error is not None
        if noted:
            raise KeyboardInterrupt(f"signal {noted[0]}")


def suggest(trial: Any, dim: Dim) -> Any:
    if dim.choices is not None:
        return trial.suggest_categorical(dim.key, dim.choices)
    if dim.integer:
        return trial.suggest_int(dim.key, int(dim.low), int(dim.high), log=dim.log)  # type: ignore[arg-type]
    return trial.suggest_float(dim.key, dim.low, dim.high, log=dim.log)


def run_trial(
    search: Search, study: Any, trial: Any, threads: int | None, noted: list[int]
) -> TrialDone:
    """Run the trial's point (or reuse its recorded row) and tell the study its values. An
    interrupt marks the trial failed, enqueues its values again and is re-raised; a failed
    point marks it failed with the message; an objective the row lacks is a UserError."""
    from optuna.trial import TrialState

    point = {d.key: typed_value(d, suggest(trial, d)) for d in search.manifest.space}
    data = apply_point(search.base, point)
    digest = recipe_hash(data)
    pid = point_id(digest)
    trial.set_user_attr("point", pid)
    out = search.out.resolve()
    task = PointTask(
        id=pid,
        recipe_hash=digest,
        point=point,
        recipe=data,
        folder=str(out / POINTS / pid),
        eval=search.manifest.eval,
        device=search.settings.device,
        threads=threads,
        results=str(out / RESULTS),
        in_memory=search.settings.in_memory,
    )
    try:
        status, payload = row_for(task)
        if noted and status == "error":  # an interrupt a library wrapped in its own error
            raise KeyboardInterrupt(f"signal {noted[0]}")
        if status == "error":
            trial.set_user_attr("error", payload)
            study.tell(trial, state=TrialState.FAIL)
            return TrialDone(trial.number, point, None, payload, pid)
        values = [objective_value(o, payload) for o in search.manifest.objectives]
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        trial.set_user_attr("error", "interrupted" if interrupted else str(exc))
        study.tell(trial, state=TrialState.FAIL)
        if interrupted:
            _enqueue_again(study, trial.params, trial.number)
        raise
    study.tell(trial, values)
    return TrialDone(trial.number, point, values, None, pid)


def row_for(task: PointTask) -> tuple[str, Any]:
    """``("ok", row)`` with the point's row, run now or recorded already, or ``("error",
    message)``. A point another worker is running is waited for."""
    results = Path(task.results or "")
    while True:
        for row in latest_rows(read_rows(results)):
            if row.get("recipe_hash") == task.recipe_hash:
                return "ok", row
        status, _, payload = run_point_safe(task)
        if status in ("ok", "error"):
            return status, payload
        time.sleep(POLL_SECONDS)  # busy or just recorded: read its row on the next turn


# ----------------------------------------------------------------------------- running


def run_search(search: Search, *, show: Show) -> SearchOutcome:
    """Run trials until --trials are complete, in this process or in --workers processes;
    ``show`` is called once per finished trial. An interrupt (KeyboardInterrupt, SIGTERM)
    marks the trials in flight failed (to run again) and is re-raised."""
    from mergekit_math.io.atomic import sigterm_raises
    from mergekit_math.sweep.runner import interrupts_noted

    s = search.settings
    out = s.out
    out.mkdir(parents=True, exist_ok=True)
    if s.force:
        reset_folder(search)
    write_search_manifest(out, search.manifest)
    (out / POINTS).mkdir(exist_ok=True)
    study = open_study(search, create=True)
    before = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    threads = s.threads or max(1, (os.cpu_count() or 1) // s.workers)
    outcome = SearchOutcome()

    def record(done: TrialDone) -> None:
        (outcome.failed if done.error else outcome.ran).append(done)
        show(done)

    with sigterm_raises():
        if s.workers == 1:
            with interrupts_noted() as noted:
                work(search, 0, threads, record, noted)
        else:
            _run_workers(search, study, threads, before, record)
    outcome.complete = count_states(study).get("COMPLETE", 0)
    return outcome


def _run_workers(search: Search, study: Any, threads: int, before: set[int], record: Show) -> None:
    """--workers processes, each running :func:`work`; this process shows their trials as
    the study records them. On an interrupt the workers are stopped (SIGTERM: each marks its
    trial failed and enqueues it again) and any trial they left running is reclaimed."""
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_main, args=(search, i, threads, os.getpid()))
        for i in range(search.settings.workers)
    ]
    seen = set(before)
    try:
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            _show_new(study, seen, record)
            time.sleep(POLL_SECONDS)
        _show_new(study, seen, record)
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        reclaim_stale(study)
        raise
    finally:
        for p in procs:
            p.join()


def _show_new(study: Any, seen: set[int], record: Show) -> None:
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        if t.number in seen:
            continue
        seen.add(t.number)
        error = None if t.state == TrialState.COMPLETE else str(t.user_attrs.get("error", "failed"))
        values = list(t.values) if t.values is not None else None
        record(TrialDone(t.number, dict(t.params), values, error, t.user_attrs.get("point")))


def _worker_main(search: Search, index: int, threads: int, parent: int) -> None:
    """A worker process: Ctrl-C is its parent's to handle; SIGTERM (the parent stopping it)
    interrupts the trial in flight, which is then marked failed and enqueued again."""
    from mergekit_math.sweep.point import init_worker

    init_worker(threads, parent)
    noted: list[int] = []

    def on_term(signum: int, frame: Any) -> None:
        noted.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        work(search, index, threads, lambda done: None, noted)
    except (KeyboardInterrupt, UserError):
        pass  # the trial records why; the parent reports it


def write_search_manifest(folder: Path, manifest: SearchManifest) -> None:
    if not manifest.created:
        manifest.created = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
    tmp = folder / f".{SEARCH_MANIFEST}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)  # never write through a link planted there
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    os.replace(tmp, folder / SEARCH_MANIFEST)

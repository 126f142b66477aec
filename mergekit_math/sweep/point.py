"""One sweep point from start to finish: write its resolved recipe, merge it into a scratch
folder, evaluate it, build its results row, delete the weights (unless kept) and, for local
workers, append the row. This is what a worker process or a Ray task runs."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergekit_math import __version__
from mergekit_math.errors import UserError
from mergekit_math.sweep.results import append_row, is_recorded, open_no_follow

MODEL = "model"
RECIPE = "recipe.yaml"
LOG = "log.txt"
LOCK = ".point.lock"
"""Held (``flock``) by the process running the point, from its start to its row."""
PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCH_SECONDS = 0.5


class PointSkipped(Exception):
    """The point is not run here: another live process holds its lock, or its row is
    recorded already (a worker of an earlier sweep finished it)."""


class PointBusy(PointSkipped):
    """Another live process holds the point's lock: it is neither recorded nor run here."""


@dataclass(frozen=True)
class PointTask:
    """Everything a worker needs for one point; plain data, so it pickles for any backend."""

    id: str
    recipe_hash: str
    point: dict[str, Any]
    recipe: dict[str, Any]
    """The resolved recipe: absolute paths, seed and defaults explicit, no evaluate/push."""
    folder: str
    """``SWEEP_DIR/points/<id>``: recipe.yaml, log.txt and the weights in model/."""
    eval: dict[str, Any]
    """EvalOptions as JSON data."""
    device: str = "cpu"
    threads: int | None = None
    keep: bool = False
    """Leave the weights in place (``--keep all|best``)."""
    results: str | None = None
    """Append the row to this results file; None when the caller records it."""
    in_memory: bool = False
    """Merge into this process's loaded model and evaluate it there (``--in-memory``): no
    files unless kept; a model that cannot hold the output falls back to the disk path."""


def recipe_hash(recipe: dict[str, Any]) -> str:
    """The identity of a point: a hash of its resolved recipe as canonical JSON."""
    text = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def point_id(digest: str) -> str:
    """The short id of a point (its folder name): 16 hex digits of its recipe hash."""
    return digest.split(":", 1)[-1][:16]


def recipe_text(recipe: dict[str, Any], header: str) -> str:
    return header + yaml.safe_dump(recipe, sort_keys=False)


def run_point(task: PointTask) -> dict[str, Any]:
    """Merge, evaluate and record one point; returns its row. On any failure the point's
    weights are removed, so a failed or interrupted point costs no disk.

    The point's lock is held throughout, the row appended included: a second process given
    the same point (a resumed sweep while a worker of the killed one still runs) raises
    :class:`PointSkipped` instead of writing into the same folder, and so does a point whose
    row was recorded by the time the lock is taken."""
    folder = Path(task.folder)
    folder.mkdir(parents=True, exist_ok=True)
    _refuse_links(folder)
    with point_lock(folder, task.id):
        if task.results is not None and is_recorded(Path(task.results), task.recipe_hash):
            raise PointSkipped(f"point {task.id} is recorded already; not run again")
        row = _merge_and_evaluate(task, folder)
        if task.results is not None:
            append_row(Path(task.results), row)
    return row


def _merge_and_evaluate(task: PointTask, folder: Path) -> dict[str, Any]:
    import torch

    from mergekit_math.eval.run import EvalOptions, evaluate
    from mergekit_math.merge import build_plan
    from mergekit_math.recipe import parse_recipe

    _import_evaluation()  # once per process, so it does not count as the first point's time
    recipe_path = folder / RECIPE
    _write_atomic(
        recipe_path,
        recipe_text(task.recipe, f"# mmath merge {RECIPE} OUT_DIR   (sweep point {task.id})\n"),
    )
    model_dir = folder / MODEL
    threads_before = torch.get_num_threads()
    if task.threads:
        torch.set_num_threads(task.threads)
    try:
        log_fd = open_no_follow(folder / LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with open(log_fd, "w") as log, _redirected(log):
            started = time.perf_counter()
            recipe = parse_recipe(task.recipe, source=str(recipe_path))
            plan = build_plan(recipe, recipe_dir=folder)
            options = EvalOptions(**task.eval)
            loaded = _merge(task, plan, model_dir, options)
            merge_seconds = time.perf_counter() - started
            report = evaluate(model_dir, options, in_memory=loaded)
    except BaseException:
        shutil.rmtree(model_dir, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads_before)
    row = make_row(task, report, merge_seconds, model_dir if task.keep else None)
    if not task.keep:
        shutil.rmtree(model_dir, ignore_errors=True)
    return row


def _merge(task: PointTask, plan: Any, model_dir: Path, options: Any) -> Any:
    """Merge the point: into the folder (None returned), or with ``in_memory`` into this
    process's model (returned; the folder is written too when the point is kept). A model
    that cannot hold the output is merged to the folder instead, with a note in the log."""
    from mergekit_math.merge import execute

    if task.in_memory:
        from mergekit_math.merge.in_memory import SkeletonMismatch, merge_in_memory

        try:
            return merge_in_memory(
                plan,
                device=task.device,
                eval_device=options.device,
                dtype=options.dtype,
                threads=task.threads,
                keep=model_dir if task.keep else None,
            )
        except SkeletonMismatch as exc:
            # raised before the first read: the plan is still whole
            print(f"in-memory merge not possible ({exc}); merging to {model_dir}", flush=True)
    execute(plan, model_dir, device=task.device, force=True, progress=False, threads=task.threads)
    return None


def _refuse_links(folder: Path) -> None:
    """The point folder and what the point writes in it are never symlinks: writing or
    deleting through one would reach outside the sweep folder."""
    for path in (folder, *(folder / n for n in (RECIPE, LOG, MODEL, LOCK))):
        if path.is_symlink():
            raise UserError(
                f"{path} is a symlink (to {os.readlink(path)}); a sweep point writes only "
                "inside its own folder: remove the link"
            )


@contextlib.contextmanager
def point_lock(folder: Path, point: str) -> Iterator[None]:
    """Hold ``folder/.point.lock`` (``flock``, released by the kernel however the holder
    dies) with this process's pid in it; :class:`PointSkipped` when a live process has it."""
    fd = open_no_follow(folder / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise PointBusy(
                f"point {point} is being run by another process (pid {other}), perhaps a "
                "worker of an earlier sweep; skipped, run the same command again once it ends"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _import_evaluation() -> None:
    import lm_eval.evaluator  # noqa: F401
    import lm_eval.models.huggingface  # noqa: F401


def make_row(
    task: PointTask, report: Any, merge_seconds: float, model_dir: Path | None
) -> dict[str, Any]:
    """The results row of a point: its values, metrics (``TASK:METRIC,FILTER``), standard
    errors, chain-of-thought length statistics, timings and output fingerprint."""
    from mergekit_math.hub.gate import metric_keys

    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    better: dict[str, bool] = {}
    for task_name, values in report.results.items():
        hib = report.data["higher_is_better"].get(task_name, {})
        for key in metric_keys(values):
            metric, comma, filt = key.partition(",")
            if not comma:  # not a metric: lm-eval's sample_len and the like
                continue
            metrics[f"{task_name}:{key}"] = values[key]
            err = values.get(f"{metric}_stderr,{filt}")
            if isinstance(err, (int, float)) and not isinstance(err, bool):
                stderr[f"{task_name}:{key}"] = err
            if metric in hib:
                better[f"{task_name}:{metric}"] = bool(hib[metric])
    samples = {
        t: n.get("effective")
        for t, n in report.data["n-samples"].items()
        if isinstance(n, dict) and n.get("effective") is not None
    }
    return {
        "id": task.id,
        "recipe_hash": task.recipe_hash,
        "point": task.point,
        "metrics": metrics,
        "stderr": stderr,
        "higher_is_better": better,
        "lengths": report.lengths,
        "samples": samples,
        "merge_seconds": round(merge_seconds, 3),
        "eval_seconds": round(report.seconds, 3),
        "fingerprint": report.fingerprint,
        "eval_cached": bool(report.cached) and all(report.cached.values()),
        "model": str(model_dir) if model_dir is not None else None,
        "recipe": task.recipe,
        "device": task.device,
        "threads": task.threads,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "node": _ray_node(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mmath_version": __version__,
    }


def run_point_safe(task: PointTask) -> tuple[str, str, Any]:
    """:func:`run_point` for worker pools: ``("ok", id, row)`` or ``("error", id, message)``,
    so one failing point does not stop the others."""
    try:
        return ("ok", task.id, run_point(task))
    except PointBusy as exc:
        return ("busy", task.id, str(exc))
    except PointSkipped as exc:
        return ("skipped", task.id, str(exc))
    except UserError as exc:
        return ("error", task.id, str(exc))
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return (
            "error",
            task.id,
            f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno}; "
            f"see {Path(task.folder) / LOG})",
        )


def init_worker(threads: int | None, parent: int | None = None) -> None:
    """Start of a local worker process: its thread budget (before torch is imported), no
    reaction to Ctrl-C, which the parent handles by stopping the workers, and, given the
    parent's pid, death with the parent (see :func:`die_with_parent`)."""
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent is not None:
        die_with_parent(parent)


def die_with_parent(parent: int) -> None:
    """End this process when ``parent`` ends, however it ends (SIGKILL included), so no
    worker outlives its sweep and merges on beside the resumed one.

    On Linux the kernel sends SIGKILL when the parent dies (``PR_SET_PDEATHSIG``); everywhere
    a daemon thread also checks every half second that the parent is still this process's
    parent and kills the process when it is not. A parent already gone exits at once."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watchdog alone
            pass
    if os.getppid() != parent:  # died before prctl took effect
        os._exit(1)
    threading.Thread(
        target=_watch_parent, args=(parent,), name="mmath-parent-watch", daemon=True
    ).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


def remove_model(folder: str) -> None:
    """Delete a point's weights (a Ray task runs this on the node that holds them)."""
    shutil.rmtree(Path(folder) / MODEL, ignore_errors=True)


@contextlib.contextmanager
def _redirected(log: Any):
    """lm-eval's, datasets' and transformers' progress bars and messages go to the point's
    log instead of the sweep's progress display."""
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def _ray_node() -> str | None:
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # never write through a link planted there
    tmp.write_text(text)
    os.replace(tmp, path)

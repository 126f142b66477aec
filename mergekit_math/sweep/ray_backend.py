"""`mmath sweep --backend ray`: every point is a Ray task with ``--cpus-per-point`` /
``--gpus-per-point``; Ray does the scheduling, this module only submits the points and
records each row as its task completes.

The driver (this process) appends the rows, so results stream into ``SWEEP_DIR/results.jsonl``
also through Ray Client (``--address ray://HOST:PORT``). The tasks read the input models at the
paths of the resolved recipe and write each point's folder under ``SWEEP_DIR/points``: on a
cluster of several machines both must be on a filesystem every node sees.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from mergekit_math.errors import UserError
from mergekit_math.sweep.point import remove_model, run_point_safe

if TYPE_CHECKING:
    from mergekit_math.sweep.tracker import Echo, Outcome, Sweep

INSTALL_HINT = "pip install 'mergekit-math[ray]' (or pip install ray)"


def import_ray() -> Any:
    """Ray, or a UserError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(
            f"--backend ray needs Ray, which is not installed: {INSTALL_HINT}"
        ) from None
    return ray


def run_ray(sweep: Sweep, *, echo: Echo, progress: bool = True) -> Outcome:
    """Connect to (``--address``) or start a Ray instance, run one task per point, record the
    rows as tasks complete. On an interrupt, the tasks not finished are cancelled; a Ray
    instance this call started is shut down."""
    from mergekit_math.sweep.results import POINTS
    from mergekit_math.sweep.tracker import Tracker, tasks_for

    ray = import_ray()
    s = sweep.settings
    started = False
    if not ray.is_initialized():
        try:
            ray.init(
                address=s.address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"--address {s.address}" if s.address else "--backend ray"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{where}: could not start or reach Ray ({first})") from None
        started = True
    try:
        remover = ray.remote(num_cpus=0)(remove_model)
        out = s.out.resolve()

        def remove(row: dict[str, Any]) -> None:
            options: dict[str, Any] = {}
            if row.get("node"):
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                    row["node"], soft=True
                )
            ray.get(remover.options(**options).remote(str(out / POINTS / row["id"])))

        threads = s.threads or max(1, int(s.cpus_per_point))
        tracker = Tracker(sweep, record=True, remove=remove, echo=echo, progress=progress)
        task = ray.remote(run_point_safe).options(
            num_cpus=s.cpus_per_point, num_gpus=s.gpus_per_point, max_retries=0
        )
        pending = {task.remote(t): t for t in tasks_for(sweep, threads, record=False)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    point = pending.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        first = str(exc).strip().splitlines()[0]
                        outcome = ("error", point.id, f"Ray task failed: {first}")
                    tracker.handle(outcome)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            tracker.close()
        return tracker.outcome
    finally:
        if started:
            ray.shutdown()

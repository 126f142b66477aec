"""What the sweep runners share: the planned sweep's plain types, and the :class:`Tracker`
that follows finished points on the driver, for the local runner (:mod:`.runner`) and the
Ray backend (:mod:`.ray_backend`) alike. Imports neither of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mergekit_math.sweep.grid import Axis, Point, describe
from mergekit_math.sweep.point import MODEL, PointTask
from mergekit_math.sweep.results import POINTS, RESULTS, Manifest, append_row

Echo = Callable[[str], None]


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
    lenient: bool = Field(False, description="Unknown recipe keys and parameters warn.")
    in_memory: bool = Field(False, description="Merge into a model kept loaded (--in-memory).")


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
            in_memory=s.in_memory,
        )
        for p in sweep.todo
    ]

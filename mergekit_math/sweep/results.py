"""What a sweep folder holds: ``results.jsonl`` (one row per finished point, appended under a
lock), ``sweep.json`` (the manifest: recipe, swept keys, evaluation settings) and
``points/<id>/`` (each point's resolved recipe, log and, when kept, its weights)."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mergekit_math import __version__
from mergekit_math.errors import UserError

RESULTS = "results.jsonl"
MANIFEST = "sweep.json"
POINTS = "points"
LOCK = ".sweep.lock"
POINT_ID = re.compile(r"^[0-9a-f]{16}$")
"""A point's id (its folder name under points/): 16 hex digits of its recipe hash."""
# Names a sweep writes at its top level; none may be a symlink (a write would follow it).
OWN_NAMES = (RESULTS, MANIFEST, LOCK, POINTS, "best", "report.md", "sweep.png", "best_recipe.yaml")


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` as one JSON line: one ``write`` of the whole line in append mode, under
    an exclusive ``flock``, then ``fsync``; concurrent writers never interleave and a crash
    leaves at most an unterminated last line, which :func:`read_rows` ignores."""
    line = (json.dumps(row, default=str) + "\n").encode()
    fd = open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def open_no_follow(path: Path, flags: int) -> int:
    """``os.open`` that refuses a symlink at ``path`` (a UserError naming it) instead of
    writing through it to wherever it points."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise UserError(
                f"{path} is a symlink (to {os.readlink(path)}); a sweep folder holds its own "
                "files only: remove the link"
            ) from None
        raise UserError(f"{path}: cannot open ({exc.strerror})") from None


def refuse_symlinks(folder: Path) -> None:
    """A UserError naming the first of the sweep's own files, ``points/`` or a point folder
    of ``folder`` that is a symlink: the sweep writes and deletes there, never elsewhere."""
    paths = [folder / name for name in OWN_NAMES]
    if (folder / POINTS).is_dir() and not (folder / POINTS).is_symlink():
        paths += sorted((folder / POINTS).iterdir())
    for path in paths:
        if path.is_symlink():
            raise UserError(
                f"{path} is a symlink (to {os.readlink(path)}); a sweep folder holds its own "
                "files only: remove the link"
            )


def valid_row(row: object) -> bool:
    """A results row names its point by a point id: anything else (``../../x``) would make
    paths built from it leave the sweep folder."""
    return (
        isinstance(row, dict) and isinstance(row.get("id"), str) and bool(POINT_ID.match(row["id"]))
    )


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file, in the order they were appended; an unterminated last line
    (a writer killed mid-write), unreadable lines and rows whose ``id`` is not a point id
    (see :func:`valid_row`) are skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    rows = []
    for line in lines[:-1]:  # the part after the last newline is unfinished (or empty)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if valid_row(row):
            rows.append(row)
    return rows


def latest_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per point (the last recorded), in the order points were first recorded: a
    point recorded twice (by a sweep before per-point locks) is one row."""
    by_id: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_id[row["id"]] = row
    return list(by_id.values())


# ----------------------------------------------------------------------------- manifest


class Manifest(BaseModel):
    """``sweep.json``: what every row of the folder was made with. A rerun must match it."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["mmath-sweep"] = "mmath-sweep"
    version: int = 1
    recipe: str = Field(description="The swept recipe, absolute path.")
    method: str
    keys: list[str] = Field(description="The swept keys, in --set order.")
    eval: dict[str, Any] = Field(description="The evaluation options (as `mmath eval`).")
    identity: dict[str, Any] = Field(description="What decides the results; checked on rerun.")
    metric: str | None = Field(None, description="Primary metric TASK:METRIC,FILTER.")
    created: str = ""
    mmath_version: str = __version__


def eval_identity(options: Any) -> dict[str, Any]:
    """The evaluation settings that decide a row's metrics (not device or batch size), with
    the data file by content."""
    data = None
    if options.data is not None:
        path = Path(options.data)
        try:
            data = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            raise UserError(f"--data: cannot read {path}") from None
    return {
        "tasks": list(options.tasks),
        "data": data,
        "limit": options.limit,
        "num_fewshot": options.num_fewshot,
        "gen_kwargs": dict(options.gen_kwargs),
        "apply_chat_template": options.apply_chat_template,
        "seed": options.seed,
        "dtype": options.dtype,
        # absent for hf, so the folders of earlier sweeps still match
        **({"backend": options.backend} if options.backend != "hf" else {}),
    }


def read_manifest(folder: Path) -> Manifest | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: not a sweep manifest ({str(exc).splitlines()[0]})") from None


def write_manifest(folder: Path, manifest: Manifest) -> None:
    if not manifest.created:
        manifest.created = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)  # never write through a link planted there
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)


def manifest_differences(old: Manifest, new: Manifest) -> list[str]:
    """Why the rows of ``old`` cannot be resumed by ``new`` ('' list when they can)."""
    out = []
    if old.recipe != new.recipe:
        out.append(f"recipe {old.recipe} -> {new.recipe}")
    if old.keys != new.keys:
        out.append(f"swept keys {', '.join(old.keys)} -> {', '.join(new.keys)}")
    for k in sorted(set(old.identity) | set(new.identity)):
        a, b = old.identity.get(k), new.identity.get(k)
        if a != b:
            out.append(f"{k} {a!r} -> {b!r}")
    return out


@contextlib.contextmanager
def sweep_lock(folder: Path) -> Iterator[None]:
    """One driver per sweep folder: a second `mmath sweep` on it is refused while the first
    runs (workers append rows under their own lock on the results file)."""
    path = folder / LOCK
    fd = open_no_follow(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UserError(
                f"{folder}: another mmath sweep is running on this folder (pid {other}); "
                "wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def is_recorded(path: Path, recipe_hash: str) -> bool:
    """Whether the results file ``path`` has a row of the point ``recipe_hash``."""
    return any(row.get("recipe_hash") == recipe_hash for row in read_rows(path))

"""Evaluation results cached per (model fingerprint, task config, run options).

One entry per requested task: ``<cache>/eval/<key>/entry.json`` holds lm-eval's result
dictionaries restricted to that task (and its subtasks, for a group) plus the chain-of-thought
length statistics; ``samples_<task>.jsonl`` beside it the logged samples. Entries are written
into a temporary folder and renamed, so an interrupted run never leaves half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from mergekit_math.io.fingerprint import cache_dir

ENTRY_VERSION = 1
# Task names that are used as they are in file names; any other gets a hashed name, so a task
# called "../x" (from a task YAML, or a tampered entry.json) cannot leave its folder.
_PLAIN_TASK = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def samples_file(task: str) -> str:
    """The file name of a task's logged samples: ``samples_<task>.jsonl``, inside its folder."""
    if _PLAIN_TASK.fullmatch(task) and ".." not in task:
        return f"samples_{task}.jsonl"
    digest = hashlib.sha256(task.encode()).hexdigest()[:16]
    return f"samples_task-{digest}.jsonl"


def entry_key(fields: dict[str, Any]) -> str:
    text = json.dumps({"v": ENTRY_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def config_hash(configs: list[dict]) -> str:
    """A hash of task configs, including the bytes of any local data files they read."""
    h = hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode())
    for path in sorted(_local_files(configs)):
        h.update(path.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]


def _local_files(obj: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(obj, dict):
        for v in obj.values():
            found |= _local_files(v)
    elif isinstance(obj, list):
        for v in obj:
            found |= _local_files(v)
    elif isinstance(obj, str) and obj.startswith("/") and len(obj) < 4096:
        if os.path.isfile(obj):
            found.add(obj)
    return found


def _root() -> Path:
    return cache_dir() / "eval"


def load(key: str) -> dict | None:
    folder = _root() / key
    try:
        entry = json.loads((folder / "entry.json").read_text())
    except (OSError, ValueError):
        return None
    samples: dict[str, list] = {}
    tasks = entry.get("sample_tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        return None  # not an entry this code wrote: a miss, never a path
    for task in tasks:
        try:
            with open(folder / samples_file(task)) as f:
                samples[task] = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError):
            return None
    entry["samples"] = samples
    return entry


def store(key: str, entry: dict) -> None:
    root = _root()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    samples = entry.get("samples", {})
    data = {k: v for k, v in entry.items() if k != "samples"}
    data["sample_tasks"] = sorted(samples)
    for task, rows in samples.items():
        with open(tmp / samples_file(task), "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=to_json) + "\n")
    (tmp / "entry.json").write_text(json.dumps(data, indent=1, default=to_json))
    final = root / key
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def to_json(obj: Any) -> Any:
    """JSON for what lm-eval puts in its results: numpy scalars, tuples, dtypes."""
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)

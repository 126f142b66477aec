"""Which lm-eval tasks a `--tasks` list names: shipped offline tasks, task YAML files or folders,
and lm-eval's built-ins."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from mergekit_math.errors import UserError

# Offline tasks shipped with mmath: lm-eval's gsm8k prompts and filters over a local JSONL.
LOCAL_TASKS = ("gsm8k_local", "gsm8k_cot_local")
DEFAULT_PROBLEMS = 200
DEFAULT_SEED = 0


@dataclass
class TaskSelection:
    """What to hand lm-eval: task names and the folders its TaskManager must index."""

    names: list[str] = field(default_factory=list)
    include: list[Path] = field(default_factory=list)
    builtin: list[str] = field(default_factory=list)
    data: Path | None = None


def split_tasks(text: str | list[str]) -> list[str]:
    items = text if isinstance(text, list) else [text]
    names = [t.strip() for item in items for t in item.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks: name at least one task (e.g. gsm8k_cot_local)")
    return names


def local_task_config(name: str, data: Path) -> dict:
    """A shipped task's config with its data files pointing at ``data`` (absolute)."""
    text = resources.files("mergekit_math.eval").joinpath("tasks", f"{name}.yaml").read_text()
    config = yaml.safe_load(text)
    path = str(data.resolve())
    config["dataset_kwargs"]["data_files"] = {"test": path, "train": path}
    return config


def check_gsm8k_jsonl(path: Path) -> int:
    """Refuse a data file lm-eval would choke on, with the line that is wrong; returns the
    number of problems."""
    import json

    if not path.is_file():
        raise UserError(f"--data: {path} does not exist")
    count = 0
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UserError(f"--data: {path}:{lineno}: not JSON ({e})") from None
            if not isinstance(row, dict) or not {"question", "answer"} <= row.keys():
                raise UserError(
                    f'--data: {path}:{lineno}: a GSM8K row needs "question" and "answer" keys'
                )
            if not re.search(r"#### *-?[0-9.,]+\s*$", str(row["answer"])):
                raise UserError(f"--data: {path}:{lineno}: the answer does not end in '#### N'")
            count += 1
    if count == 0:
        raise UserError(f"--data: {path} holds no problems")
    return count


def default_data() -> Path:
    """The offline eval set used when a shipped task gets no --data: gsm-symbolic problems."""
    from mergekit_math.data.gsm_symbolic import generate, write_jsonl
    from mergekit_math.io.fingerprint import cache_dir

    path = cache_dir() / "data" / f"gsm_symbolic_n{DEFAULT_PROBLEMS}_seed{DEFAULT_SEED}.jsonl"
    if not path.is_file():
        write_jsonl(generate(DEFAULT_PROBLEMS, seed=DEFAULT_SEED), path)
    return path


def _yaml_task_names(path: Path) -> list[str]:
    """``task:`` (or ``group:``) names declared in one YAML file, tolerating lm-eval's
    ``!function`` tags."""

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        raise UserError(f"--tasks: {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        return []
    for key in ("group", "task"):
        value = data.get(key)
        if isinstance(value, str):
            return [value]
    return []


def select_tasks(specs: list[str], data: Path | None, workdir: Path) -> TaskSelection:
    """Resolve ``--tasks`` entries; shipped tasks are written into ``workdir`` with ``data``."""
    sel = TaskSelection()
    wanted_local = [s for s in specs if s in LOCAL_TASKS]
    if data is not None and not wanted_local:
        raise UserError(f"--data is read by the shipped tasks ({', '.join(LOCAL_TASKS)}) only")
    if wanted_local:
        if data is None:
            data = default_data()
        check_gsm8k_jsonl(data)
        sel.data = data.resolve()
        folder = workdir / "local_tasks"
        folder.mkdir(parents=True, exist_ok=True)
        for name in wanted_local:
            config = local_task_config(name, data)
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        sel.include.append(folder)
    for spec in specs:
        path = Path(spec).expanduser()
        if spec in LOCAL_TASKS:
            sel.names.append(spec)
        elif path.suffix in (".yaml", ".yml") or path.is_dir():
            if not path.exists():
                raise UserError(f"--tasks: {spec} does not exist")
            if path.is_dir():
                files = sorted([*path.rglob("*.yaml"), *path.rglob("*.yml")])
                names = [n for f in files for n in _yaml_task_names(f)]
                folder = path
            else:
                names = _yaml_task_names(path)
                folder = path.parent
            if not names:
                raise UserError(f"--tasks: {spec} declares no task (no 'task:' or 'group:' key)")
            sel.include.append(folder.resolve())
            sel.names.extend(names)
        else:
            sel.names.append(spec)
            sel.builtin.append(spec)
    # Deduplicate, keeping the user's order.
    sel.names = list(dict.fromkeys(sel.names))
    sel.include = list(dict.fromkeys(sel.include))
    return sel

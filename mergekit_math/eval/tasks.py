"""Which lm-eval tasks a `--tasks` list names: shipped offline tasks, task YAML files or folders,
and lm-eval's built-ins."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from mergekit_math.errors import UserError

# Offline tasks shipped with mmath, each with the data format its --data file must have:
# lm-eval's gsm8k prompts and filters over a local JSONL, and boxed-answer MATH / AIME tasks
# scored by math-verify (mergekit_math.eval.math_score).
LOCAL_FORMATS = {
    "gsm8k_local": "gsm8k",
    "gsm8k_cot_local": "gsm8k",
    "math_local": "math",
    "aime_local": "aime",
}
LOCAL_TASKS = tuple(LOCAL_FORMATS)
# The module the boxed-answer tasks' `!function mmath_math.…` hooks are loaded from.
HOOKS_MODULE = "mmath_math.py"
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


class FunctionRef(str):
    """An lm-eval ``!function module.name`` tag, kept as text through load and dump."""


class _TaskLoader(yaml.SafeLoader):
    pass


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskLoader.add_constructor(
    "!function", lambda loader, node: FunctionRef(loader.construct_scalar(node))
)
_TaskDumper.add_representer(
    FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref))
)


def _shipped(name: str) -> str:
    return resources.files("mergekit_math.eval").joinpath("tasks", name).read_text()


def local_task_config(name: str, data: Path) -> dict:
    """A shipped task's config with its data files pointing at ``data`` (absolute);
    ``!function`` hooks are kept as FunctionRef."""
    config = yaml.load(_shipped(f"{name}.yaml"), Loader=_TaskLoader)  # noqa: S506 - SafeLoader
    path = str(data.resolve())
    config["dataset_kwargs"]["data_files"] = {"test": path, "train": path}
    return config


def write_local_task(name: str, data: Path, folder: Path) -> None:
    """Write shipped task ``name`` reading ``data`` into ``folder``, with the hooks module its
    ``!function`` tags load by path."""
    config = local_task_config(name, data)
    text = yaml.dump(config, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True)
    (folder / f"{name}.yaml").write_text(text)
    if "!function" in text:
        (folder / HOOKS_MODULE).write_text(_shipped(HOOKS_MODULE))


def _json_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a JSONL file, refusing what is not a JSON object per line."""
    import json

    if not path.is_file():
        raise UserError(f"--data: {path} does not exist")
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UserError(f"--data: {path}:{lineno}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise UserError(f"--data: {path}:{lineno}: expected a JSON object per line")
            yield lineno, row


def check_gsm8k_jsonl(path: Path) -> int:
    """Refuse a data file lm-eval would choke on, with the line that is wrong; returns the
    number of problems."""
    count = 0
    for lineno, row in _json_rows(path):
        if not {"question", "answer"} <= row.keys():
            raise UserError(
                f'--data: {path}:{lineno}: a GSM8K row needs "question" and "answer" keys'
            )
        if not re.search(r"#### *-?[0-9.,]+\s*$", str(row["answer"])):
            raise UserError(f"--data: {path}:{lineno}: the answer does not end in '#### N'")
        count += 1
    if count == 0:
        raise UserError(f"--data: {path} holds no problems")
    return count


def _check_math_row(row: dict, aime: bool) -> str | None:
    """What is wrong with one MATH (or AIME) row, None when nothing."""
    from mergekit_math.eval.boxed import last_boxed

    kind = "an AIME" if aime else "a MATH"
    problem = row.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        return f'{kind} row needs a "problem" string'
    answer = row.get("answer")
    if aime:
        text = str(answer).strip() if isinstance(answer, (int, str)) else ""
        if isinstance(answer, bool) or not text.isdigit() or not 0 <= int(text) <= 999:
            return f'the "answer" must be an integer 0-999, got {answer!r}'
        return None
    if answer is not None and not isinstance(answer, (str, int, float)):
        return f'the "answer" must be a string or a number, got {type(answer).__name__}'
    if answer is None or not str(answer).strip():
        if not last_boxed(str(row.get("solution") or "")):
            return 'no reference answer: give "answer", or a "solution" with \\boxed{...}'
    return None


def check_math_jsonl(path: Path, aime: bool = False) -> int:
    """Refuse a MATH / MATH-500 (or, with ``aime``, AIME) JSONL that lm-eval would choke on
    or that has no reference answer, naming the line; keys are read in any case
    (``Problem``). Returns the number of problems."""
    count = 0
    types: dict[str, tuple[int, str]] = {}
    for lineno, raw in _json_rows(path):
        row = {str(k).lower(): v for k, v in raw.items()}
        problem = _check_math_row(row, aime)
        if problem:
            raise UserError(f"--data: {path}:{lineno}: {problem}")
        # datasets builds one Arrow column per key: a key must keep its JSON type.
        for key, value in row.items():
            if value is None:
                continue
            kind = type(value).__name__
            first = types.setdefault(key, (lineno, kind))
            if first[1] != kind:
                raise UserError(
                    f'--data: {path}:{lineno}: "{key}" is a {kind} here but a {first[1]} on '
                    f"line {first[0]}; use one type per key"
                )
        count += 1
    if count == 0:
        raise UserError(f"--data: {path} holds no problems")
    return count


def check_data(path: Path, fmt: str) -> int:
    """Check ``path`` as a ``fmt`` ("gsm8k", "math" or "aime") file; returns the count."""
    if fmt == "gsm8k":
        return check_gsm8k_jsonl(path)
    return check_math_jsonl(path, aime=fmt == "aime")


def count_data(specs: list[str], data: Path) -> int:
    """The number of problems in ``data``, checked in the format of the shipped tasks that
    ``specs`` name (select_tasks has refused --data without one, or with several formats)."""
    fmt = next((LOCAL_FORMATS[s] for s in specs if s in LOCAL_FORMATS), "gsm8k")
    return check_data(data, fmt)


def default_data(fmt: str = "gsm8k") -> Path:
    """The offline eval set used when a shipped task gets no --data: 200 gsm-symbolic problems
    for the GSM8K tasks, 200 math-symbolic problems (levels 1-5) for math_local, and 200
    math-symbolic problems with integer answers 0-999 for aime_local (all seed 0)."""
    from mergekit_math.io.fingerprint import cache_dir

    folder = cache_dir() / "data"
    if fmt == "gsm8k":
        from mergekit_math.data.gsm_symbolic import generate, write_jsonl

        path = folder / f"gsm_symbolic_n{DEFAULT_PROBLEMS}_seed{DEFAULT_SEED}.jsonl"
        if not path.is_file():
            write_jsonl(generate(DEFAULT_PROBLEMS, seed=DEFAULT_SEED), path)
        return path
    from mergekit_math.data.math_symbolic import generate as generate_math
    from mergekit_math.data.math_symbolic import write_jsonl as write_math

    integer = fmt == "aime"
    stem = "aime_symbolic" if integer else "math_symbolic"
    path = folder / f"{stem}_n{DEFAULT_PROBLEMS}_seed{DEFAULT_SEED}.jsonl"
    if not path.is_file():
        problems = generate_math(DEFAULT_PROBLEMS, seed=DEFAULT_SEED, integer_answers=integer)
        write_math(problems, path)
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


def _local_data(names: list[str], data: Path | None) -> dict[str, Path]:
    """The checked data file of each shipped task: ``data`` for all (one format only), or
    each format's default."""
    formats = {LOCAL_FORMATS[n] for n in names}
    if data is not None:
        if len(formats) > 1:
            described = ", ".join(f"{n} ({LOCAL_FORMATS[n]})" for n in names)
            raise UserError(
                f"--data: one file cannot serve tasks of different formats: {described}; "
                "evaluate them in separate runs (or leave out --data for the generated sets)"
            )
        check_data(data, formats.pop())
        return {n: data.resolve() for n in names}
    paths = {f: default_data(f) for f in sorted(formats)}
    for fmt, path in paths.items():
        check_data(path, fmt)
    return {n: paths[LOCAL_FORMATS[n]].resolve() for n in names}


def select_tasks(specs: list[str], data: Path | None, workdir: Path) -> TaskSelection:
    """Resolve ``--tasks`` entries; shipped tasks are written into ``workdir`` with ``data``."""
    sel = TaskSelection()
    wanted_local = [s for s in specs if s in LOCAL_TASKS]
    if data is not None and not wanted_local:
        raise UserError(f"--data is read by the shipped tasks ({', '.join(LOCAL_TASKS)}) only")
    if wanted_local:
        folder = workdir / "local_tasks"
        folder.mkdir(parents=True, exist_ok=True)
        data_files = _local_data(list(dict.fromkeys(wanted_local)), data)
        for name, path in data_files.items():
            write_local_task(name, path, folder)
        if len(set(data_files.values())) == 1:
            sel.data = next(iter(data_files.values()))
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

"""What `mmath merge` does with its output: evaluate it, check the bar, publish it.

The settings come from the merge's flags and the recipe's ``evaluate:``/``push:`` blocks, and
:func:`plan_after_merge` checks everything they need before the first tensor is read: the data
file exists and every line is a GSM8K row, task files exist and declare a task, the ``require``
bars parse, the repo id is a valid Hub id. (Built-in lm-eval task names are not looked up
here: lm-eval's task index takes about 20 s to build; a wrong name fails at evaluation.)

Only pydantic-level modules are imported at the top; torch and lm-eval are not needed.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_math.errors import UserError

if TYPE_CHECKING:
    from mergekit_math.eval.run import EvalOptions
    from mergekit_math.hub.gate import Requirement
    from mergekit_math.hub.publish import PushSettings
    from mergekit_math.recipe import Recipe


@dataclass
class AfterMerge:
    """The evaluation (and the push, when ``settings`` is set) that follows a merge."""

    options: EvalOptions
    requirements: list[Requirement]
    settings: PushSettings | None
    problems: int | None = None  # problems in the data file of the shipped tasks, if given

    def describe(self) -> list[str]:
        """Lines for `mmath merge --dry-run`."""
        o = self.options
        data = "the default gsm-symbolic set" if o.data is None else str(o.data)
        if self.problems is not None:
            data += f" ({self.problems} problems)"
        limit = "all" if o.limit is None else f"{o.limit:g}"
        lines = [f"evaluate:      tasks {', '.join(o.tasks)}, data {data}, limit {limit}"]
        bars = " and ".join(str(r) for r in self.requirements)
        if self.settings is not None:
            lines.append(f"push:          {self.settings.repo_id} if {bars}")
        elif bars:
            lines.append(f"require:       {bars} (nothing is pushed)")
        return lines


def check_repo_id(repo_id: str, where: str) -> None:
    """A Hub model id NAMESPACE/NAME as the Hub accepts it."""
    from mergekit_math.io.resolve import HUB_ID

    problem = None
    if not HUB_ID.match(repo_id):
        problem = "expected NAMESPACE/NAME, e.g. my-name/qwen-math-ties"
    else:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            problem = str(exc).splitlines()[0]
    if problem:
        raise UserError(f"{where}: repo id {repo_id!r}: {problem}")


def check_eval_inputs(options: EvalOptions) -> int | None:
    """What the evaluation will read, checked without running it: the data file of the
    shipped tasks (every line), task YAML files and folders. Returns the number of problems in
    the data file, when one is given."""
    from mergekit_math.eval.tasks import LOCAL_TASKS, check_gsm8k_jsonl, select_tasks

    specs = list(options.tasks)
    if options.data is None:
        # The default set is generated at evaluation; nothing to check.
        specs = [s for s in specs if s not in LOCAL_TASKS]
    if specs:
        with tempfile.TemporaryDirectory(prefix="mmath-check-") as work:
            select_tasks(specs, options.data, Path(work))
    return check_gsm8k_jsonl(options.data) if options.data is not None else None


def _renamed(exc: UserError, flag: str, key: str) -> UserError:
    """A message about ``--data``/``--tasks`` that came from the recipe names its key."""
    text = str(exc)
    return UserError(key + text[len(flag) :] if text.startswith(flag) else text)


def _push_settings(parsed: Recipe, source: str, push: str | None, no_push: bool):
    from mergekit_math.hub.publish import PushSettings

    if push is not None:
        check_repo_id(push, "--push")
        return PushSettings(push)
    if parsed.push is not None and not no_push:
        check_repo_id(parsed.push.repo_id, f"{source}: push.repo_id")
        return PushSettings(**parsed.push.model_dump())
    return None


def plan_after_merge(
    parsed: Recipe,
    recipe_dir: Path,
    *,
    source: str,
    evaluate: bool | None,
    push: str | None,
    no_push: bool,
    require: list[str] | None,
    tasks: str | None,
    data: Path | None,
    limit: str | None,
    device: str,
    verbose: bool = False,
) -> AfterMerge | None:
    """The evaluate/push settings of a merge (flags over the recipe's blocks), validated
    before any tensor is read; None when the merge is not evaluated. ``source`` names the
    recipe in messages."""
    from mergekit_math.eval.options import eval_options
    from mergekit_math.hub.publish import gate_options, parse_requirements

    b = parsed.evaluate
    if b is not None and b.data is not None:
        b.data = str((recipe_dir / b.data).resolve())
    settings = _push_settings(parsed, source, push, no_push)
    do_eval = evaluate if evaluate is not None else b is not None or settings is not None
    if settings is not None and evaluate is False:
        raise UserError(
            "--push needs the evaluation (drop --no-eval); use `mmath push "
            "--no-eval --force` to publish unevaluated"
        )
    if not do_eval:
        return None
    bars = require or (b.require if b else None) or []
    try:
        requirements = parse_requirements(bars)
    except UserError as exc:
        if require:
            raise
        raise UserError(f"{source}: evaluate.require: {exc}") from None
    if settings is not None and not requirements:
        raise UserError(
            "--push needs a bar: --require 'TASK:METRIC,FILTER>=VALUE' or evaluate.require "
            "in the recipe"
        )
    task_list = tasks or (b.tasks if b else None)
    if isinstance(task_list, list):
        task_list = ",".join(task_list)
    if not task_list and not requirements:
        raise UserError("--eval: name the tasks with --tasks or an evaluate: block")
    data_path = data if data is not None else (Path(b.data) if b and b.data else None)
    options = eval_options(
        task_list,
        data_path,
        device,
        (b.dtype if b and b.dtype else "auto"),
        str(b.batch_size) if b and b.batch_size is not None else "8",
        limit if limit is not None else (str(b.limit) if b and b.limit is not None else None),
        b.num_fewshot if b else None,
        bool(b.apply_chat_template) if b else False,
        ",".join(f"{k}={v}" for k, v in (b.gen_kwargs or {}).items()) if b else None,
        b.seed if b else None,
        False,
        False,
        verbose=verbose,
    )
    options = gate_options(requirements, options)
    try:
        problems = check_eval_inputs(options)
    except UserError as exc:
        if data is None and str(exc).startswith("--data"):
            raise _renamed(exc, "--data", f"{source}: evaluate.data") from None
        if tasks is None and str(exc).startswith("--tasks"):
            raise _renamed(exc, "--tasks", f"{source}: evaluate.tasks") from None
        raise
    return AfterMerge(options, requirements, settings, problems)

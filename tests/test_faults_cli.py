"""Fault suite for the command line: one error handler (UserError, OSError, Ctrl-C), options that
must reach what they configure, evaluate:/push: settings checked before any read, help texts
that name only options that exist, usage lines, the method listing, patch info, --token."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from conftest import make_model, mmath, write_recipe
from typer.testing import CliRunner

from mergekit_math.cli import app
from mergekit_math.cli.handler import HandledGroup, on_interrupt
from mergekit_math.errors import UserError


def one_error(res, *needles: str, code: int = 2) -> str:
    """The run failed with ``code`` and printed exactly one ``error:`` line (no traceback)
    holding every needle; returns that line."""
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_models")
    base = make_model(root / "base", seed=0, layers=2)
    return {"base": base, "a": make_model(root / "a", base=base, seed=1, layers=2), "root": root}


def recipe_for(small, path: Path, extra: str = "") -> Path:
    return write_recipe(
        path,
        f"""
merge_method: task_arithmetic
base_model: {small["base"]}
models:
  - model: {small["a"]}
    parameters: {{weight: 1}}
{extra}""",
    )


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli_data") / "problems.jsonl"
    assert mmath("data", "gsm-symbolic", "-n", "12", "-o", path).exit_code == 0
    return path


# =============================================================================== one handler


def test_recipe_that_is_not_utf8_is_one_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"merge_method: linear\nmodels:\n  - model: caf\xe9\n")
    line = one_error(mmath("merge", recipe, tmp_path / "out"), str(recipe), "not UTF-8")
    assert "0xe9" in line and "line 3" in line
    assert not (tmp_path / "out").exists()


def test_recipe_that_is_a_folder_is_one_error(tmp_path):
    one_error(mmath("merge", tmp_path, tmp_path / "out"), str(tmp_path), "is a folder")


def test_output_parent_that_is_a_file(tmp_path, small):
    recipe = recipe_for(small, tmp_path / "r.yaml")
    parent = tmp_path / "afile"
    parent.write_text("x")
    one_error(mmath("merge", recipe, parent / "out"), str(parent))
    assert parent.read_text() == "x"
    # the same for a command that writes one file
    one_error(mmath("data", "gsm-symbolic", "-n", "3", "-o", parent / "p.jsonl"), str(parent))


def test_output_parent_not_writable(tmp_path, small, monkeypatch):
    """Root ignores chmod, so the refusal is simulated where the folder would be made."""
    recipe = recipe_for(small, tmp_path / "r.yaml")
    locked = tmp_path / "locked"
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(locked)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    line = one_error(mmath("merge", recipe, locked / "out"), str(locked))
    assert "permission denied" in line.lower()
    assert not locked.exists()


def test_disk_full_while_writing_names_the_file(tmp_path, monkeypatch):
    import mergekit_math.data.gsm_symbolic as gsm

    class Full:
        def __init__(self, fd, *args, **kwargs):
            os.close(fd)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gsm.os, "fdopen", Full)
    out = tmp_path / "p.jsonl"
    one_error(mmath("data", "gsm-symbolic", "-n", "3", "-o", out), str(out), "No space left")
    assert list(tmp_path.iterdir()) == []


def _toy_app(exc: BaseException, note: str | None = None) -> typer.Typer:
    toy = typer.Typer(cls=HandledGroup)

    @toy.command()
    def boom() -> None:
        if note:
            on_interrupt(note)
        raise exc

    @toy.command()
    def other() -> None:
        pass

    return toy


@pytest.mark.parametrize(
    ("exc", "code", "needles"),
    [
        (UserError("r.yaml: models[0].model: bad"), 2, ["error: r.yaml: models[0].model: bad"]),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y"),
            2,
            ["/x/y: No such"],
        ),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/x"), 2, ["error: /x: Is a directory"]),
        (OSError(errno.ENOSPC, "No space left on device"), 2, ["error: No space left on device"]),
        (KeyboardInterrupt(), 130, ["error: interrupted; kept X"]),
    ],
)
def test_the_handler_turns_faults_into_one_line(exc, code, needles):
    res = CliRunner().invoke(_toy_app(exc, note="kept X"), ["boom"])
    one_error(res, *needles, code=code)


def test_bugs_keep_their_traceback():
    with pytest.raises(RuntimeError, match="a bug"):
        CliRunner().invoke(_toy_app(RuntimeError("a bug")), ["boom"], catch_exceptions=False)


def test_every_command_group_is_handled():
    """Also the sub-apps, which tests (and entry points) may invoke on their own."""
    root = typer.main.get_command(app)
    groups = [root, *(c for c in root.commands.values() if hasattr(c, "commands"))]
    assert len(groups) >= 6
    for group in groups:
        assert isinstance(group, HandledGroup), group.name


# =============================================================================== options kept


@pytest.fixture
def captured(monkeypatch):
    """mergekit_math.eval.run.evaluate replaced: records the options it was called with."""
    import mergekit_math.eval.run as run

    calls: list = []

    def evaluate(model_dir, options, verbose=False):
        calls.append(options)
        return object()

    monkeypatch.setattr(run, "evaluate", evaluate)
    monkeypatch.setattr(run, "format_table", lambda report: "TABLE")
    return calls


@pytest.mark.parametrize("memory", [None, "2G"])
@pytest.mark.parametrize(("flag", "block", "expect"), [("7", None, 7), (None, 5, 5), ("7", 5, 7)])
def test_limit_reaches_the_evaluation(
    tmp_path, small, problems, captured, memory, flag, block, expect
):
    extra = f"evaluate:\n  tasks: [gsm8k_local]\n  data: {problems}\n"
    if block is not None:
        extra += f"  limit: {block}\n"
    recipe = recipe_for(small, tmp_path / "r.yaml", extra)
    args = ["merge", recipe, tmp_path / "out", "-q"]
    args += ["--limit", flag] if flag else []
    args += ["--max-memory", memory] if memory else []
    res = mmath(*args)
    assert res.exit_code == 0, res.output
    assert len(captured) == 1 and captured[0].limit == expect
    assert captured[0].data == problems.resolve()
    dry = mmath(*args[:2], tmp_path / "dry", "--dry-run", *args[4:])
    assert dry.exit_code == 0, dry.output
    assert f", limit {expect}\n" in dry.output


def test_eval_flag_limit_without_block(tmp_path, small, problems, captured):
    recipe = recipe_for(small, tmp_path / "r.yaml")
    res = mmath(
        "merge", recipe, tmp_path / "out", "-q", "--eval", "--tasks", "gsm8k_local",
        "--data", problems, "--limit", "3", "--max-memory", "1G",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert captured[0].limit == 3 and captured[0].tasks == ["gsm8k_local"]


# =============================================================================== early errors


@pytest.fixture
def no_plan(monkeypatch):
    """Fail the test if the merge gets as far as planning (reading headers)."""
    import mergekit_math.merge as engine

    def build_plan(*args, **kwargs):
        raise AssertionError("the evaluate/push settings were not checked before planning")

    monkeypatch.setattr(engine, "build_plan", build_plan)


@pytest.mark.parametrize(
    ("block", "needles"),
    [
        (
            "evaluate:\n  tasks: [gsm8k_local]\n  data: missing.jsonl\n",
            ["r.yaml: evaluate.data", "missing.jsonl does not exist"],
        ),
        (
            "evaluate:\n  tasks: [gsm8k_local]\n  data: bad.jsonl\n",
            ["r.yaml: evaluate.data", "bad.jsonl:2: not JSON"],
        ),
        (
            "evaluate:\n  tasks: [gsm8k_local]\n  data: nofields.jsonl\n",
            ["evaluate.data", "nofields.jsonl:1", '"question" and "answer"'],
        ),
        (
            "evaluate:\n  tasks: [nowhere/task.yaml]\n",
            ["r.yaml: evaluate.tasks", "nowhere/task.yaml does not exist"],
        ),
        (
            "evaluate:\n  tasks: [gsm8k_local]\n  require: ['gsm8k_local:exact_match=0.4']\n",
            ["r.yaml: evaluate.require", "gsm8k_local:exact_match=0.4"],
        ),
        (
            "evaluate:\n  tasks: [gsm8k_local]\n  require: ['gsm8k_local:exact_match>=0.1']\n"
            "push:\n  repo_id: me/bad--name\n",
            ["r.yaml: push.repo_id", "me/bad--name"],
        ),
        (
            "evaluate:\n  tasks: [gsm8k_local]\n  require: ['gsm8k_local:exact_match>=0.1']\n"
            "push:\n  repo_id: not-a-repo-id\n",
            ["push.repo_id", "NAMESPACE/NAME"],
        ),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True])
def test_evaluate_and_push_blocks_checked_before_any_read(
    tmp_path, small, no_plan, block, needles, dry_run
):
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    (tmp_path / "nofields.jsonl").write_text('{"q": 1}\n')
    recipe = recipe_for(small, tmp_path / "r.yaml", block)
    res = mmath("merge", recipe, tmp_path / "out", *(["--dry-run"] if dry_run else []))
    one_error(res, *needles)
    assert not (tmp_path / "out").exists()


def test_flags_checked_before_any_read(tmp_path, small, no_plan):
    recipe = recipe_for(small, tmp_path / "r.yaml")
    one_error(
        mmath("merge", recipe, tmp_path / "o", "--eval", "--tasks", "gsm8k_local", "--data",
              tmp_path / "none.jsonl"),
        "--data", "none.jsonl does not exist",
    )  # fmt: skip
    one_error(
        mmath("merge", recipe, tmp_path / "o", "--push", "a/b/c", "--tasks", "gsm8k_local",
              "--require", "gsm8k_local:exact_match>=0.1"),
        "--push", "'a/b/c'",
    )  # fmt: skip


def test_dry_run_prints_what_follows_the_merge(tmp_path, small, problems):
    block = (
        f"evaluate:\n  tasks: [gsm8k_local]\n  data: {problems}\n  limit: 5\n"
        "  require: ['gsm8k_local:exact_match,strict-match>=0.1']\npush:\n  repo_id: me/x\n"
    )
    recipe = recipe_for(small, tmp_path / "r.yaml", block)
    res = mmath("merge", recipe, tmp_path / "out", "--dry-run")
    assert res.exit_code == 0, res.output
    assert (
        f"evaluate:      tasks gsm8k_local, data {problems.resolve()} (12 problems), limit 5\n"
        in res.output
    )
    assert "push:          me/x if gsm8k_local:exact_match,strict-match>=0.1\n" in res.output
    assert not (tmp_path / "out").exists()


# =============================================================================== help, usage


def _commands() -> dict[tuple[str, ...], Any]:
    def walk(cmd: Any, path: tuple[str, ...]):
        yield path, cmd
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, (*path, name))

    return dict(walk(typer.main.get_command(app), ()))


def _options(cmd: Any) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


def _owner(commands, words: list[str]) -> tuple[str, ...] | None:
    """The command that ``mmath WORDS...`` runs (``mmath sweep RECIPE`` is ``sweep run``)."""
    for k in range(len(words), 0, -1):
        if tuple(words[:k]) in commands:
            owner = tuple(words[:k])
            cmd = commands[owner]
            if hasattr(cmd, "commands") and "run" in cmd.commands:
                owner = (*owner, "run")
            return owner
    return None


def test_every_option_a_help_text_names_exists():
    """Each --option in a help text exists on that command, or on the command the same clause
    names (`mmath push --no-eval --force`); in a group's command list, on that command."""
    commands = _commands()
    runner = CliRunner()
    problems = []
    for path in commands:
        res = runner.invoke(app, [*path, "--help"], terminal_width=10_000)
        assert res.exit_code == 0, (path, res.output)
        section = None
        for line in res.output.splitlines():
            if re.match(r"^[A-Z][a-z]+:$", line):
                section = line
            default = path
            if section == "Commands:" and line.startswith("  ") and line.split():
                default = (*path, line.split()[0])
            for clause in re.split(r"[`;]|\. ", line):
                ref = re.search(r"mmath((?: [a-z][a-z0-9-]*)+)", clause)
                owner = default
                if ref:
                    owner = _owner(commands, ref.group(1).split()) or default
                    clause = clause[ref.end() :]
                for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", clause):
                    if opt != "--help" and opt not in _options(commands[owner]):
                        problems.append(f"mmath {' '.join(path)} --help: {opt} ({line.strip()})")
    assert not problems, "\n".join(problems)


def test_usage_lines_name_arguments_in_capitals():
    runner = CliRunner()
    for path, cmd in _commands().items():
        res = runner.invoke(app, [*path, "--help"])
        usage = res.output.splitlines()[0]
        assert usage.startswith("Usage: mmath"), usage
        assert "{" not in usage and "}" not in usage, usage
        for param in cmd.params:
            if param.param_type_name == "argument":
                name = param.metavar or param.name
                assert name.isupper() and name in usage, (usage, name)


def test_list_templates():
    from mergekit_math.data.gsm_symbolic import TEMPLATES

    res = mmath("data", "gsm-symbolic", "--list-templates")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert len(lines) == len(TEMPLATES)
    for line, t in zip(lines, TEMPLATES.values()):
        assert line.split()[0] == t.name and line.endswith(t.description)


# =============================================================================== methods


def test_methods_prints_every_parameter_with_default_or_required_mark():
    from mergekit_math.methods import all_methods

    res = mmath("methods")
    assert res.exit_code == 0
    blocks = res.output.split("\n\n", 1)[1]
    for m in all_methods():
        block = blocks.split(f"\n{m.name} ", 1)[-1] if m.name != all_methods()[0].name else blocks
        per_model = re.search(r"per model: +(.*)", block).group(1)
        shared = re.search(r"recipe-level: +(.*)", block).group(1)
        for model, text in ((m.model_params, per_model), (m.shared_params, shared)):
            for name, info in model.model_fields.items():
                key = info.alias or name
                if info.is_required():
                    assert f"{key}*" in text, (m.name, key, text)
                else:
                    assert re.search(rf"\b{key}=\S", text), (m.name, key, text)
    assert "weight*" in res.output and "density=1 in (0, 1]" in res.output
    assert "t* in [0, 1]" in res.output and "normalize=true" in res.output


def test_methods_does_not_import_torch():
    code = (
        "import sys\n"
        "from mergekit_math.cli import main\n"
        "sys.argv = ['mmath', 'methods']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout and "task_arithmetic" in out.stdout


def test_readme_method_table_is_the_registry_table():
    from mergekit_math.methods.listing import markdown_table

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = markdown_table()
    assert table in readme
    start = readme.index("| method | paper |")
    end = readme.index("\n\n", start)
    assert readme[start : end + 1] == table


# =============================================================================== patch info


@pytest.fixture(scope="module")
def deep_patch(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deep")
    old = make_model(root / "old", seed=0, layers=11)
    ft = make_model(root / "ft", base=old, seed=1, layers=11)
    res = mmath("patch", "extract", "--base", old, "--finetuned", ft, "-o", root / "p", "-q",
                "--encoding", "lowrank", "--rank", "4")  # fmt: skip
    assert res.exit_code == 0, res.output
    return {"old": old, "ft": ft, "patch": root / "p"}


def test_patch_info_against_prints_the_summary_only(deep_patch):
    res = mmath("patch", "info", deep_patch["patch"], "--against", deep_patch["old"],
                deep_patch["ft"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "layers.0." not in res.output
    assert re.search(r"^overall relative error vs FT − OLD: \d\.\d{3}e[-+]\d\d$", res.output, re.M)
    assert re.search(r"^relative error: \d\.\d{3}e[-+]\d\d \(recorded", res.output, re.M)


@pytest.mark.parametrize("against", [False, True])
def test_patch_info_tensors_in_layer_order(deep_patch, against):
    extra = ["--against", deep_patch["old"], deep_patch["ft"]] if against else []
    res = mmath("patch", "info", deep_patch["patch"], "--tensors", *extra)
    assert res.exit_code == 0, res.output
    names = re.findall(r"^(model\.\S+|lm_head\S*)\s", res.output, re.M)
    layers = [int(m[1]) for n in names if (m := re.search(r"layers\.(\d+)\.", n))]
    assert layers == sorted(layers) and 10 in layers and 2 in layers
    assert names[0].startswith("model.embed_tokens") and "model.layers.10." not in names[0]
    assert all(re.search(r" \d\.\d{3}e[-+]\d\d$", line) for line in res.output.splitlines()
               if line.startswith("model.layers."))  # fmt: skip


def test_inspect_tensors_in_layer_order(deep_patch):
    res = mmath("inspect", deep_patch["old"], "--tensors")
    assert res.exit_code == 0
    names = re.findall(r"^(model\.layers\.(\d+)\.\S+)", res.output, re.M)
    assert [int(i) for _, i in names] == sorted(int(i) for _, i in names)


# =============================================================================== --token


def test_token_on_the_command_line_warns_and_is_never_printed(tmp_path, small):
    secret = "hf_notarealtoken123"
    recipe = recipe_for(small, tmp_path / "r.yaml")
    runs = [
        mmath("push", tmp_path / "nowhere", "me/x", "--token", secret, "--no-eval", "--force"),
        mmath("merge", recipe, tmp_path / "o", "--token", secret, "--dry-run"),
        mmath("sweep", recipe, "--set", "models[0].parameters.weight=0.5,1", "-o",
              tmp_path / "s", "--token", secret, "--keep", "bogus"),
    ]  # fmt: skip
    for res in runs:
        assert "warning: --token on the command line is visible" in res.output, res.output
        assert "HF_TOKEN" in res.output and secret not in res.output
    for path in (("push",), ("merge",), ("sweep", "run")):
        help_text = CliRunner().invoke(app, [*path, "--help"], terminal_width=10_000).output
        assert "HF_TOKEN" in help_text and "process list" in help_text, path


def test_no_warning_without_token(tmp_path, small):
    recipe = recipe_for(small, tmp_path / "r.yaml")
    res = mmath("merge", recipe, tmp_path / "o", "--dry-run")
    assert res.exit_code == 0 and "--token" not in res.output

"""CLI behaviour: instant help without torch, inspect, methods, the console script."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import make_model
from typer.testing import CliRunner

from mergekit_math.cli import app

runner = CliRunner()


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from mergekit_math.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'huggingface_hub',"
        " 'lm_eval', 'ray') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout
    assert "merge" in out.stdout and "inspect" in out.stdout


# What a plain recipe (no tokenizer:, no LoRA '+' reference, no evaluate:) must not import:
# each costs start-up (transformers alone about 1 s) and none is needed to merge tensors.
_NOT_ON_MERGE_PATH = (
    "transformers",
    "tokenizers",
    "peft",
    "datasets",
    "lm_eval",
    "huggingface_hub",
    "scipy",
    "ray",
    "numba",  # the fused kernels: only for merges large enough to pay for loading them
)


def _merge_in_subprocess(*args: object) -> tuple[set[str], bool]:
    """Run `mmath merge ARGS` through the console entry in a fresh interpreter; return which
    of torch, safetensors, numpy and _NOT_ON_MERGE_PATH it imported, and whether the cyclic
    garbage collector is still enabled after it."""
    code = (
        "import gc, sys\n"
        "from mergekit_math.cli import main\n"
        "sys.argv = ['mmath', 'merge', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        f"names = ('torch', 'safetensors', 'numpy') + {_NOT_ON_MERGE_PATH!r}\n"
        "print('LOADED', ','.join(m for m in names if m in sys.modules), gc.isenabled())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("LOADED"))
    _, loaded, enabled = line.split(" ")
    return set(filter(None, loaded.split(","))), enabled == "True"


def test_plain_merge_imports_only_what_it_uses(zoo, tmp_path):
    recipe = tmp_path / "ta.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {zoo['a']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {zoo['b']}\n    parameters: {{weight: 0.5}}\n"
    )
    # The dry run plans from the shard headers alone: no torch, no numpy.
    loaded, gc_on = _merge_in_subprocess(recipe, tmp_path / "dry", "--dry-run")
    assert loaded == set() and gc_on
    assert not (tmp_path / "dry").exists()
    # The merge imports torch (and whatever torch imports), nothing of the Hub or evaluation,
    # and leaves the collector enabled (it is paused only while torch is imported).
    loaded, gc_on = _merge_in_subprocess(recipe, tmp_path / "out", "-q")
    assert "torch" in loaded and gc_on
    assert loaded & set(_NOT_ON_MERGE_PATH) == set()
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_merge_help_explains_options():
    res = runner.invoke(app, ["merge", "--help"])
    assert res.exit_code == 0
    for flag in (
        "--device",
        "--threads",
        "--seed",
        "--out-shard-size",
        "--allow-pickle",
        "--force",
        "--dry-run",
    ):
        assert flag in res.output


def test_a_command_runs_on_a_group_of_its_own_with_the_same_behaviour():
    """`mmath NAME ...` runs on a root group holding only NAME (``cli.app_for``: typer builds
    every held command's parameters on each call): the same help and the same errors as the
    full group, for every command and subcommand."""
    import click
    from typer.main import get_command

    from mergekit_math.cli import app_for

    full = get_command(app)
    assert len(full.commands) == 11
    for name, command in full.commands.items():
        one = app_for([name, "--help"])
        assert set(get_command(one).commands) == {name}
        calls = [[name, "--help"], [name, "--no-such-flag"]]
        if isinstance(command, click.Group):
            calls += [[name, sub, "--help"] for sub in command.commands]
        for args in calls:
            a = runner.invoke(app, args, prog_name="mmath")
            b = runner.invoke(one, args, prog_name="mmath")
            assert (a.exit_code, a.output) == (b.exit_code, b.output), args
            assert a.output.strip(), args
    assert app_for([]) is app and app_for(["--version"]) is app and app_for(["nosuch"]) is app


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "mergekit_math", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("mmath ")


def test_inspect_reports_headers(tmp_path):
    folder = make_model(
        tmp_path / "gpt", arch="gpt2", tied=True, dtype="bfloat16", shard_size="50KB"
    )
    res = runner.invoke(app, ["inspect", str(folder), "--tensors"])
    assert res.exit_code == 0, res.output
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    n_shards = len(set(index["weight_map"].values()))
    assert "GPT2LMHeadModel (gpt2)" in res.output
    assert "tied embeddings: yes" in res.output
    assert f"shards:          {n_shards}" in res.output
    assert "bfloat16" in res.output
    assert "transformer.h.2.attn.c_attn.weight" in res.output
    assert "layers:          3" in res.output


def test_inspect_missing_folder(tmp_path):
    res = runner.invoke(app, ["inspect", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_methods_lists_every_method_with_its_paper():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    for name in (
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "slerp",
        "model_stock",
        "passthrough",
    ):
        assert f"\n{name} " in "\n" + res.output
    assert "https://arxiv.org/abs/2306.01708" in res.output

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

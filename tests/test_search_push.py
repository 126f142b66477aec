"""`mmath search --push-best` and `mmath search report --push-best`: the picked point goes to
the (fake, local) Hub through the eval gate, as `mmath sweep --push-best` does; the weights
that arrive are `mmath merge best_recipe.yaml`'s, and a failing bar sends nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import mmath
from hub_server import TOKEN, FakeHub, hub_fixture  # noqa: F401  (the `hub` fixture)
from test_search import ACC, search_args, searched  # noqa: F401  (the `searched` fixture)
from test_sweep import models, own_cache, rows_of  # noqa: F401  (fixtures)

pytest.importorskip("optuna")


def copy_search(searched: dict, tmp_path: Path) -> Path:  # noqa: F811
    """The module's search folder, copied (same name: the study is named after it)."""
    out = tmp_path / searched["out"].name
    shutil.copytree(searched["out"], out)
    return out


def picked_row(out: Path) -> dict:
    text = (out / "pareto.md").read_text()
    pid = next(line for line in text.splitlines() if "(picked)" in line).split("`")[-2]
    return {r["id"]: r for r in rows_of(out)}[pid]


def tensors(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


def test_search_pushes_its_pick_through_the_gate(searched, models, hub: FakeHub, tmp_path):  # noqa: F811
    out = copy_search(searched, tmp_path)
    assert not list(out.glob("points/*/model"))  # search keeps no weights: merged again
    rows = rows_of(out)
    top = max(r["metrics"][ACC] for r in rows)
    assert top > 0  # so the bar below is not met by any model at all
    res = mmath(
        *search_args(models, out),
        "--pick",
        "max-accuracy",
        "--push-best",
        "me/best",
        "--require",
        f"{ACC}>={top}",
        "--token",
        TOKEN,
    )
    assert res.exit_code == 0, res.output
    assert "6 trials complete, 0 to run" in res.output  # nothing searched again
    assert rows_of(out) == rows
    picked = picked_row(out)
    assert picked["metrics"][ACC] == top
    assert f"--push-best: point {picked['id'][:8]} from {out / 'best'}" in res.output
    assert "PASS" in res.output and "pushed to " in res.output and TOKEN not in res.output

    files = hub.repos["me/best"].files
    assert {"model.safetensors", "config.json", "mmath_recipe.yaml", "README.md"} <= set(files)
    recipe = yaml.safe_load(files["mmath_recipe.yaml"])
    assert recipe == yaml.safe_load((out / "best_recipe.yaml").read_text()) == picked["recipe"]
    card = files["README.md"].decode()
    assert "gsm8k_local" in card  # the gate's evaluation is on the card

    # what arrived is what `mmath merge best_recipe.yaml` makes
    res = mmath("merge", out / "best_recipe.yaml", tmp_path / "merged")
    assert res.exit_code == 0, res.output
    pushed = tensors(files["model.safetensors"])
    merged = tensors((tmp_path / "merged" / "model.safetensors").read_bytes())
    assert pushed.keys() == merged.keys() and pushed
    for name, value in merged.items():
        assert pushed[name].dtype == value.dtype and pushed[name].equal(value), name
    assert json.loads(files["config.json"]) == json.loads(
        (tmp_path / "merged" / "config.json").read_text()
    )


def test_a_failing_bar_pushes_nothing(searched, hub: FakeHub, tmp_path):  # noqa: F811
    out = copy_search(searched, tmp_path)
    push = ["--push-best", "me/nope", "--token", TOKEN]
    res = mmath("search", "report", out, *push, "--require", f"{ACC}>=2")
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.output and "is not >= 2" in res.output
    assert f"error: eval gate failed: {ACC}>=2; the best point was not pushed" in res.output
    assert hub.requests == [] and hub.repos == {}

    # the flags are checked before anything is written
    (out / "best_recipe.yaml").unlink()
    for args, message in [
        (push, "--push-best needs a bar"),
        (["--push-best", "nope", "--require", f"{ACC}>=0"], "repo id 'nope'"),
        (["--require", f"{ACC}>=0"], "give --push-best REPO too"),
    ]:
        res = mmath("search", "report", out, *args)
        assert res.exit_code == 2 and message in res.output, res.output
    assert not (out / "best_recipe.yaml").exists() and hub.requests == []

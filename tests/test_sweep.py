"""`mmath sweep`: --set parsing, recipe keys, points, and sweeps end to end on tiny models.

The fine-tune is a tiny character-level Llama trained (in a few seconds) to answer every
question with ``#### 7``, and every problem of the data file has answer 7; the base is the same
model untrained. Task arithmetic with weight w is then the base at w=0 (accuracy 0) and the
fine-tune at w=1 (accuracy 1), so the sweep's results are known at both ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import mmath, write_recipe
from hub_server import TOKEN, hub_fixture  # noqa: F401  (the `hub` fixture)

from mergekit_math.errors import UserError
from mergekit_math.sweep.grid import (
    Axis,
    describe,
    grid_points,
    parse_set,
    parse_values,
    random_points,
)

GEN = "max_gen_toks=12"
WEIGHT = "models[0].parameters.weight"


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "text, values",
    [
        ("0:1:0.25", [0.0, 0.25, 0.5, 0.75, 1.0]),
        ("0.1:0.5:0.2", [0.1, 0.3, 0.5]),  # no 0.30000000000000004
        ("0:1:0.3", [0.0, 0.3, 0.6, 0.9]),  # STOP included only when reached
        ("1:10:3", [1, 4, 7, 10]),
        ("1:0:-0.5", [1.0, 0.5, 0.0]),
        ("0.5:0.5:0.1", [0.5]),
        ("log:0.001:1:4", [0.001, 0.01, 0.1, 1.0]),
        ("log:1:16:5", [1.0, 2.0, 4.0, 8.0, 16.0]),
        ("log:2:2:1", [2.0]),
        ("0.2, 0.5,1", [0.2, 0.5, 1]),
        ("paper,l1,false", ["paper", "l1", False]),
        ("7", [7]),
    ],
)
def test_parse_values(text, values):
    got = parse_values(text, "k")
    assert got == values
    assert [type(v) for v in got] == [type(v) for v in values]


@pytest.mark.parametrize(
    "text, message",
    [
        ("0:1", "expected START:STOP:STEP"),
        ("0:1:0.5:2", "expected START:STOP:STEP"),
        ("0:1:0", "STEP must not be 0"),
        ("0:1:-0.1", "STEP -0.1 never goes from 0 to 1"),
        ("log:0:1:3", "START and STOP must be positive"),
        ("log:1:10:0", "at least 1"),
        ("log:1:10:2.5", "whole number"),
        ("log:1:10", "expected log:START:STOP:N"),
        ("0.5,,1", "empty value"),
        ("0.5,0.50", "value 0.5 is listed twice"),
        ("1,1.0", "listed twice"),
        ("0:1000000:1", "at most 10000"),
    ],
)
def test_parse_values_errors(text, message):
    with pytest.raises(UserError, match="--set k: ") as err:
        parse_values(text, "k")
    assert message in str(err.value)


def test_parse_set():
    axis = parse_set(" models[1].parameters.weight = 0.2,0.4")
    assert axis == Axis(key="models[1].parameters.weight", values=[0.2, 0.4])
    assert parse_set("seed=0:2:1").values == [0, 1, 2]
    for bad in ("models[1].parameters.weight", "=0.5", "weight=", "models[x].weight=1"):
        with pytest.raises(UserError, match="--set"):
            parse_set(bad)


def test_grid_and_random_points():
    a = Axis(key="parameters.density", values=[0.2, 0.5, 1.0])
    b = Axis(key=WEIGHT, values=[0, 1])
    grid = grid_points([a, b])
    assert len(grid) == 6
    assert grid[:3] == [  # the last --set varies fastest
        {"parameters.density": 0.2, WEIGHT: 0},
        {"parameters.density": 0.2, WEIGHT: 1},
        {"parameters.density": 0.5, WEIGHT: 0},
    ]
    sample = random_points([a, b], 4, seed=3)
    assert len(sample) == 4 and all(p in grid for p in sample)
    assert len({json.dumps(p) for p in sample}) == 4
    assert sample == random_points([a, b], 4, seed=3)
    assert {json.dumps(p) for p in random_points([a, b], 4, seed=4)} != {
        json.dumps(p) for p in sample
    }
    assert random_points([a, b], 10, seed=0) == grid  # at least the grid: all of it
    assert describe(grid[1]) == "density=0.2 weight=1"
    both = {"models[0].parameters.weight": 0.5, "models[1].parameters.weight": 1.0}
    assert describe(both) == "models[0].parameters.weight=0.5 models[1].parameters.weight=1"


# ----------------------------------------------------------------------------- recipe keys

TIES = """\
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.5}}
evaluate: {{tasks: gsm8k_local}}
"""


def test_settable_keys(zoo, tmp_path):
    from mergekit_math.recipe import load_recipe
    from mergekit_math.sweep.grid import settable_keys

    path = write_recipe(tmp_path / "ties.yaml", TIES.format(**zoo))
    keys = list(settable_keys(load_recipe(path)))
    for k in ("parameters.density", "parameters.lambda", "parameters.normalize", WEIGHT):
        assert k in keys
    assert "models[1].parameters.density" in keys
    assert "models[0].parameters.lambda" not in keys  # recipe-wide only
    assert "seed" not in keys  # TIES does not drop at random
    plain = write_recipe(
        tmp_path / "ta.yaml",
        TIES.format(**zoo).replace("merge_method: ties", "merge_method: task_arithmetic"),
    )
    assert "parameters.density" not in settable_keys(load_recipe(plain))  # no effect there
    dare = write_recipe(
        tmp_path / "dare.yaml",
        TIES.format(**zoo).replace("merge_method: ties", "merge_method: dare_ties"),
    )
    assert "seed" in settable_keys(load_recipe(dare))


def test_bad_keys_and_values_are_refused(zoo, tmp_path):
    path = write_recipe(tmp_path / "ties.yaml", TIES.format(**zoo))
    out = tmp_path / "sweep"
    common = ["--tasks", "gsm8k_local", "-o", out]
    cases = [
        (
            ["--set", "models[2].parameters.weight=0.5"],
            "--set models[2].parameters.weight: not a key of",
        ),
        (["--set", "parameters.densty=0.5"], "did you mean 'parameters.density'"),
        (["--set", "models[0].parameters.density=0.5:1.5:0.5"], "less than or equal to 1"),
        (["--set", "models[0].parameters.density=0,0.5"], "greater than 0"),
        (["--set", "parameters.weight=0.5,1"], "every input sets its own 'weight'"),
        (["--set", f"{WEIGHT}=1", "--set", f"{WEIGHT}=2"], "given twice"),
        (["--set", f"{WEIGHT}=0:1"], "expected START:STOP:STEP"),
        (["--set", f"{WEIGHT}=1", "--keep", "some"], "--keep: expected none, all or best"),
        (["--set", f"{WEIGHT}=1", "--require", "gsm8k_local:acc>=0.5"], "--push-best"),
        (["--set", f"{WEIGHT}=1", "--push-best", "me/x"], "--push-best needs a bar"),
        (["--set", f"{WEIGHT}=1", "--backend", "ray", "--jobs", "2"], "--jobs is for"),
        (["--set", f"{WEIGHT}=1", "--address", "auto"], "--address is for --backend ray"),
        (["--set", f"{WEIGHT}=1", "--metric", "exact_match"], "--metric: expected TASK:METRIC"),
    ]
    for extra, message in cases:
        res = mmath("sweep", path, *extra, *common)
        assert res.exit_code == 2, (extra, res.output)
        assert message in res.output, (extra, res.output)
    res = mmath("sweep", path, "--set", "models[9].parameters.weight=1", *common)
    listing = res.output.split("settable keys (ties): ")[1]
    assert "parameters.density" in listing and "models[1].parameters.weight" in listing
    res = mmath("sweep", path, "--set", f"{WEIGHT}=1", "-o", out)
    assert res.exit_code == 2 and "--tasks: name at least one task" in res.output
    assert not out.exists()


def test_point_recipe_is_what_the_engine_resolves(zoo, tmp_path):
    """A point's resolved recipe (and so its key) is the recipe's, with the point's keys set:
    the same as resolving the recipe with the point applied."""
    from mergekit_math.io.model_files import resolved_recipe
    from mergekit_math.merge import build_plan
    from mergekit_math.recipe import parse_recipe
    from mergekit_math.sweep.grid import apply_point, check_axes
    from mergekit_math.sweep.point import recipe_hash

    text = TIES.format(**zoo).replace("merge_method: ties", "merge_method: dare_ties")
    raw = yaml.safe_load(text)
    del raw["evaluate"]
    recipe = parse_recipe(raw)
    axes = check_axes(
        [
            parse_set("parameters.lambda=0.5,2"),
            parse_set("seed=3"),
            parse_set("models[1].parameters.density=0.1,1"),
            parse_set("parameters.rescale=l1,false"),
        ],
        recipe,
        "r",
    )

    def resolve(data):
        plan = build_plan(parse_recipe(data), recipe_dir=tmp_path)
        try:
            return resolved_recipe(plan)
        finally:
            for c in plan.checkpoints.values():
                c.close()

    base = resolve(raw)
    for point in grid_points(axes):
        assert recipe_hash(apply_point(base, point)) == recipe_hash(
            resolve(apply_point(raw, point))
        )
    # 1 and 1.0 are one point: values take the parameter's type.
    one = check_axes([parse_set(f"{WEIGHT}=1")], recipe, "r")[0].values
    assert one == [1.0] and isinstance(one[0], float)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMATH_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    import torch
    from tiny_math import new_model, train

    root = tmp_path_factory.mktemp("sweep_models")
    pairs = [(3, 4), (2, 5), (1, 6), (5, 2), (6, 1)]
    problems = [SimpleNamespace(question=f"What is {a} plus {b}?", final=7) for a, b in pairs]
    data = root / "sevens.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": p.question, "answer": f"{a}+{b}=<<{a}+{b}=7>>7\n#### 7"}) + "\n"
            for (a, b), p in zip(pairs, problems)
        )
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is several times faster
    try:
        train(root / "sevens", problems, steps=100, lr=1e-2, seed=0)
        new_model(root / "base", seed=0).save_pretrained(root / "base")
    finally:
        torch.set_num_threads(threads)
    recipe = write_recipe(
        root / "ta.yaml",
        "# mmath sweep ta.yaml --set models[0].parameters.weight=0:1:0.5 --tasks gsm8k_local\n"
        "merge_method: task_arithmetic\nbase_model: base\n"
        "models:\n  - model: sevens\n    parameters: {weight: 1.0}\n",
    )
    return {"root": root, "data": data, "recipe": recipe}


def sweep_args(models, out: Path, values: str = "0:1:0.5") -> list:
    return [
        "sweep",
        models["recipe"],
        "--set",
        f"{WEIGHT}={values}",
        "--tasks",
        "gsm8k_local",
        "--data",
        models["data"],
        "--num-fewshot",
        "0",
        "--gen-kwargs",
        GEN,
        "--threads",
        "1",
        "-q",
        "-o",
        out,
    ]


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def comparable(rows: list[dict]) -> dict[str, tuple]:
    return {
        r["id"]: (r["point"], r["metrics"], r["stderr"], r["lengths"], r["fingerprint"])
        for r in rows
    }


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory) -> dict:
    """A 3-point sweep in this process, keeping the best point's weights."""
    out = tmp_path_factory.mktemp("reference") / "sweep"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMATH_CACHE_DIR", str(out.parent / "cache"))
        res = mmath(*sweep_args(models, out), "--keep", "best")
    assert res.exit_code == 0, res.output
    return {"out": out, "output": res.output, "rows": rows_of(out)}


def test_sweep_end_to_end(models, reference, tmp_path):
    out, rows = reference["out"], reference["rows"]
    assert "3 points of task_arithmetic (0 recorded, 3 to run)" in reference["output"]
    assert len(rows) == 3 and len({r["id"] for r in rows}) == 3
    by_weight = {r["point"][WEIGHT]: r for r in rows}
    assert set(by_weight) == {0.0, 0.5, 1.0}
    assert by_weight[0.0]["metrics"]["gsm8k_local:exact_match,strict-match"] == 0.0
    assert by_weight[1.0]["metrics"]["gsm8k_local:exact_match,strict-match"] == 1.0
    for r in rows:
        assert set(r["metrics"]) == {
            "gsm8k_local:exact_match,strict-match",
            "gsm8k_local:exact_match,flexible-extract",
        }
        assert r["lengths"]["gsm8k_local"]["n"] == 5
        assert 1 <= r["lengths"]["gsm8k_local"]["mean"] <= 12
        assert r["samples"] == {"gsm8k_local": 5}
        assert r["merge_seconds"] > 0 and r["eval_seconds"] > 0
        assert r["fingerprint"].startswith("blake2b:")
        assert r["recipe"]["models"][0]["parameters"]["weight"] == r["point"][WEIGHT]
        assert r["recipe"]["base_model"] == str((models["root"] / "base").resolve())
        # The point's resolved recipe is written in its folder.
        folder = out / "points" / r["id"]
        assert yaml.safe_load((folder / "recipe.yaml").read_text()) == r["recipe"]
        assert (folder / "log.txt").is_file()
    assert len({r["fingerprint"] for r in rows}) == 3

    # --keep best: only the best point's weights are left.
    kept = [p.parent.name for p in (out / "points").glob("*/model")]
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| 1 |")]
    best_id = table[0].split("`")[-2]
    assert len(kept) == 1 and kept[0].startswith(best_id)
    assert "**exact_match,strict-match**" in report and "`weight`" in report
    values = [
        float(line.split("|")[3].split()[0])
        for line in report.splitlines()[1:]
        if line.startswith("| ") and line[2].isdigit()
    ]
    assert values == sorted(values, reverse=True) and values[0] == 1.0

    # sweep.png: a decodable image of the documented size.
    import matplotlib.image

    from mergekit_math.sweep.report import PNG_SIZE

    image = matplotlib.image.imread(out / "sweep.png")
    assert image.shape[:2] == (PNG_SIZE[1], PNG_SIZE[0]) == (500, 800)

    # best_recipe.yaml alone rebuilds the best point, byte for byte.
    from mergekit_math.io.fingerprint import model_fingerprint

    best = next(r for r in rows if r["id"].startswith(best_id))
    res = mmath("merge", out / "best_recipe.yaml", tmp_path / "again")
    assert res.exit_code == 0, res.output
    assert model_fingerprint(tmp_path / "again") == best["fingerprint"]

    # The same command again: nothing to run, nothing appended.
    again = mmath(*sweep_args(models, out), "--keep", "best")
    assert again.exit_code == 0, again.output
    assert "(3 recorded, 0 to run)" in again.output
    assert rows_of(out) == rows

    # Another evaluation setting is refused; a wider grid runs the new points only.
    other = mmath(*sweep_args(models, out), "--limit", "3")
    assert other.exit_code == 2 and "limit None -> 3" in other.output, other.output
    res = mmath("sweep", "report", out, "--metric", "gsm8k_local:exact_match,flexible-extract")
    assert res.exit_code == 0, res.output
    assert "**exact_match,flexible-extract**" in (out / "report.md").read_text()
    res = mmath("sweep", "report", out, "--metric", "gsm8k_local:accuracy")
    assert res.exit_code == 2 and "recorded metrics: gsm8k_local:exact_match" in res.output
    res = mmath("sweep", "report", tmp_path)
    assert res.exit_code == 2 and "not a sweep folder" in res.output


def test_push_best_through_the_gate(models, reference, hub, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(reference["out"], out)
    push = ["--push-best", "me/best", "--token", TOKEN]
    failing = mmath(
        *sweep_args(models, out), *push, "--require", "gsm8k_local:exact_match,strict-match<0.5"
    )
    assert failing.exit_code == 1, failing.output
    assert "FAIL" in failing.output and "me/best" not in hub.repos
    # Without kept weights, the best point is merged again (and checked against its row).
    for kept in (out / "points").glob("*/model"):
        shutil.rmtree(kept)
    res = mmath(
        *sweep_args(models, out), *push, "--require", "gsm8k_local:exact_match,strict-match>=1"
    )
    assert res.exit_code == 0, res.output
    assert f"from {out / 'best'}" in res.output
    assert "PASS" in res.output and TOKEN not in res.output
    files = hub.repos["me/best"].files
    assert "model.safetensors" in files
    best = yaml.safe_load(files["mmath_recipe.yaml"])
    assert best["models"][0]["parameters"]["weight"] in (0.5, 1.0)


def test_resume_after_sigint(models, tmp_path):
    """SIGINT to a running sweep: the finished points stay recorded, the point in flight
    leaves no weights, and the same command then runs only the points not recorded."""
    out = tmp_path / "sweep"
    args = sweep_args(models, out, "0:1:0.25")
    env = {**os.environ, "MMATH_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergekit_math", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    results = out / "results.jsonl"
    deadline = time.monotonic() + 180
    while not (results.exists() and results.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no point finished in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted" in stderr and "run the same command again to resume" in stderr
    before = rows_of(out)
    assert 1 <= len(before) < 5
    assert not list((out / "points").glob("*/model")) and not list(out.rglob("*partial*"))

    res = mmath(*args)
    assert res.exit_code == 0, res.output
    assert f"({len(before)} recorded, {5 - len(before)} to run)" in res.output
    after = rows_of(out)
    assert len(after) == 5 and len({r["id"] for r in after}) == 5
    assert after[: len(before)] == before
    assert sorted(r["point"][WEIGHT] for r in after) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_two_jobs_give_the_same_rows(models, reference, tmp_path):
    out = tmp_path / "sweep"
    res = mmath(*sweep_args(models, out), "--jobs", "2", "--no-cache")
    assert res.exit_code == 0, res.output
    assert "in 2 worker processes" in res.output
    rows = rows_of(out)
    assert not any(r["eval_cached"] for r in rows)
    assert os.getpid() not in {r["pid"] for r in rows}  # run (and recorded) by the workers
    assert comparable(rows) == comparable(reference["rows"])
    assert not list((out / "points").glob("*/model"))  # --keep none


def test_in_memory_gives_the_same_rows(models, reference, tmp_path):
    """--in-memory: the same rows (metrics, lengths, fingerprints) as the disk sweep, no
    weights written for the points not kept, and the kept point's files are the disk
    merge's, byte for byte."""
    from mergekit_math.merge import in_memory

    in_memory._cached = None  # a skeleton of this process's earlier tests is not reused
    out = tmp_path / "sweep"
    res = mmath(*sweep_args(models, out, "0.5:1:0.5"), "--in-memory", "--no-cache")
    assert res.exit_code == 0, res.output
    rows = rows_of(out)
    assert [r["point"][WEIGHT] for r in rows] == [0.5, 1.0]
    assert not any(r["eval_cached"] for r in rows)
    assert in_memory._cached is not None  # evaluated from the loaded model
    ref = comparable(reference["rows"])
    assert comparable(rows) == {k: ref[k] for k in comparable(rows)}
    assert not list((out / "points").glob("*/model"))

    kept = tmp_path / "kept"
    res = mmath(*sweep_args(models, kept, "0.5:1:0.5"), "--in-memory", "--keep", "best")
    assert res.exit_code == 0, res.output
    [model] = list((kept / "points").glob("*/model"))
    [expect] = list((reference["out"] / "points").glob("*/model"))
    assert model.parent.name == expect.parent.name
    names = sorted(p.name for p in expect.iterdir())
    assert sorted(p.name for p in model.iterdir()) == names
    for name in names:
        assert (model / name).read_bytes() == (expect / name).read_bytes(), name


def test_ray_backend_gives_the_same_rows(models, reference, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "sweep"
        res = mmath(
            *sweep_args(models, out), "--backend", "ray", "--cpus-per-point", "1", "--no-cache"
        )
    finally:
        ray.shutdown()
    assert res.exit_code == 0, res.output
    assert "on Ray" in res.output
    rows = rows_of(out)
    assert all(r["node"] for r in rows)  # they ran as Ray tasks
    assert comparable(rows) == comparable(reference["rows"])


def test_missing_ray_is_a_clear_error(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    res = mmath(*sweep_args(models, tmp_path / "sweep"), "--backend", "ray")
    assert res.exit_code == 2, res.output
    assert "--backend ray needs Ray" in res.output and "mergekit-math[ray]" in res.output


def test_dry_run_lists_points(models, reference):
    res = mmath(*sweep_args(models, reference["out"], "0:1:0.25"), "--dry-run")
    assert res.exit_code == 0, res.output
    assert res.output.count("recorded ") == 3 and res.output.count("to run ") == 2
    assert "nothing was merged" in res.output


# ----------------------------------------------------------------------------- reports


def fake_sweep(folder: Path, keys: list[str], points: list[dict]) -> None:
    from mergekit_math.sweep.results import Manifest, append_row, write_manifest

    folder.mkdir()
    write_manifest(
        folder,
        Manifest(
            recipe="/r/ties.yaml",
            method="ties",
            keys=keys,
            eval={"tasks": ["gsm8k_cot_local"], "limit": 50},
            identity={},
        ),
    )
    for i, point in enumerate(points):
        score = sum(float(v) for v in point.values()) / (len(point) * 2)
        append_row(
            folder / "results.jsonl",
            {
                "id": f"{i:016x}",
                "point": point,
                "metrics": {"gsm8k_cot_local:exact_match,flexible-extract": score},
                "stderr": {"gsm8k_cot_local:exact_match,flexible-extract": 0.01},
                "higher_is_better": {"gsm8k_cot_local:exact_match": True},
                "lengths": {"gsm8k_cot_local": {"n": 50, "mean": 100 - 10 * i}},
                "merge_seconds": 1.0,
                "eval_seconds": 2.0,
                "recipe": {"merge_method": "ties", "seed": i},
            },
        )


@pytest.mark.parametrize("nkeys", [1, 2, 3])
def test_report_plots(tmp_path, nkeys):
    """One key: metric against it; two: heatmap; more: table of the best. Always 800×500."""
    import matplotlib.image

    from mergekit_math.sweep.report import write_report

    keys = ["parameters.density", WEIGHT, "parameters.lambda"][:nkeys]
    axes = [Axis(key=k, values=[0.25, 0.5, 1.0]) for k in keys]
    fake_sweep(tmp_path / "s", keys, grid_points(axes))
    files = write_report(tmp_path / "s")
    assert matplotlib.image.imread(files.plot).shape[:2] == (500, 800)
    assert files.plot.stat().st_size < 200_000
    best = {k: 1.0 for k in keys}
    assert files.best is not None and files.best["point"] == best
    text = files.markdown.read_text()
    assert f"{3**nkeys} points over" in text and "ranked by" in text.lower()
    assert yaml.safe_load(files.best_recipe.read_text())["seed"] == files.best["recipe"]["seed"]

"""`mmath search`: --space/--objective/--pick parsing, the pick rules on hand-made points, and
Optuna searches end to end on the tiny models of test_sweep.py (task arithmetic of an
untrained base and a fine-tune that answers ``#### 7``: accuracy and generated length both
move with the weight)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import mmath
from test_sweep import GEN, WEIGHT, models, own_cache, rows_of  # noqa: F401  (fixtures)

from mergekit_math.errors import UserError
from mergekit_math.sweep.objectives import (
    Pick,
    knee,
    max_accuracy,
    mean_tokens,
    min_cost_within,
    objective_value,
    pareto_front,
    parse_objective,
    parse_pick,
    parse_space,
    pick_point,
)

pytest.importorskip("optuna")

ACC = "gsm8k_local:exact_match,strict-match"


# ----------------------------------------------------------------------------- parsing


def test_parse_space():
    d = parse_space(f"{WEIGHT}=0:1")
    assert (d.key, d.low, d.high, d.log, d.integer) == (WEIGHT, 0.0, 1.0, False, False)
    d = parse_space("parameters.lambda = 0.25:4:log")
    assert (d.low, d.high, d.log) == (0.25, 4.0, True)
    d = parse_space("seed=int:0:9")
    assert d.integer and (d.low, d.high) == (0, 9)
    assert parse_space("parameters.rescale=l1,false").choices == ["l1", False]
    for bad, message in [
        (f"{WEIGHT}=1:0", "LOW must be below HIGH"),
        (f"{WEIGHT}=0:1:log", "log range needs LOW > 0"),
        (f"{WEIGHT}=0:x", "not a number"),
        ("seed=int:0:1.5", "whole numbers"),
        (f"{WEIGHT}=0.5", "at least two choices"),
        (f"{WEIGHT}", "expected KEY="),
        ("models[x].w=0:1", "not a recipe key"),
    ]:
        with pytest.raises(UserError, match="--space") as err:
            parse_space(bad)
        assert message in str(err.value), bad


def test_space_is_checked_against_the_recipe(models, tmp_path):  # noqa: F811
    from mergekit_math.recipe import load_recipe
    from mergekit_math.sweep.objectives import check_space

    recipe = load_recipe(models["recipe"])
    (weight,) = check_space([parse_space(f"{WEIGHT}=int:0:2")], recipe, "r")
    assert weight.real_key  # whole numbers, given to a real-valued key as floats
    with pytest.raises(UserError, match="--space models\\[3\\].parameters.weight: not a key"):
        check_space([parse_space("models[3].parameters.weight=0:1")], recipe, "r")
    with pytest.raises(UserError, match="--space: give at least one"):
        check_space([], recipe, "r")


def test_parse_objective_and_values():
    o = parse_objective(f"{ACC}:max")
    assert (o.spec, o.direction, o.is_tokens) == (ACC, "maximize", False)
    t = parse_objective("tokens:min")
    assert t.is_tokens and t.direction == "minimize"
    for bad in ("tokens", "gsm8k_local:exact_match", f"{ACC}:up", ":max"):
        with pytest.raises(UserError, match="--objective: expected"):
            parse_objective(bad)
    row = {
        "metrics": {ACC: 0.5, "gsm8k_local:exact_match,flexible-extract": 0.75},
        "lengths": {"a": {"n": 10, "mean": 4.0}, "b": {"n": 30, "mean": 8.0}, "c": {"n": 0}},
    }
    assert mean_tokens(row) == pytest.approx(7.0)  # weighted by samples: (40 + 240) / 40
    assert objective_value(t, row) == pytest.approx(7.0)
    assert objective_value(o, row) == 0.5
    flexible = parse_objective("gsm8k_local:exact_match,flexible-extract:max")
    assert objective_value(flexible, row) == 0.75
    with pytest.raises(UserError, match="--objective gsm8k_local:exact_match is ambiguous"):
        objective_value(parse_objective("gsm8k_local:exact_match:max"), row)
    with pytest.raises(UserError, match="no generated tokens"):
        objective_value(t, {"metrics": {ACC: 1.0}, "lengths": {}})


def test_parse_pick():
    assert parse_pick("knee") == Pick(rule="knee")
    assert parse_pick("min-tokens-within:0.01") == Pick(rule="min-tokens-within", within=0.01)
    for bad in ("knee:1", "min-tokens-within", "min-tokens-within:-1", "best"):
        with pytest.raises(UserError, match="--pick"):
            parse_pick(bad)


# ----------------------------------------------------------------------------- pick rules

# (accuracy, mean tokens): a convex front with its knee at (0.8, 100), and a dominated point.
POINTS = [(0.5, 20.0), (0.8, 100.0), (0.85, 300.0), (0.86, 800.0), (0.6, 500.0)]


def test_pareto_front():
    assert pareto_front([list(p) for p in POINTS], [True, False]) == [0, 1, 2, 3]
    assert pareto_front([[1, 2], [1, 2], [0, 3]], [True, False]) == [0, 1]  # ties both stay
    assert pareto_front([[0.2], [0.9], [0.5]], [True]) == [1]


def test_pick_rules_on_hand_made_points():
    assert max_accuracy(POINTS) == 3
    assert knee(POINTS) == 1
    assert min_cost_within(POINTS, 0.01) == 2  # 0.85 is within 0.01 of 0.86, with fewer tokens
    assert min_cost_within(POINTS, 0.1) == 1
    assert min_cost_within(POINTS, 0.0) == 3
    assert min_cost_within(POINTS, 1.0) == 0
    assert pick_point(POINTS, parse_pick("knee")) == 1
    # ties: the same accuracy at fewer tokens wins max-accuracy
    assert max_accuracy([(0.9, 50.0), (0.9, 40.0)]) == 1
    # two points (or one): no knee, the most accurate
    assert knee([(0.5, 10.0), (0.9, 90.0)]) == 1
    assert knee([(0.7, 10.0)]) == 0
    # a concave front bulges away from the ideal point: no knee, the most accurate
    assert knee([(0.0, 0.0), (0.1, 0.9), (1.0, 1.0)]) == 2
    # the knee does not depend on units: scaling tokens changes nothing
    assert knee([(q, c * 1000) for q, c in POINTS]) == 1


# ----------------------------------------------------------------------------- end to end


def search_args(models, out: Path, trials: int = 6, *extra) -> list:  # noqa: F811
    return [
        "search",
        models["recipe"],
        "--space",
        f"{WEIGHT}=0:1",
        "--objective",
        f"{ACC}:max",
        "--objective",
        "tokens:min",
        "--trials",
        trials,
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
        *extra,
    ]


def study_trials(out: Path) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")
    return study.get_trials(deepcopy=False)


def complete(trials: list) -> list:
    return [t for t in trials if t.state.name == "COMPLETE"]


def front_ids(text: str) -> list[str]:
    section = text.split("## Pareto front", 1)[1].split("\n## ", 1)[0]
    return [
        line.split("`")[-2]
        for line in section.splitlines()
        if line.startswith("| ") and "`" in line and line[2].isdigit()
    ]


@pytest.fixture(scope="module")
def searched(models, tmp_path_factory) -> dict:  # noqa: F811
    out = tmp_path_factory.mktemp("search") / "study"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMATH_CACHE_DIR", str(out.parent / "cache"))
        started = time.perf_counter()
        res = mmath(*search_args(models, out))
    assert res.exit_code == 0, res.output
    return {"out": out, "output": res.output, "seconds": time.perf_counter() - started}


def test_search_gives_a_pareto_front_and_a_mergeable_pick(searched, tmp_path):
    out = searched["out"]
    trials = complete(study_trials(out))
    assert len(trials) == 6
    rows = {r["id"]: r for r in rows_of(out)}
    assert {t.user_attrs["point"] for t in trials} <= set(rows)
    # every trial's values are its row's: accuracy, and the mean of the generated tokens
    for t in trials:
        row = rows[t.user_attrs["point"]]
        assert t.values[0] == row["metrics"][ACC]
        assert t.values[1] == pytest.approx(row["lengths"]["gsm8k_local"]["mean"])
        assert row["point"][WEIGHT] == t.params[WEIGHT]
        assert 0 <= t.params[WEIGHT] <= 1
    # the front in pareto.md is exactly the non-dominated points, computed here from scratch
    values = {t.user_attrs["point"]: (t.values[0], t.values[1]) for t in trials}

    def dominated(a):
        return any(b[0] >= a[0] and b[1] <= a[1] and b != a for b in values.values())

    expected = {pid for pid, v in values.items() if not dominated(v)}
    text = (out / "pareto.md").read_text()
    assert set(front_ids(text)) == expected and expected
    assert "(picked)" in text and "![pareto](pareto.png)" in text
    assert f"{len(values)} points from 6 completed trials" in text

    import matplotlib.image

    assert matplotlib.image.imread(out / "pareto.png").shape[:2] == (500, 800)

    # best_recipe.yaml: the knee of the front; `mmath merge` rebuilds that point exactly
    from mergekit_math.io.fingerprint import model_fingerprint

    picked = next(line for line in text.splitlines() if "(picked)" in line).split("`")[-2]
    assert picked in expected
    best = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert best == rows[picked]["recipe"]
    res = mmath("merge", out / "best_recipe.yaml", tmp_path / "best")
    assert res.exit_code == 0, res.output
    assert model_fingerprint(tmp_path / "best") == rows[picked]["fingerprint"]

    # another pick, without running anything: the most accurate point of the front
    res = mmath("search", "report", out, "--pick", "max-accuracy")
    assert res.exit_code == 0, res.output
    top = max((v[0], -v[1]) for p, v in values.items() if p in expected)  # ties: fewest tokens
    chosen = yaml.safe_load((out / "best_recipe.yaml").read_text())
    (pid,) = [p for p in expected if rows[p]["recipe"] == chosen]
    assert (values[pid][0], -values[pid][1]) == top


def test_rerun_does_not_repeat_trials(searched, models):  # noqa: F811
    out = searched["out"]
    rows, trials = rows_of(out), study_trials(out)
    res = mmath(*search_args(models, out))
    assert res.exit_code == 0, res.output
    assert "6 trials complete, 0 to run" in res.output
    assert rows_of(out) == rows  # nothing merged or evaluated again
    assert len(study_trials(out)) == len(trials)
    # more trials: only the new ones run
    res = mmath(*search_args(models, out, 7))
    assert res.exit_code == 0, res.output
    assert "6 trials complete, 1 to run" in res.output
    assert len(complete(study_trials(out))) == 7
    assert rows_of(out)[: len(rows)] == rows
    # other settings are refused
    res = mmath(*search_args(models, out, 7, "--limit", "3"))
    assert res.exit_code == 2 and "limit None -> 3" in res.output


def test_search_refuses_bad_options(models, tmp_path):  # noqa: F811
    out = tmp_path / "s"
    cases = [
        (["--objective", "tokens"], "--objective: expected"),
        (["--pick", "best"], "--pick: expected"),
        (["--sampler", "grid"], "--sampler: expected"),
        (["--sampler", "cmaes"], "cmaes optimises one objective"),
        (["--space", "parameters.weight=0:1"], "every input sets its own 'weight'"),
    ]
    for extra, message in cases:
        res = mmath(*search_args(models, out, 2, *extra))
        assert res.exit_code == 2, (extra, res.output)
        assert message in res.output, (extra, res.output)
    assert not out.exists()


def test_interrupted_search_resumes(models, tmp_path):  # noqa: F811
    """SIGINT while a trial after the first runs: those done stay complete, the running one
    is marked failed and its value runs again on the rerun, which then stops at --trials."""
    out = tmp_path / "study"
    args = search_args(models, out, 3)
    env = {**os.environ, "MMATH_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergekit_math", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no second trial started in time"
        if (out / "results.jsonl").exists() and (out / "study.db").exists():
            running = [t for t in study_trials(out) if t.state.name == "RUNNING"]
            if rows_of(out) and any("point" in t.user_attrs for t in running):
                break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted" in stderr and "run again" in stderr
    before = rows_of(out)
    trials = study_trials(out)
    (failed,) = [t for t in trials if t.state.name == "FAIL"]
    assert failed.user_attrs["error"] == "interrupted"
    # the trial seen running may finish before the signal lands (a loaded machine): the
    # interrupted one is then the third, and one or two stand complete
    n = len(before)
    assert len(complete(trials)) == n and n in (1, 2)
    assert not list((out / "points").glob("*/model"))

    res = mmath(*args)
    assert res.exit_code == 0, res.output
    assert f"{n} trials complete, {3 - n} to run" in res.output
    trials = study_trials(out)
    done = complete(trials)
    assert len(done) == 3
    retry = [t for t in done if t.user_attrs.get("retry_of") == failed.number]
    assert len(retry) == 1 and retry[0].params == failed.params
    after = rows_of(out)
    assert after[:n] == before and len({r["id"] for r in after}) == len(after) == 3


def test_two_workers_share_one_study(models, tmp_path):  # noqa: F811
    out = tmp_path / "study"
    res = mmath(*search_args(models, out, 4, "--workers", "2", "--seed", "1"))
    assert res.exit_code == 0, res.output
    assert "in 2 worker processes" in res.output
    trials = study_trials(out)
    assert len(complete(trials)) == 4 and len(trials) == 4
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers ran trials
    rows = rows_of(out)
    assert os.getpid() not in {r["pid"] for r in rows}
    assert {t.user_attrs["point"] for t in trials} == {r["id"] for r in rows}
    assert json.loads((out / "search.json").read_text())["study"] == "study"


def test_single_objective_report_picks_the_best(tmp_path):
    """One objective: the front is the best point, whatever --pick says; rows that lack the
    objective are left out."""
    import matplotlib.image

    from mergekit_math.sweep.objectives import Dim
    from mergekit_math.sweep.pareto import write_pareto
    from mergekit_math.sweep.results import append_row
    from mergekit_math.sweep.search import SearchManifest

    manifest = SearchManifest(
        recipe="/r/ta.yaml",
        method="task_arithmetic",
        space=[Dim(key=WEIGHT, low=0.0, high=1.0)],
        objectives=[parse_objective(f"{ACC}:max")],
        eval={"tasks": ["gsm8k_local"]},
        identity={},
        study="s",
        storage="folder",
    )
    scores = [0.2, 0.9, 0.5, None]
    for i, value in enumerate(scores):
        append_row(
            tmp_path / "results.jsonl",
            {
                "id": f"{i:016x}",
                "point": {WEIGHT: i / 4},
                "metrics": {} if value is None else {ACC: value},
                "lengths": {},
                "recipe": {"merge_method": "task_arithmetic", "seed": i},
            },
        )
    for rule in ("knee", "min-tokens-within:0.5"):
        files = write_pareto(tmp_path, manifest, parse_pick(rule))
        assert len(files.points) == 3
        assert [p.id for p in files.front] == [files.picked.id] == [f"{1:016x}"]
        assert yaml.safe_load(files.best_recipe.read_text())["seed"] == 1
    text = files.markdown.read_text()
    assert "## Pareto front (1 non-dominated of 3 points)" in text
    assert matplotlib.image.imread(files.plot).shape[:2] == (500, 800)


def test_baselines_are_the_input_models_evaluated_as_mmath_eval_does(models, tmp_path):  # noqa: F811
    out = tmp_path / "study"
    res = mmath(*search_args(models, out, 2, "--baselines"))
    assert res.exit_code == 0, res.output
    text = (out / "pareto.md").read_text()
    refs = text.split("## Input models (reference, not part of the front)", 1)[1]
    rows = {
        line.split("`")[1]: [c.strip() for c in line.split("|")[2:-1]]
        for line in refs.splitlines()
        if line.startswith("| `")
    }
    inputs = [str(models["root"] / "base"), str(models["root"] / "sevens")]
    assert sorted(rows) == sorted(inputs)
    for model in inputs:
        direct = mmath(
            "eval", model, "--tasks", "gsm8k_local", "--data", models["data"], "--num-fewshot",
            "0", "--gen-kwargs", GEN, "--no-cache", "-o", tmp_path / Path(model).name,
        )  # fmt: skip
        assert direct.exit_code == 0, direct.output
        doc = json.loads((tmp_path / Path(model).name / "results.json").read_text())
        acc = doc["results"]["gsm8k_local"]["exact_match,strict-match"]
        tokens = doc["mmath"]["cot_lengths"]["gsm8k_local"]["mean"]
        assert rows[model] == [f"{acc:.4f}", f"{tokens:.1f}"]
    # the trained input answers every problem; the untrained base none: both are references,
    # never points of the front
    assert rows[inputs[1]][0] == "1.0000" and rows[inputs[0]][0] == "0.0000"
    assert not set(front_ids(text)) & {"input:base", "input:sevens"}

    # a rerun (more trials) evaluates no input model again
    recorded = (out / "baselines.jsonl").read_text()
    res = mmath(*search_args(models, out, 3, "--baselines"))
    assert res.exit_code == 0, res.output
    assert "baseline sevens: recorded" in res.output and "evaluating" not in res.output
    assert (out / "baselines.jsonl").read_text() == recorded
    assert "## Input models" in (out / "pareto.md").read_text()

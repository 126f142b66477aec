"""`mmath eval`, the eval gate of `mmath push` and `mmath merge --eval --push`, end to end.

The models are tiny character-level Llamas built here. One is trained in the test (a few
hundred CPU steps) to answer five generated problems with their `#### N`, so the test knows
what lm-eval must report for it: 1.0, against 0 for the untrained one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import mmath, write_recipe
from hub_server import TOKEN, hub_fixture  # noqa: F401  (the `hub` fixture)

GEN = "max_gen_toks=12"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMATH_CACHE_DIR", str(tmp_path / "cache"))


def strict(results: dict, task: str = "gsm8k_local") -> float:
    return results[task]["exact_match,strict-match"]


# ----------------------------------------------------------------------------- mmath eval


def test_eval_results_lengths_and_cache(tmp_path, math_models):
    m = math_models
    args = [
        "eval",
        m["untrained"],
        "--tasks",
        "gsm8k_local,gsm8k_cot_local",
        "--data",
        m["data"],
        "--num-fewshot",
        "0",
        "--gen-kwargs",
        GEN,
        "-o",
        tmp_path / "out",
    ]
    first = mmath(*args)
    assert first.exit_code == 0, first.output
    assert "from cache" not in first.output
    for column in ("task", "filter", "metric", "tokens mean/median/p90"):
        assert column in first.output
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(doc["results"]) == {"gsm8k_local", "gsm8k_cot_local"}
    for task in doc["results"]:
        r = doc["results"][task]
        assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= r.keys()
        assert doc["n-samples"][task]["effective"] == 5
        assert doc["n-shot"][task] == 0
        assert doc["configs"][task]["dataset_kwargs"]["data_files"]["test"] == str(m["data"])
    assert doc["mmath"]["fingerprint"].startswith("blake2b:")
    assert doc["mmath"]["cached"] == {"gsm8k_local": False, "gsm8k_cot_local": False}
    assert doc["lm_eval_version"]

    # Generated-token counts: the stored response re-tokenised with the model's tokenizer.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(m["untrained"])
    for task in ("gsm8k_local", "gsm8k_cot_local"):
        rows = [json.loads(x) for x in (tmp_path / "out" / f"samples_{task}.jsonl").open()]
        per_doc = {r["doc_id"]: r for r in rows}
        assert sorted(per_doc) == [0, 1, 2, 3, 4]
        counts = []
        for r in per_doc.values():
            text = r["resps"][0][0]
            assert r["gen_tokens"] == len(tok(text, add_special_tokens=False).input_ids)
            assert r["gen_tokens"] <= 12
            counts.append(r["gen_tokens"])
        stats = doc["mmath"]["cot_lengths"][task]
        assert stats["n"] == 5
        assert stats["mean"] == pytest.approx(sum(counts) / 5)
        assert stats["median"] == sorted(counts)[2]
        assert stats["max"] == max(counts)
        assert min(counts) <= stats["p90"] <= max(counts)

    second = mmath(*args[:-2], "-o", tmp_path / "again")
    assert second.exit_code == 0, second.output
    assert "from cache: gsm8k_local, gsm8k_cot_local" in second.output
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["results"] == doc["results"]
    assert again["mmath"]["cot_lengths"] == doc["mmath"]["cot_lengths"]
    assert (tmp_path / "again" / "samples_gsm8k_local.jsonl").read_text() == (
        tmp_path / "out" / "samples_gsm8k_local.jsonl"
    ).read_text()

    # Another limit is another cache entry; --no-cache runs again.
    third = mmath(*args[:-2], "--limit", "2")
    assert third.exit_code == 0 and "from cache" not in third.output
    fourth = mmath(*args[:-2], "--no-cache")
    assert fourth.exit_code == 0 and "from cache" not in fourth.output


def test_trained_model_scores_one_and_untrained_zero(math_models):
    from mergekit_math.eval.run import EvalOptions, evaluate

    m = math_models
    options = EvalOptions(
        tasks=["gsm8k_local"], data=m["data"], num_fewshot=0, gen_kwargs={"max_gen_toks": 12}
    )
    trained = evaluate(m["trained"], options)
    untrained = evaluate(m["untrained"], options)
    assert strict(trained.results) == 1.0
    assert trained.results["gsm8k_local"]["exact_match,flexible-extract"] == 1.0
    assert strict(untrained.results) == 0.0
    assert untrained.results["gsm8k_local"]["exact_match,flexible-extract"] <= 0.2
    # What the trained model wrote, word for word: the answer and nothing else.
    finals = [json.loads(x)["answer"].split("#### ")[-1] for x in m["data"].open()]
    for s in trained.samples["gsm8k_local"]:
        assert s["resps"][0][0].strip() == f"#### {finals[s['doc_id']]}"
        assert s["gen_tokens"] == len(f" #### {finals[s['doc_id']]}")


def test_eval_errors(tmp_path, math_models):
    m = math_models
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no final line"}\n')
    cases = [
        (["--tasks", "gsm8k_local", "--data", bad], "does not end in '#### N'"),
        (["--tasks", "gsm8k_local", "--data", tmp_path / "none.jsonl"], "does not exist"),
        (["--tasks", "gsm8k_lcoal"], "unknown task 'gsm8k_lcoal'; did you mean gsm8k_local"),
        (["--tasks", "gsm8k_local", "--gen-kwargs", "max_gen_toks"], "expected key=value"),
        (["--tasks", "gsm8k_local", "--limit", "zero"], "--limit: expected a number"),
        (["--tasks", "gsm8k_local", "--device", "tpu"], "--device: expected cpu or cuda"),
        ([], "--tasks: name at least one task"),
    ]
    for extra, message in cases:
        res = mmath("eval", m["untrained"], *extra)
        assert res.exit_code == 2, (extra, res.output)
        assert message in res.output, (extra, res.output)
    res = mmath("eval", tmp_path, "--tasks", "gsm8k_local")
    assert res.exit_code == 2 and "not a model folder" in res.output


def test_builtin_task_offline_says_it_needs_the_network(math_models):
    res = mmath("eval", math_models["untrained"], "--tasks", "arc_easy", "--limit", "1")
    assert res.exit_code == 2, res.output
    assert "could not load its dataset offline" in res.output
    assert "--online" in res.output


def test_task_yaml_file_and_default_data(tmp_path, math_models):
    """A user's task YAML runs through --tasks PATH; the shipped task without --data uses the
    generated gsm-symbolic set."""
    m = math_models
    task = tmp_path / "tasks" / "my_math.yaml"
    task.parent.mkdir()
    task.write_text(
        yaml.safe_dump(
            {
                "task": "my_math",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(m["data"])}},
                "test_split": "test",
                "output_type": "generate_until",
                "doc_to_text": "Question: {{question}}\nAnswer:",
                "doc_to_target": "{{answer.split('#### ')[-1]}}",
                "generation_kwargs": {"until": ["Question:"], "do_sample": False},
                "filter_list": [
                    {
                        "name": "strict-match",
                        "filter": [
                            {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                            {"function": "take_first"},
                        ],
                    }
                ],
                "metric_list": [
                    {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
                ],
            }
        )
    )
    res = mmath("eval", m["trained"], "--tasks", task, "--gen-kwargs", GEN)
    assert res.exit_code == 0, res.output
    assert re.search(r"my_math\s+strict-match\s+0\s+exact_match\s+1\.0000", res.output)

    res = mmath(
        "eval",
        m["untrained"],
        "--tasks",
        "gsm8k_local",
        "--limit",
        "2",
        "--num-fewshot",
        "0",
        "--gen-kwargs",
        GEN,
        "-o",
        tmp_path / "o",
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    data = Path(doc["mmath"]["data"])
    assert data.name == "gsm_symbolic_n200_seed0.jsonl"
    assert len(data.read_text().splitlines()) == 200


# ----------------------------------------------------------------------------- mmath push


def test_push_gate_passes_and_publishes(tmp_path, math_models, hub):
    m = math_models
    res = mmath(
        "push",
        m["trained"],
        "me/tiny-math",
        "--token",
        TOKEN,
        "--data",
        m["data"],
        "--num-fewshot",
        "0",
        "--gen-kwargs",
        GEN,
        "--require",
        "gsm8k_local:exact_match,strict-match>=0.9",
    )
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output
    assert TOKEN not in res.output
    repo = hub.repos["me/tiny-math"]
    assert f"commit {repo.commits[-1].oid}" in res.output
    for f in m["trained"].iterdir():
        if f.name != "README.md":
            assert repo.files[f.name] == f.read_bytes(), f.name
    card = repo.files["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    results = front["model-index"][0]["results"]
    values = {
        (r["dataset"]["name"], m_["name"]): m_["value"] for r in results for m_ in r["metrics"]
    }
    assert values[("gsm8k_local", "exact_match (strict-match)")] == 1.0
    assert results[0]["source"]["name"] == "lm-evaluation-harness"
    assert "## Evaluation" in card
    for req in hub.requests:
        if "authorization" in req.headers:
            assert req.headers["authorization"] == f"Bearer {TOKEN}"
        assert TOKEN.encode() not in req.body
    assert TOKEN.encode() not in hub.stored_bytes()


def test_push_gate_fails_without_any_request(math_models, hub):
    m = math_models
    res = mmath(
        "push",
        m["untrained"],
        "me/tiny-math",
        "--token",
        TOKEN,
        "--data",
        m["data"],
        "--num-fewshot",
        "0",
        "--gen-kwargs",
        GEN,
        "--require",
        "gsm8k_local:exact_match,strict-match>=0.5",
    )
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.output and "nothing was pushed" in res.output
    assert "0 is not >= 0.5" in res.output
    assert hub.requests == []
    for extra, message in [
        ([], "publishing needs a bar"),
        (["--no-eval"], "add --force"),
        (["--no-eval", "--force", "--require", "x:y>=1"], "contradict"),
        (["--require", "gsm8k_local exact_match>=1"], "missing ':'"),
    ]:
        res = mmath("push", m["untrained"], "me/tiny-math", "--token", TOKEN, *extra)
        assert res.exit_code == 2, (extra, res.output)
        assert message in res.output, (extra, res.output)
    assert hub.requests == []


def test_push_unevaluated_with_force(math_models, hub):
    res = mmath(
        "push",
        math_models["untrained"],
        "me/raw",
        "--token",
        TOKEN,
        "--no-eval",
        "--force",
        "--private",
    )
    assert res.exit_code == 0, res.output
    assert hub.repos["me/raw"].private
    assert "model-index" not in hub.repos["me/raw"].files.get("README.md", b"").decode()


def test_merge_eval_and_push_from_recipe_blocks(tmp_path, math_models, hub):
    """merge → eval → gated push from the recipe's evaluate:/push: blocks; the resolved recipe
    written with the model keeps evaluate (data made absolute) and drops push."""
    m = math_models
    shutil_copy = __import__("shutil").copy
    data = tmp_path / "problems.jsonl"
    shutil_copy(m["data"], data)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: linear
models:
  - model: {m["trained"]}
    parameters: {{weight: 1.0}}
  - model: {m["untrained"]}
    parameters: {{weight: 0.0}}
evaluate:
  tasks: [gsm8k_local]
  data: problems.jsonl
  num_fewshot: 0
  gen_kwargs: {{max_gen_toks: 12}}
  require: ["gsm8k_local:exact_match,strict-match>=0.9"]
push:
  repo_id: me/merged
""",
    )
    out = tmp_path / "out"
    res = mmath("merge", recipe, out, "-q", "--token", TOKEN)
    assert res.exit_code == 0, res.output
    assert "exact_match" in res.output and "PASS" in res.output
    assert "pushed to" in res.output
    files = hub.repos["me/merged"].files
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    resolved = yaml.safe_load((out / "mmath_recipe.yaml").read_text())
    assert "push" not in resolved
    assert resolved["evaluate"]["data"] == str(data.resolve())

    # The same recipe with a bar it misses: the merge stays, nothing is pushed.
    hub.requests.clear()
    text = recipe.read_text().replace(">=0.9", ">1.5").replace("me/merged", "me/other")
    res = mmath(
        "merge", write_recipe(tmp_path / "r2.yaml", text), tmp_path / "out2", "-q", "--token", TOKEN
    )
    assert res.exit_code == 1, res.output
    assert (tmp_path / "out2" / "model.safetensors").is_file()
    assert "nothing was pushed" in res.output
    assert hub.requests == []
    # --push without any bar is refused before merging.
    res = mmath(
        "merge",
        write_recipe(tmp_path / "r3.yaml", recipe.read_text().split("evaluate:")[0]),
        tmp_path / "out3",
        "--push",
        "me/x",
    )
    assert res.exit_code == 2 and "--push needs a bar" in res.output
    assert not (tmp_path / "out3").exists()

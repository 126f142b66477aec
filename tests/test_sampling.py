"""`mmath eval --samples K`: pass@k, maj@k and avg@k against hand-computed values, and end
to end on tiny models trained here to answer math_local and gsm8k_local prompts, where every
reported number is checked against the stored generations scored again in the test."""

from __future__ import annotations

import json
import math
import statistics
from fractions import Fraction
from pathlib import Path

import pytest
from conftest import mmath
from tiny_math import train

from mergekit_math.errors import UserError
from mergekit_math.eval.gen_memory import batch_cap, kv_bytes_per_token
from mergekit_math.eval.sample_scores import sampling_gen_kwargs
from mergekit_math.eval.sampling import (
    aggregate,
    majority,
    pass_at_k,
    pass_ks,
    problem_metrics,
)

MATH_PROMPT = (
    "Problem: {}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    "\nSolution:"
)

# ----------------------------------------------------------------------------- the math


@pytest.mark.parametrize(("k", "expected"), [(1, 0.4), (2, 0.7), (3, 0.9), (4, 1.0), (5, 1.0)])
def test_pass_at_k_hand_computed(k, expected):
    # n=5, c=2: 1 - C(3,k)/C(5,k) = 1 - 3/5, 1 - 3/10, 1 - 1/10, 1 - 0, 1 - 0
    assert pass_at_k(5, 2, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_stable_where_binomials_are_huge():
    for n, c, k in [(200, 3, 100), (1000, 1, 1), (1000, 999, 2), (64, 0, 8), (64, 64, 64)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)
    assert pass_ks(1) == [1] and pass_ks(5) == [1, 2, 4, 5] and pass_ks(8) == [1, 2, 4, 8]


def test_majority_ties_and_abstentions():
    same = str.__eq__
    assert majority(["b", "a", "a", "b"], same) == 0  # 2-2 tie: the group drawn first
    assert majority(["a", "b", "b", "a", "b"], same) == 1
    assert majority([None, "7", None, "8", "8"], same) == 3  # no answer does not vote
    assert majority([None, None], same) is None


def test_majority_groups_math_verify_equivalent_answers():
    pytest.importorskip("math_verify")
    from mergekit_math.eval.math_score import equivalent

    answers = ["0.3", r"\frac{1}{2}", "0.5", r"\dfrac12", "0.3"]
    assert majority(answers, equivalent) == 1  # 1/2 three times against 0.3 twice
    assert majority(answers, str.__eq__) == 0  # as strings 0.3 would win
    assert majority(["3", r"\frac{6}{2}", "4", "4"], equivalent) == 0  # 3 = 6/2 ties 4, first


def test_problem_metrics_and_aggregate():
    one = problem_metrics([1.0, 0.0, 0.0, 1.0, 0.0], winner=1)  # n=5, c=2, maj on a wrong one
    assert one["avg@5"] == pytest.approx(0.4)
    assert [one[f"pass@{k}"] for k in (1, 2, 4, 5)] == pytest.approx([0.4, 0.7, 1.0, 1.0])
    assert one["maj@5"] == 0.0
    two = problem_metrics([1.0, 1.0, 1.0, 1.0, 0.0], winner=0)
    three = problem_metrics([0.0] * 5, winner=None)
    agg = aggregate([one, two, three])
    assert agg["avg@5"] == pytest.approx((0.4 + 0.8 + 0.0) / 3)
    assert agg["avg@5_stderr"] == pytest.approx(statistics.stdev([0.4, 0.8, 0.0]) / math.sqrt(3))
    assert agg["maj@5"] == pytest.approx(1 / 3)
    assert agg["pass@2"] == pytest.approx((0.7 + 1.0 + 0.0) / 3)
    # A score that is not 0/1 has an average and a majority, no pass@k.
    partial = problem_metrics([0.5, 1.0], winner=0)
    assert partial == {"avg@2": 0.75, "maj@2": 0.5}


def test_sampling_needs_a_temperature():
    assert sampling_gen_kwargs(1, {}) == {}
    assert sampling_gen_kwargs(1, {"temperature": 0}) == {"temperature": 0}
    assert sampling_gen_kwargs(3, {"temperature": 0.7}) == {"temperature": 0.7, "do_sample": True}
    for bad in ({}, {"temperature": 0.0}, {"temperature": 0.7, "do_sample": False}):
        with pytest.raises(UserError, match="--samples 3: sampling needs"):
            sampling_gen_kwargs(3, bad)
    with pytest.raises(UserError, match="--samples"):
        sampling_gen_kwargs(0, {})


def test_kv_cache_bytes_and_batch_cap():
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    assert kv_bytes_per_token(config, 4) == 2 * 2 * 2 * 16 * 4  # K and V, layers, kv heads, dim
    assert batch_cap(1000, 512, 8 * 512_000) == 8
    assert batch_cap(1000, 512, 8 * 512_000 - 1) == 7
    assert batch_cap(1000, 512, 10) == 1


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMATH_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def math_model(tmp_path_factory) -> dict[str, Path]:
    """A tiny model half-trained (100 steps) to answer "The answer is N." to four
    math_local problems: sure enough to be right mostly, unsure enough for samples to
    differ at temperature 0.7."""
    pytest.importorskip("math_verify")
    from mergekit_math.data.math_symbolic import generate, write_jsonl

    root = tmp_path_factory.mktemp("sampling")
    problems = generate(4, seed=3, integer_answers=True)
    data = root / "math.jsonl"
    write_jsonl(problems, data)
    model = train(
        root / "model",
        problems,
        lambda p: f" The answer is {p.answer}.",
        prompt=lambda p: MATH_PROMPT.format(p.problem),
        steps=100,
    )
    return {"model": model, "data": data}


def _rows(folder: Path, task: str) -> list[dict]:
    return [json.loads(x) for x in (folder / f"samples_{task}.jsonl").open()]


def test_samples_math_local_end_to_end(tmp_path, math_model):
    from transformers import AutoTokenizer

    from mergekit_math.eval.boxed import extract_answer
    from mergekit_math.eval.math_score import process_results

    out = tmp_path / "out"
    args = ["eval", math_model["model"], "--tasks", "math_local", "--data", math_model["data"]]
    gen = ["--gen-kwargs", "temperature=0.7,max_gen_toks=24"]
    res = mmath(*args, "--samples", 3, *gen, "-o", out)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    r = doc["results"]["math_local"]
    assert doc["config"]["samples"] == 3 and doc["config"]["gen_kwargs"]["do_sample"] is True
    rows = _rows(out, "math_local")
    assert len(rows) == 4
    tok = AutoTokenizer.from_pretrained(math_model["model"])
    scores, passed, majority_right, tokens = [], [], [], {}
    for row in rows:
        resps = row["resps"][0]
        assert len(resps) == 3
        # Each sample scored again here, through the task's own scoring function.
        mine = [process_results(row["doc"], [t])["math_verify"] for t in resps]
        assert row["sample_scores"]["math_verify"] == mine
        assert mine[0] == row["math_verify"]  # lm-eval's own score is sample 1's
        scores.append(statistics.fmean(mine))
        passed.append(float(any(mine)))
        finals = [extract_answer(t) for t in resps]
        top = max(finals, key=lambda a: (finals.count(a), -finals.index(a)))
        majority_right.append(mine[finals.index(top)])
        counts = [len(tok(t, add_special_tokens=False).input_ids) for t in resps]
        assert row["gen_tokens"] == counts and max(counts) <= 24
        tokens.setdefault(row["doc"]["level"], []).extend(counts)
    assert any(len(set(row["resps"][0])) > 1 for row in rows), "the samples did not differ"
    assert r["math_verify_avg@3,none"] == pytest.approx(statistics.fmean(scores))
    assert r["math_verify_pass@1,none"] == pytest.approx(statistics.fmean(scores))
    assert r["math_verify_pass@3,none"] == pytest.approx(statistics.fmean(passed))
    assert r["math_verify_maj@3,none"] == pytest.approx(statistics.fmean(majority_right))
    assert r["math_verify_avg@3_stderr,none"] == pytest.approx(
        statistics.stdev(scores) / math.sqrt(4)
    )
    all_counts = [c for counts in tokens.values() for c in counts]
    assert doc["mmath"]["cot_lengths"]["math_local"]["mean"] == pytest.approx(
        statistics.fmean(all_counts)
    )
    levels = doc["mmath"]["breakdown"]["math_local"]["level"]
    assert sorted(levels, key=int) == list(levels) == sorted(str(v) for v in tokens)
    for level, counts in tokens.items():
        entry = levels[str(level)]
        assert entry["n"] == len(counts) // 3
        assert entry["tokens_mean"] == pytest.approx(statistics.fmean(counts))
        mine = [s for row, s in zip(rows, scores) if row["doc"]["level"] == level]
        assert entry["math_verify,none"] == pytest.approx(statistics.fmean(mine))
    assert set(doc["mmath"]["breakdown"]["math_local"]["subject"]) == {
        row["doc"]["subject"] for row in rows
    }
    for text in ("math_verify_maj@3", "math_verify_pass@3", "math_local by level"):
        assert text in res.output

    # One greedy sample, the default: lm-eval's metric only, a breakdown, its own cache entry.
    greedy = mmath(*args, "--gen-kwargs", "max_gen_toks=24", "-o", tmp_path / "greedy")
    assert greedy.exit_code == 0 and "from cache" not in greedy.output
    one = json.loads((tmp_path / "greedy" / "results.json").read_text())
    assert not [k for k in one["results"]["math_local"] if "@" in k]
    assert "sample_scores" not in _rows(tmp_path / "greedy", "math_local")[0]
    assert set(one["mmath"]["breakdown"]["math_local"]) == {"level", "subject"}
    again = mmath(*args, "--samples", 3, *gen)
    assert "from cache: math_local" in again.output


def test_samples_gsm8k_filters_end_to_end(tmp_path):
    """The filtered tasks: every sample goes through strict-match and flexible-extract."""
    from mergekit_math.data.gsm_symbolic import generate, write_jsonl

    problems = generate(4, seed=11)
    data = tmp_path / "gsm.jsonl"
    write_jsonl(problems, data)
    model = train(tmp_path / "model", problems, steps=100)
    out = tmp_path / "out"
    res = mmath(
        "eval", model, "--tasks", "gsm8k_local", "--data", data, "--num-fewshot", 0,
        "--samples", 4, "--gen-kwargs", "temperature=0.7,max_gen_toks=12", "-o", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())["results"]["gsm8k_local"]
    for filt in ("strict-match", "flexible-extract"):
        rows = [row for row in _rows(out, "gsm8k_local") if row["filter"] == filt]
        assert len(rows) == 4
        for row in rows:
            assert row["sample_scores"]["exact_match"][0] == row["exact_match"]
            answers = row["sample_answers"]
            assert len(answers) == 4
        avg = statistics.fmean(
            statistics.fmean(row["sample_scores"]["exact_match"]) for row in rows
        )
        assert r[f"exact_match_avg@4,{filt}"] == pytest.approx(avg)
        assert r[f"exact_match_pass@2,{filt}"] >= r[f"exact_match_pass@1,{filt}"]
        assert r[f"exact_match_pass@4,{filt}"] >= r[f"exact_match_pass@2,{filt}"]
        assert 0.0 <= r[f"exact_match_maj@4,{filt}"] <= 1.0


def test_generation_longer_than_the_context_is_refused(tmp_path, math_model):
    res = mmath(
        "eval", math_model["model"], "--tasks", "math_local", "--data", math_model["data"],
        "--gen-kwargs", "max_gen_toks=600",
    )  # fmt: skip
    assert res.exit_code == 2
    assert "max_gen_toks=600 leaves no room for the prompt" in res.output
    assert "context of 512 tokens" in res.output
    bad = mmath(
        "eval", math_model["model"], "--tasks", "math_local", "--data", math_model["data"],
        "--samples", 2,
    )  # fmt: skip
    assert bad.exit_code == 2 and "sampling needs --gen-kwargs temperature" in bad.output


def test_batch_guard_lowers_the_batch(tmp_path, math_model, monkeypatch, capsys):
    from mergekit_math.eval import gen_memory
    from mergekit_math.eval.run import EvalOptions, evaluate

    options = EvalOptions(
        tasks=["math_local"], data=math_model["data"], gen_kwargs={"max_gen_toks": 8}
    )
    plain = evaluate(math_model["model"], options)
    # No room for the cache of even one row: the batch drops to one row.
    monkeypatch.setattr(gen_memory, "free_bytes", lambda device: 1)
    capsys.readouterr()
    guarded = evaluate(math_model["model"], options.model_copy(update={"use_cache": False}))
    err = capsys.readouterr().err
    assert "batch 8 lowered to 1:" in err
    assert (
        guarded.results["math_local"]["math_verify,none"]
        == (plain.results["math_local"]["math_verify,none"])
    )

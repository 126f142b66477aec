"""``BASE+ADAPTER`` model references (a PEFT LoRA merged in as the tensors are read) and
``NAME@REVISION``: against PEFT's ``merge_and_unload`` and the real mergekit 0.1.5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_ulp_close, demo_recipe, load_dir, make_model, mmath, write_recipe
from safetensors.torch import save_file

from mergekit_math.io.model_ref import ModelPath, ModelRef, parse_ref, ref_to_string
from mergekit_math.merge import build_plan, execute
from mergekit_math.recipe import load_recipe

LORA = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
    rank_pattern={"layers.1.self_attn.q_proj": 2},
    alpha_pattern={"v_proj": 3},
)


def make_adapter(base: Path, folder: Path, seed: int = 3, **overrides) -> Path:
    """A PEFT LoRA adapter of ``base`` saved with the real ``peft``, with random non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**{**LORA, **overrides}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(folder)
    return folder


def peft_merged(base: Path, adapter: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_model(root / "base", layers=3)
    return {
        "root": root,
        "base": base,
        "ft": make_model(root / "ft", base=base, seed=1, noise=0.05),
        "adapter": make_adapter(base, root / "adapter"),
    }


# =============================================================================== parsing


def test_parse_refs():
    assert parse_ref("org/m", "x") == ModelRef(ModelPath("org/m"))
    assert parse_ref("org/m@v1+org/a@abc", "x") == ModelRef(
        ModelPath("org/m", "v1"), ModelPath("org/a", "abc")
    )
    assert str(parse_ref("org/m@v1+org/a", "x")) == "org/m@v1+org/a"
    for bad in ("a+b+c", "a@b@c", "a+", "+a", "a@"):
        with pytest.raises(ValueError, match="x: "):
            parse_ref(bad, "x")
    # mergekit's dict form, with strings or {path, revision} inside
    assert ref_to_string({"model": {"path": "o/m", "revision": "r"}, "lora": "o/a"}) == "o/m@r+o/a"
    assert ref_to_string({"model": "o/m@r"}) == "o/m@r"
    assert ref_to_string({"model": "o/m", "other": 1}) == {"model": "o/m", "other": 1}


def test_dict_form_in_a_recipe_is_the_string_form():
    from mergekit_math.recipe import parse_recipe

    r = parse_recipe(
        {
            "merge_method": "linear",
            "base_model": {"model": {"path": "o/b", "revision": "main"}},
            "models": [{"model": {"model": "o/m", "lora": {"path": "o/a", "revision": "v2"}}}],
        }
    )
    assert r.base_model == "o/b@main" and r.models[0].model == "o/m+o/a@v2"


def test_revisions_reach_the_hub_download(lora, tmp_path, monkeypatch):
    import mergekit_math.io.resolve as resolve

    calls = []
    folders = {"org/base": lora["base"], "org/adapter": lora["adapter"]}

    def download(repo_id: str, where: str, revision: str | None = None) -> Path:
        calls.append((repo_id, revision))
        return folders[repo_id]

    monkeypatch.setattr(resolve, "_download", download)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        "merge_method: passthrough\nmodels:\n  - model: org/base@v1.0+org/adapter@0123abc\n",
    )
    res = mmath("merge", recipe, tmp_path / "out", "--dry-run")
    assert res.exit_code == 0, res.output
    assert calls == [("org/base", "v1.0"), ("org/adapter", "0123abc")]
    assert f"org/base@v1.0+org/adapter@0123abc -> {lora['base']}+{lora['adapter']}" in res.output


def test_revision_passed_to_snapshot_download(lora, tmp_path, monkeypatch):
    import huggingface_hub

    seen = []

    def fake(repo_id, revision=None, allow_patterns=None, **kwargs):
        seen.append((repo_id, revision))
        return str(lora["base"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    recipe = write_recipe(
        tmp_path / "r.yaml", "merge_method: passthrough\nmodels:\n  - model: org/base@main\n"
    )
    res = mmath("merge", recipe, tmp_path / "out", "--dry-run")
    assert res.exit_code == 0, res.output
    assert seen == [("org/base", "main")]


# =============================================================================== baking


@pytest.mark.parametrize("method", ["passthrough", "linear"])
def test_single_lora_ref_bakes_the_adapter_like_peft(lora, tmp_path, method):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: {method}\nmodels:\n  - model: {lora['base']}+{lora['adapter']}\n"
        + ("    parameters: {weight: 1.0}\n" if method == "linear" else "")
        + "dtype: float32\n",
    )
    res = mmath("merge", recipe, tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    got = load_dir(tmp_path / "out")
    want = peft_merged(lora["base"], lora["adapter"])
    base = load_dir(lora["base"])
    assert got.keys() == base.keys()
    changed, worst = 0, 0.0
    for name, tensor in got.items():
        worst = max(worst, assert_ulp_close(tensor, want[name], ulps=1.0))
        changed += not torch.equal(tensor, base[name])
    print(f"{method}: max abs diff vs PEFT merge_and_unload {worst:.3g}")
    # q, v, down in 3 layers and the embedding
    assert changed == 3 * 3 + 1
    # the resolved recipe keeps BASE+ADAPTER, absolute, and replays to the same tensors
    resolved = yaml.safe_load((tmp_path / "out" / "mmath_recipe.yaml").read_text())
    assert resolved["models"][0]["model"] == f"{lora['base']}+{lora['adapter']}"
    res = mmath("merge", tmp_path / "out" / "mmath_recipe.yaml", tmp_path / "again", "-q")
    assert res.exit_code == 0, res.output
    again = load_dir(tmp_path / "again")
    assert all(torch.equal(again[n], got[n]) for n in got)


def test_bf16_base_rounds_once_like_peft(tmp_path):
    base = make_model(tmp_path / "base", dtype="bfloat16")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["k_proj", "up_proj"])
    recipe = write_recipe(
        tmp_path / "r.yaml", f"merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\n"
    )
    # in chunks of 300 elements: ranges of a merged tensor come from its one merge
    plan = build_plan(load_recipe(recipe), recipe_dir=recipe.parent)
    execute(plan, tmp_path / "out", progress=False, chunk_elements=300)
    got = load_dir(tmp_path / "out")
    want = peft_merged(base, adapter, dtype=torch.bfloat16)
    for name, tensor in got.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, want[name]), name


# =============================================================================== errors


def _fails(tmp_path: Path, ref: str, *parts: str) -> None:
    recipe = write_recipe(
        tmp_path / "bad.yaml", f"merge_method: passthrough\nmodels:\n  - model: {ref}\n"
    )
    res = mmath("merge", recipe, tmp_path / "bad_out")
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.output
    for p in parts:
        assert p in lines[0], res.output
    assert not (tmp_path / "bad_out").exists()


def test_missing_adapter_folder(lora, tmp_path):
    _fails(
        tmp_path,
        f"{lora['base']}+{tmp_path / 'nope'}",
        "models[0].model: LoRA adapter folder does not exist",
        "nope",
    )


def test_adapter_of_another_shape(lora, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    save_file(
        {  # k_proj is 16 x 32 in the tiny Llama (2 key/value heads)
            "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.ones(2, 32),
            "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.ones(32, 2),
        },
        str(adapter / "adapter_model.safetensors"),
    )
    _fails(
        tmp_path,
        f"{lora['base']}+{adapter}",
        "models[0].model: shape mismatch for model.layers.0.self_attn.k_proj.weight",
        "[16, 32]",
    )


def test_dora_is_refused(lora, tmp_path):
    adapter = tmp_path / "dora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "use_dora": True})
    )
    _fails(tmp_path, f"{lora['base']}+{adapter}", "models[0].model:", "DoRA")


def test_malformed_refs_and_local_revision(lora, tmp_path):
    _fails(tmp_path, "a+b+c", "models[0].model:", "more than one '+'")
    _fails(tmp_path, f"{lora['base']}@v1", "models[0].model:", "local folder", "no revisions")


# =============================================================================== mergekit


def run_mergekit(recipe_text: str, out: Path, cache: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_text))
    options = MergeOptions(
        copy_tokenizer=False, write_model_card=False, quiet=True, lora_merge_cache=str(cache)
    )
    run_merge(config, str(out), options=options)


MIXED = {
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft}
    parameters: {{weight: 0.6}}
  - model: {base}+{adapter}
    parameters: {{weight: [0.2, 0.9]}}
dtype: float32
""",
    "linear": """
merge_method: linear
models:
  - model: {ft}
    parameters: {{weight: 0.3}}
  - model: {{model: {{path: {base}}}, lora: {{path: {adapter}}}}}
    parameters: {{weight: 0.7}}
dtype: float32
""",
    "passthrough": """
merge_method: passthrough
models:
  - model: {base}+{adapter}
dtype: float32
""",
}


@pytest.mark.mergekit
@pytest.mark.parametrize("case", sorted(MIXED))
def test_lora_refs_match_mergekit(lora, tmp_path, case):
    pytest.importorskip("mergekit", reason="mergekit is not installed")
    text = MIXED[case].format(base=lora["base"], ft=lora["ft"], adapter=lora["adapter"])
    run_mergekit(text, tmp_path / "mk", tmp_path / "lora_cache")
    recipe = write_recipe(tmp_path / "r.yaml", text)
    res = mmath("merge", recipe, tmp_path / "mm", "-q")
    assert res.exit_code == 0, res.output
    got, want = load_dir(tmp_path / "mm"), load_dir(tmp_path / "mk")
    assert got.keys() == want.keys()
    worst = max(assert_ulp_close(got[n], want[n], ulps=1.0) for n in want)
    print(f"{case}: max abs diff vs mergekit {worst:.3g}")


@pytest.mark.mergekit
def test_recipe_lora_yaml_matches_mergekit(demo_zoo, tmp_path):
    """recipes/lora.yaml on tiny demo stand-ins and a real PEFT adapter, through both tools
    (float32, as test_mergekit_compat runs the method recipes)."""
    pytest.importorskip("mergekit", reason="mergekit is not installed")
    adapter = make_adapter(demo_zoo["base"], tmp_path / "math_lora")
    text = demo_recipe("lora", demo_zoo).replace("../demo/math_lora", str(adapter))
    text = text.replace("dtype: bfloat16", "dtype: float32")
    assert "../demo" not in text
    run_mergekit(text, tmp_path / "mk", tmp_path / "cache")
    res = mmath("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "mm", "-q")
    assert res.exit_code == 0, res.output
    got, want = load_dir(tmp_path / "mm"), load_dir(tmp_path / "mk")
    assert got.keys() == want.keys()
    worst = max(assert_ulp_close(got[n], want[n], ulps=1.0) for n in want)
    print(f"recipes/lora.yaml: max abs diff vs mergekit {worst:.3g}")


def test_lora_ref_in_slices(lora, tmp_path):
    """Layers taken from BASE+ADAPTER by a slice read merged under their source names."""
    ref = f"{lora['base']}+{lora['adapter']}"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        "merge_method: passthrough\nslices:\n"
        f"  - sources: [{{model: {lora['base']}, layer_range: [0, 1]}}]\n"
        f"  - sources: [{{model: '{ref}', layer_range: [1, 3]}}]\n",
    )
    res = mmath("merge", recipe, tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    got = load_dir(tmp_path / "out")
    merged, base = peft_merged(lora["base"], lora["adapter"]), load_dir(lora["base"])
    for j, (src, layer) in enumerate([(base, 0), (merged, 1), (merged, 2)]):
        for rest in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight"):
            assert torch.equal(got[f"model.layers.{j}.{rest}"], src[f"model.layers.{layer}.{rest}"])
    assert torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_existing_folder_with_plus_in_its_name_is_a_plain_path(lora, tmp_path):
    import shutil

    odd = tmp_path / "a+b@c"
    shutil.copytree(lora["base"], odd)
    recipe = write_recipe(
        tmp_path / "r.yaml", f"merge_method: passthrough\nmodels:\n  - model: {odd}\n"
    )
    res = mmath("merge", recipe, tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    got, base = load_dir(tmp_path / "out"), load_dir(lora["base"])
    assert all(torch.equal(got[n], base[n]) for n in base)


def test_peak_memory_estimate_counts_the_merged_tensors(lora, tmp_path):
    from mergekit_math.merge import estimated_peak_bytes

    def plan_for(ref: str):
        text = f"merge_method: passthrough\nmodels:\n  - model: {ref}\n"
        recipe = write_recipe(tmp_path / "r.yaml", text)
        return build_plan(load_recipe(recipe), recipe_dir=tmp_path)

    plain = plan_for(str(lora["base"]))
    with_lora = plan_for(f"{lora['base']}+{lora['adapter']}")
    # two kept merged embeddings (96 x 32 float32, the largest target) + 3 float32 temporaries
    extra = 2 * 96 * 32 * 4 + 3 * 96 * 32 * 4
    assert estimated_peak_bytes(with_lora) - estimated_peak_bytes(plain) == extra

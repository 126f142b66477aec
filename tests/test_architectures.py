"""Tiny stand-ins of real architectures (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text and
multimodal, Phi-3, Mixtral) merged with representative recipes through mmath and the real
mergekit 0.1.5, compared tensor by tensor (float32: within 1 ulp); the outputs load with
transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import VOCAB, assert_ulp_close, build_tokenizer, load_dir, mmath, write_recipe

TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)


def arch_config(arch: str):
    """A transformers config of ``arch`` with a few tiny layers."""
    import transformers as tf

    if arch == "gemma3vl":
        vision = tf.SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            vision_use_head=False,
        )
        return tf.Gemma3Config(
            text_config=arch_config("gemma3").to_dict(),
            vision_config=vision.to_dict(),
            mm_tokens_per_image=4,
            image_token_index=VOCAB - 1,
            boi_token_index=VOCAB - 3,
            eoi_token_index=VOCAB - 2,
        )
    if arch == "mixtral":
        return tf.MixtralConfig(**TEXT, num_local_experts=3, num_experts_per_tok=2)
    classes = {
        "llama": tf.LlamaConfig,
        "mistral": tf.MistralConfig,
        "qwen2": tf.Qwen2Config,
        "qwen3": tf.Qwen3Config,
        "gemma2": tf.Gemma2Config,
        "gemma3": tf.Gemma3TextConfig,
        "phi3": tf.Phi3Config,
    }
    extra = {"head_dim": 8} if arch in ("qwen3", "gemma2", "gemma3") else {}
    if arch == "gemma3":
        extra["sliding_window"] = 16
    return classes[arch](**TEXT, **extra, tie_word_embeddings=arch in ("qwen3", "gemma2"))


def model_class(arch: str):
    import transformers as tf

    return tf.Gemma3ForConditionalGeneration if arch == "gemma3vl" else tf.AutoModelForCausalLM


def _published_names(folder: Path) -> None:
    """Gemma 3's published checkpoints name the vision tower ``vision_tower.vision_model.*``
    (mergekit's gemma3vl.json expects it; transformers 5 saves ``vision_tower.*`` and reads
    both): rewrite the file as published."""
    from safetensors.torch import save_file

    state = load_dir(folder)
    renamed = {
        "vision_tower.vision_model." + k.removeprefix("vision_tower.")
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
        else k: v
        for k, v in state.items()
    }
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})


def build_arch(root: Path, arch: str) -> dict[str, Path]:
    """A base and two fine-tunes (base + N(0, 0.05)) of a tiny ``arch``, in float32."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = model_class(arch).from_config(arch_config(arch)) if arch != "gemma3vl" else None
    if model is None:
        model = model_class(arch)(arch_config(arch))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    base = root / "base"
    model.save_pretrained(base)
    if arch == "gemma3vl":
        _published_names(base)
    build_tokenizer(base)
    out = {"base": base}
    state = load_dir(base)
    for seed, name in ((1, "a"), (2, "b")):
        shutil.copytree(base, root / name)
        gen = torch.Generator().manual_seed(seed)
        tuned = {k: v + torch.randn(v.shape, generator=gen) * 0.05 for k, v in state.items()}
        save_file(tuned, root / name / "model.safetensors", metadata={"format": "pt"})
        out[name] = root / name
    return out


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3vl", "phi3", "mixtral"]


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory):
    """``get(arch)``: the tiny models of one architecture, built once per module."""
    built: dict[str, dict[str, Path]] = {}

    def get(arch: str) -> dict[str, Path]:
        if arch not in built:
            built[arch] = build_arch(tmp_path_factory.mktemp(arch), arch)
        return built[arch]

    return get


RECIPES = {
    "linear": """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: [0.2, 0.8]}}
  - model: {b}
    parameters: {{weight: 0.5}}
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: [0.3, 0.8]}}
dtype: float32
""",
    "slerp": """
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0.0, 0.5, 1.0]
    - filter: gate
      value: [1.0, 0.5, 0.0]
    - value: 0.3
dtype: float32
""",
    # Three layers out: mergekit 0.1.5 keeps the inputs' `layer_types` when the layer count changes
    # (transformers 5 then refuses its config); mmath's stacked configs are tested below.
    "passthrough": """
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
  - sources:
      - model: {b}
        layer_range: [1, 2]
dtype: float32
""",
}
# mergekit merges a multi-module model's slices only through `modules:` (tested below).
CASES = [(a, r) for a in ARCHS for r in RECIPES if not (a == "gemma3vl" and r == "passthrough")]


def run_mergekit(recipe_text: str, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_text))
    run_merge(
        config,
        str(out),
        options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )


def compare(ours: Path, theirs: Path) -> float:
    """Same tensor names, dtypes and shapes; values within 1 ulp. Returns the max abs diff."""
    return compare_tensors(load_dir(ours), load_dir(theirs))


def compare_tensors(got: dict, ref: dict) -> float:
    assert set(got) == set(ref), (sorted(set(got) ^ set(ref)))[:5]
    worst = 0.0
    for name in sorted(ref):
        assert got[name].dtype == ref[name].dtype, name
        assert got[name].shape == ref[name].shape, name
        worst = max(worst, assert_ulp_close(got[name], ref[name], ulps=1))
    return worst


def compare_moe(ours: Path, theirs: Path, recipe: str) -> float:
    """mergekit 0.1.5 writes Mixtral's experts fused (``mlp.experts.gate_up_proj``, as
    transformers 5 holds them); mmath keeps the checkpoint's per-expert tensors. Both load
    into the same transformers model, compared there. TIES's top-k and SLERP's angle span
    all experts of a layer in mergekit's fused tensor and one expert in mmath's (the tensors
    the checkpoint has), so for those the expert weights are left out of the comparison.
    (Filters see the names each tool plans: mergekit's ``mlp.gate`` is mmath's
    ``block_sparse_moe.gate``; the slerp recipe filters on ``gate``, in both.)"""
    cls = model_class("mixtral")
    got = cls.from_pretrained(ours, dtype=torch.float32).state_dict()
    ref = cls.from_pretrained(theirs, dtype=torch.float32).state_dict()
    if recipe in ("ties", "slerp"):
        got = {k: v for k, v in got.items() if ".experts." not in k}
        ref = {k: v for k, v in ref.items() if ".experts." not in k}
    return compare_tensors(got, ref)


# Published Gemma 3 names -> transformers 5's module names.
RENAMES = (
    ("language_model.model.", "model.language_model."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def assert_loads(arch: str, folder: Path) -> None:
    """transformers loads the output with every weight from its files (none missing, none
    unexpected), the values as written, and runs it."""
    model, info = model_class(arch).from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = model.state_dict()
    for name, tensor in load_dir(folder).items():
        if arch == "mixtral" and ".block_sparse_moe." in name:
            continue  # renamed and fused on load (compared through compare_moe)
        for old, new in RENAMES if arch == "gemma3vl" else ():
            name = new + name.removeprefix(old) if name.startswith(old) else name
        assert torch.equal(state[name], tensor), name
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 4, VOCAB) and torch.isfinite(logits).all()


@pytest.mark.mergekit
@pytest.mark.parametrize(("arch", "recipe"), CASES)
def test_same_tensors_as_mergekit(tmp_path, arch_models, arch, recipe):
    pytest.importorskip("mergekit")
    text = RECIPES[recipe].format(**arch_models(arch))
    ours, theirs = tmp_path / "mmath", tmp_path / "mergekit"
    res = mmath("merge", write_recipe(tmp_path / "r.yaml", text), ours, "-q")
    assert res.exit_code == 0, res.output
    run_mergekit(text, theirs)
    worst = compare_moe(ours, theirs, recipe) if arch == "mixtral" else compare(ours, theirs)
    print(f"{arch}/{recipe}: max abs diff vs mergekit = {worst:.3g}")
    assert_loads(arch, ours)


STACKED = """
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
  - sources:
      - model: {b}
        layer_range: [1, 3]
dtype: float32
"""


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gemma3vl"])
def test_stacked_layers_load(tmp_path, arch_models, arch):
    """Four layers out of three-layer inputs: the layers are the sources' (renumbered), the
    config's layer count and per-layer lists (``layer_types``) follow, transformers loads it."""
    models = arch_models(arch)
    out = tmp_path / "out"
    res = mmath("merge", write_recipe(tmp_path / "r.yaml", STACKED.format(**models)), out, "-q")
    assert res.exit_code == 0, res.output
    got, a, b = load_dir(out), load_dir(models["a"]), load_dir(models["b"])
    sources = {0: (a, 0), 1: (a, 1), 2: (b, 1), 3: (b, 2)}
    for name, tensor in got.items():
        if ".layers." in name:
            head, rest = name.split(".layers.", 1)
            index, tail = rest.split(".", 1)
            state, src = sources[int(index)]
            assert torch.equal(tensor, state[f"{head}.layers.{src}.{tail}"]), name
        else:  # embeddings from the first slice, final norm and lm_head from the last
            assert torch.equal(tensor, (a if "embed" in name else b)[name]), name
    config = model_class(arch).from_pretrained(out).config
    assert config.num_hidden_layers == 4
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        original = model_class(arch).from_pretrained(models["a"]).config.layer_types
        assert list(layer_types) == [original[i] for i in (0, 1, 1, 2)]
    assert_loads(arch, out)


MODULES = {
    # The text decoder slerped (its own t for the MLPs, the recipe's t for the rest), the
    # projector taken from `a` and the vision tower from the base.
    "slerp": """
merge_method: slerp
base_model: {base}
modules:
  text_decoder:
    models:
      - model: {base}
      - model: {a}
    parameters:
      t:
        - filter: mlp
          value: [0.0, 1.0]
  multi_modal_projector:
    models:
      - model: {base}
      - model: {a}
    parameters: {{t: 1.0}}
  vision_tower:
    models:
      - model: {base}
      - model: {a}
    parameters: {{t: 0.0}}
parameters:
  t:
    - filter: self_attn
      value: [0.2, 0.8]
    - value: 0.5
dtype: float32
""",
    # Layers of two models stacked in the text decoder, the vision tower from one model.
    "passthrough": """
merge_method: passthrough
modules:
  text_decoder:
    slices:
      - sources:
          - model: {a}
            layer_range: [0, 2]
      - sources:
          - model: {b}
            layer_range: [1, 2]
  multi_modal_projector:
    models:
      - model: {b}
  vision_tower:
    slices:
      - sources:
          - model: {a}
            layer_range: [0, 2]
dtype: float32
""",
}


# recipes/modules_gemma3.yaml with the tiny stand-ins for its Hub models, in float32.
MODULES["recipe"] = (
    (Path(__file__).resolve().parents[1] / "recipes" / "modules_gemma3.yaml")
    .read_text()
    .replace("{", "{{")
    .replace("}", "}}")
    .replace("google/gemma-3-4b-pt", "{base}")
    .replace("google/gemma-3-4b-it", "{a}")
    .replace("dtype: bfloat16", "dtype: float32")
)


@pytest.mark.mergekit
@pytest.mark.parametrize("case", sorted(MODULES))
def test_modules_same_tensors_as_mergekit(tmp_path, arch_models, case):
    pytest.importorskip("mergekit")
    models = arch_models("gemma3vl")
    ours, theirs = tmp_path / "mmath", tmp_path / "mergekit"
    # mmath's recipe names the models relative to its folder (resolved in mmath_recipe.yaml)
    root = models["base"].parent
    relative = MODULES[case].format(**{k: v.name for k, v in models.items()})
    res = mmath("merge", write_recipe(root / f"modules_{case}.yaml", relative), ours, "-q")
    assert res.exit_code == 0, res.output
    run_mergekit(MODULES[case].format(**models), theirs)
    worst = compare(ours, theirs)
    print(f"gemma3vl modules/{case}: max abs diff vs mergekit = {worst:.3g}")
    # The resolved recipe written with the output rebuilds it from anywhere.
    replay = tmp_path / "elsewhere" / "r.yaml"
    replay.parent.mkdir()
    shutil.copy(ours / "mmath_recipe.yaml", replay)
    assert mmath("merge", replay, tmp_path / "replay", "-q").exit_code == 0
    assert compare(tmp_path / "replay", ours) == 0
    got, base, a = load_dir(ours), load_dir(models["base"]), load_dir(models["a"])
    vision = [n for n in got if n.startswith("vision_tower.")]
    kept = a if case == "passthrough" else base
    assert vision and all(torch.equal(got[n], kept[n]) for n in vision)
    if case == "slerp":
        assert all(torch.equal(got[n], a[n]) for n in got if n.startswith("multi_modal"))
    assert_loads("gemma3vl", ours)


def test_modules_stacked_text_decoder(tmp_path, arch_models):
    """Four text layers out of three: text_config's layer count and layer_types follow; the
    vision tower keeps its own count."""
    models = arch_models("gemma3vl")
    text = MODULES["passthrough"].format(**models).replace("[1, 2]", "[1, 3]")
    out = tmp_path / "out"
    res = mmath("merge", write_recipe(tmp_path / "r.yaml", text), out, "-q")
    assert res.exit_code == 0, res.output
    config = model_class("gemma3vl").from_pretrained(out).config
    original = model_class("gemma3vl").from_pretrained(models["a"]).config
    assert config.text_config.num_hidden_layers == 4
    assert config.vision_config.num_hidden_layers == original.vision_config.num_hidden_layers
    expect = [original.text_config.layer_types[i] for i in (0, 1, 1, 2)]
    assert list(config.text_config.layer_types) == expect
    got, b = load_dir(out), load_dir(models["b"])
    assert torch.equal(
        got["language_model.model.layers.3.mlp.up_proj.weight"],
        b["language_model.model.layers.2.mlp.up_proj.weight"],
    )
    assert_loads("gemma3vl", out)


@pytest.mark.parametrize(
    ("arch", "edit", "expected"),
    [
        (
            "gemma3vl",
            ("vision_tower:", "vision_towr:"),
            "modules.vision_towr: unknown module of Gemma3ForConditionalGeneration; its "
            "modules: text_decoder, multi_modal_projector, vision_tower",
        ),
        ("gemma3vl", ("  vision_tower:", "  vision_tower_unused:"), "unknown module"),
        ("llama", ("", ""), "has a single module; use models or slices"),
    ],
)
def test_modules_refused(tmp_path, arch_models, arch, edit, expected):
    text = MODULES["passthrough"].format(**arch_models(arch)).replace(*edit)
    res = mmath("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "out")
    assert res.exit_code == 2
    assert expected in res.output, res.output


def test_multimodal_slices_need_modules(tmp_path, arch_models):
    text = STACKED.format(**arch_models("gemma3vl"))
    res = mmath("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "out")
    assert res.exit_code == 2
    assert "slices: Gemma3ForConditionalGeneration has several modules" in res.output


def test_missing_module_refused(tmp_path, arch_models):
    text = MODULES["passthrough"].format(**arch_models("gemma3vl"))
    text = text.replace("  multi_modal_projector:\n    models:\n      - model:", "  x:\n    y:\n")
    cut = text.index("  x:")
    text = text[:cut] + text[text.index("  vision_tower:") :]
    res = mmath("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "out")
    assert res.exit_code == 2
    assert "modules: multi_modal_projector missing" in res.output, res.output


def test_multimodal_transformers5_names(tmp_path, arch_models):
    """A multimodal Gemma 3 as transformers 5 saves a new one (``vision_tower.encoder...``, no
    ``vision_model``): the same modules, the same merge as the published names give."""
    from safetensors.torch import save_file

    models = arch_models("gemma3vl")
    resaved = {}
    for key in ("a", "b"):
        shutil.copytree(models[key], tmp_path / key)
        state = {
            k.replace("vision_tower.vision_model.", "vision_tower."): v
            for k, v in load_dir(models[key]).items()
        }
        save_file(state, tmp_path / key / "model.safetensors", metadata={"format": "pt"})
        resaved[key] = tmp_path / key
    outs = []
    for name, paths in (("published", models), ("t5", resaved)):
        text = RECIPES["linear"].format(**paths)
        res = mmath("merge", write_recipe(tmp_path / f"{name}.yaml", text), tmp_path / name, "-q")
        assert res.exit_code == 0, res.output
        outs.append(load_dir(tmp_path / name))
    published = {
        k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in outs[0].items()
    }
    assert compare_tensors(outs[1], published) == 0
    assert_loads("gemma3vl", tmp_path / "t5")

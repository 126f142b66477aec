"""Every validation error: one line naming the YAML path or file and tensor, exit code 2,
nothing written, and no tensor read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_dir, make_model, write_recipe
from typer.testing import CliRunner

from mergekit_math.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_tensor_reads(monkeypatch):
    """Validation must finish before the first tensor is read."""
    from mergekit_math.io.reader import Checkpoint

    def forbidden(self, name):
        raise AssertionError(f"tensor {name} read during validation")

    monkeypatch.setattr(Checkpoint, "read", forbidden)


def fails(tmp_path: Path, recipe_text: str, *expected: str) -> str:
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_text)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return lines[0]


def two_models(
    zoo,
    method="ties",
    a_params="{weight: 0.5, density: 0.5}",
    b_params="{weight: 0.5, density: 0.5}",
    extra="",
    a=None,
    b=None,
) -> str:
    return f"""
merge_method: {method}
base_model: {zoo["base"]}
models:
  - model: {a or zoo["a"]}
    parameters: {a_params}
  - model: {b or zoo["b"]}
    parameters: {b_params}
{extra}
"""


def test_unknown_method(tmp_path, zoo):
    fails(tmp_path, two_models(zoo, method="tise"), "merge_method", "'tise'", "did you mean 'ties'")


def test_unknown_parameter(tmp_path, zoo):
    fails(
        tmp_path,
        two_models(zoo, b_params="{weight: 0.5, densty: 0.5}"),
        "models[1].parameters.densty",
        "unknown parameter 'densty'",
        "did you mean 'density'",
    )


def test_unknown_top_level_key(tmp_path, zoo):
    fails(tmp_path, two_models(zoo, extra="merge_methd: ties"), "unknown key 'merge_methd'")


def test_unknown_key_in_model_entry(tmp_path, zoo):
    text = two_models(zoo).replace(
        "    parameters: {weight: 0.5, density: 0.5}\n  - model",
        "    paramters: {weight: 0.5}\n  - model",
        1,
    )
    fails(tmp_path, text, "models[0]", "unknown key 'paramters'")


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_density_outside_unit_interval(tmp_path, zoo, value):
    fails(
        tmp_path,
        two_models(zoo, b_params=f"{{weight: 0.5, density: {value}}}"),
        "models[1].parameters.density",
    )


def test_density_in_a_gradient_is_checked(tmp_path, zoo):
    fails(
        tmp_path,
        two_models(zoo, a_params="{weight: 0.5, density: [0.5, 2.0]}"),
        "models[0].parameters.density",
        "2.0",
    )


def test_missing_weight(tmp_path, zoo):
    fails(
        tmp_path,
        two_models(zoo, a_params="{density: 0.5}"),
        "models[0].parameters.weight",
        "missing required parameter 'weight'",
    )


def test_missing_t_for_slerp(tmp_path, zoo):
    text = f"""
merge_method: slerp
base_model: {zoo["base"]}
models:
  - model: {zoo["a"]}
"""
    fails(tmp_path, text, "parameters.t", "missing required parameter 't'")


def test_shared_parameter_at_model_level(tmp_path, zoo):
    fails(
        tmp_path,
        two_models(zoo, a_params="{weight: 0.5, normalize: false}"),
        "models[0].parameters.normalize",
        "top-level",
    )


def test_method_needs_base_model(tmp_path, zoo):
    text = f"""
merge_method: task_arithmetic
models:
  - model: {zoo["a"]}
    parameters: {{weight: 1}}
"""
    fails(tmp_path, text, "base_model", "task_arithmetic needs a base_model")


def test_missing_path(tmp_path, zoo):
    text = two_models(zoo, b=str(tmp_path / "nope"))
    fails(tmp_path, text, "models[1].model", "does not exist", "nope")


def test_hub_id_offline_is_a_clear_error(tmp_path, zoo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = two_models(zoo, b="nobody-here/not-a-model")
    fails(tmp_path, text, "models[1].model", "'nobody-here/not-a-model'", "could not be fetched")


def test_folder_without_config(tmp_path, zoo):
    broken = tmp_path.parent / f"{tmp_path.name}-noconfig"
    shutil.copytree(zoo["a"], broken)
    (broken / "config.json").unlink()
    text = two_models(zoo, a=str(broken))
    fails(tmp_path, text, "models[0].model", "no config.json")


def test_folder_without_weights(tmp_path, zoo):
    broken = tmp_path.parent / f"{tmp_path.name}-noweights"
    shutil.copytree(zoo["a"], broken)
    (broken / "model.safetensors").unlink()
    text = two_models(zoo, a=str(broken))
    fails(tmp_path, text, "models[0].model", "no weights")


def test_different_architectures(tmp_path, zoo):
    qwen = make_model(tmp_path.parent / f"{tmp_path.name}-qwen", arch="qwen2")
    text = two_models(zoo, b=str(qwen))
    fails(
        tmp_path,
        text,
        "models[1]",
        "different architectures",
        "Qwen2ForCausalLM",
        "LlamaForCausalLM",
    )


def test_different_tensor_sets(tmp_path, zoo):
    deeper = make_model(tmp_path.parent / f"{tmp_path.name}-deep", layers=4)
    text = two_models(zoo, b=str(deeper))
    fails(tmp_path, text, "models[1]", "different tensor sets", "model.layers.3.")


def test_missing_tensor(tmp_path, zoo):
    shallow = make_model(tmp_path.parent / f"{tmp_path.name}-shallow", layers=2)
    text = two_models(zoo, b=str(shallow))
    fails(tmp_path, text, "models[1]", "different tensor sets", "no tensor model.layers.2.")


def test_different_shapes_name_the_tensor_and_both_shapes(tmp_path, zoo):
    from safetensors.torch import load_file, save_file

    wide = tmp_path.parent / f"{tmp_path.name}-wide"
    shutil.copytree(zoo["a"], wide)
    state = load_file(wide / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    state[name] = state[name][:48].clone()
    save_file(state, wide / "model.safetensors", metadata={"format": "pt"})
    text = two_models(zoo, b=str(wide))
    fails(tmp_path, text, "models[1]", name, "[48, 32]", "[64, 32]")


def test_different_vocabulary_sizes(tmp_path, zoo):
    from safetensors.torch import load_file, save_file

    big = tmp_path.parent / f"{tmp_path.name}-vocab"
    shutil.copytree(zoo["a"], big)
    cfg = json.loads((big / "config.json").read_text())
    cfg["vocab_size"] = 100
    (big / "config.json").write_text(json.dumps(cfg))
    state = load_file(big / "model.safetensors")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        state[k] = state[k].new_zeros((100, state[k].shape[1]))
    save_file(state, big / "model.safetensors", metadata={"format": "pt"})
    text = two_models(zoo, b=str(big))
    fails(tmp_path, text, "models[1]", "different vocabulary sizes", "100", "96")


def test_slerp_takes_exactly_one_other_model(tmp_path, zoo):
    text = two_models(
        zoo, method="slerp", a_params="{}", b_params="{}", extra="parameters: {t: 0.5}"
    )
    fails(tmp_path, text, "slerp takes exactly 1")


def test_origin_refused_for_non_delta_methods(tmp_path, zoo):
    text = f"""
merge_method: linear
models:
  - model: {zoo["a"]}
    origin: {zoo["base"]}
    parameters: {{weight: 1}}
"""
    fails(tmp_path, text, "models[0].origin", "only delta methods")


def test_layer_range_outside_model(tmp_path, zoo):
    text = f"""
merge_method: passthrough
slices:
  - sources:
      - model: {zoo["a"]}
        layer_range: [0, 5]
"""
    fails(tmp_path, text, "slices[0].sources[0].layer_range", "3 layers")


def test_paper_rescale_refused_for_ties(tmp_path, zoo):
    fails(
        tmp_path,
        two_models(zoo, extra="parameters: {rescale: paper}"),
        "parameters",
        "random drops",
    )


def test_bad_yaml_and_missing_recipe(tmp_path):
    res = runner.invoke(app, ["merge", str(tmp_path / "none.yaml"), str(tmp_path / "o")])
    assert res.exit_code == 2 and "recipe not found" in res.output
    bad = write_recipe(tmp_path / "bad.yaml", "merge_method: [unclosed\n")
    res = runner.invoke(app, ["merge", str(bad), str(tmp_path / "o")])
    assert res.exit_code == 2 and "not valid YAML" in res.output


def test_both_models_and_slices(tmp_path, zoo):
    text = (
        two_models(zoo) + f"slices:\n  - sources:\n      - model: {zoo['a']}\n"
        "        layer_range: [0, 1]\n"
    )
    fails(tmp_path, text, "exactly one of 'models' or 'slices'")


def test_bad_cli_values(tmp_path, zoo):
    recipe = write_recipe(tmp_path / "r.yaml", two_models(zoo))
    res = runner.invoke(
        app, ["merge", str(recipe), str(tmp_path / "o"), "--out-shard-size", "lots"]
    )
    assert res.exit_code == 2 and "--out-shard-size" in res.output
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "o"), "--device", "tpu"])
    assert res.exit_code == 2 and "--device" in res.output


def test_unknown_chat_template_name(tmp_path, zoo):
    fails(tmp_path, two_models(zoo, extra="chat_template: chatmlx"), "chat_template", "'chatmlx'")


def test_hub_id_is_fetched_with_weights_only_patterns(tmp_path, zoo, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(zoo["b"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    recipe = write_recipe(tmp_path / "recipe.yaml", two_models(zoo, b="someorg/some-model"))
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert calls and calls[0][0] == "someorg/some-model"
    patterns = calls[0][1]
    assert "*.safetensors" in patterns and "*.json" in patterns
    assert not any("bin" in p or "pt" == p.rsplit(".", 1)[-1] for p in patterns)


def test_cuda_requested_without_a_gpu(tmp_path, zoo):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    recipe = write_recipe(tmp_path / "recipe.yaml", two_models(zoo))
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--device", "cuda"])
    assert res.exit_code == 2 and "no CUDA device" in res.output
    assert not (tmp_path / "out").exists()


def test_della_epsilon_beyond_density(tmp_path, zoo):
    fails(
        tmp_path,
        two_models(zoo, method="della", b_params="{weight: 0.5, density: 0.5, epsilon: 0.6}"),
        "models[1].parameters.epsilon",
        "0.5 ± 0.6",
    )


def test_linear_weights_summing_to_zero(tmp_path, zoo):
    # no base_model: for linear it would be one more input (as in mergekit), with no weight
    text = two_models(zoo, method="linear", a_params="{weight: 1}", b_params="{weight: -1}")
    fails(
        tmp_path,
        text.replace(f"base_model: {zoo['base']}\n", ""),
        "parameters.normalize",
        "sum to zero",
    )


def test_base_model_of_a_method_without_base_is_one_more_input(tmp_path, zoo):
    """As mergekit: linear with an unlisted base_model averages it too, so it needs a weight."""
    text = two_models(zoo, method="linear", a_params="{weight: 1}", b_params="{weight: 1}")
    fails(tmp_path, text, "base_model.parameters.weight", "missing required parameter 'weight'")
    recipe = write_recipe(tmp_path / "r.yaml", text + "parameters: {weight: 1}\n")
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    got = load_dir(tmp_path / "out")
    models = [load_dir(zoo[k]) for k in ("a", "b", "base")]
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, sum(m[name] for m in models) / 3)


def test_ignored_parameter_warns(tmp_path, zoo):
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        two_models(zoo, method="task_arithmetic"),
    )
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0
    assert (
        "warning: models[0].parameters.density: 'density' has no effect for task_arithmetic"
        in res.output
    )


def test_relative_path_found_in_two_places_is_ambiguous(tmp_path, zoo, monkeypatch):
    import shutil

    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    shutil.copytree(zoo["a"], recipe_dir / "m")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    shutil.copytree(zoo["b"], cwd / "m")
    monkeypatch.chdir(cwd)
    recipe = write_recipe(recipe_dir / "r.yaml", two_models(zoo, a="m"))
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "models[0].model" in res.output and "ambiguous" in res.output


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_recipes_parse_and_open_with_their_command(path):
    from mergekit_math.stages import load_staged

    recipe = load_staged(path).target().recipe  # the output document of a multi-stage recipe
    # Opens with the commands that run it (STYLE.md 8).
    head = [line for line in path.read_text().splitlines() if line.startswith("# mmath ")]
    assert any(line.startswith(f"# mmath merge recipes/{path.name} ") for line in head)
    assert recipe.merge_method

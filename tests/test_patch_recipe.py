"""Patches as recipe inputs (``- patch: PATH``): the engine reads their deltas, so porting
several fine-tunes onto a new base with TIES or DARE is one recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_dir, make_model, mmath, write_recipe


@pytest.fixture(scope="module")
def ported(tmp_path_factory) -> dict[str, Path]:
    """OLD, two fine-tunes of it, NEW (an evolved OLD), and the fine-tunes' patches."""
    root = tmp_path_factory.mktemp("ported")
    old = make_model(root / "old", seed=0)
    paths = {
        "old": old,
        "ft_a": make_model(root / "ft_a", base=old, seed=1),
        "ft_b": make_model(root / "ft_b", base=old, seed=2),
        "new": make_model(root / "new", base=old, seed=3, noise=0.05),
        "root": root,
    }
    for name, encoding in (("a", "dense"), ("b", "lowrank")):
        out = root / f"patch_{name}"
        res = mmath(
            "patch", "extract", "--base", old, "--finetuned", paths[f"ft_{name}"], "-o", out,
            "--encoding", encoding, "--rank", "8", "-q",
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        paths[f"patch_{name}"] = out
    return paths


def test_patch_entry_equals_patch_apply(tmp_path, ported):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: task_arithmetic\nbase_model: {ported['new']}\nmodels:\n"
        f"  - patch: {ported['patch_a']}\n    parameters: {{weight: 1.0}}\n",
    )
    assert mmath("merge", recipe, tmp_path / "merged", "-q").exit_code == 0
    res = mmath(
        "patch", "apply", "--patch", ported["patch_a"], "--base", ported["new"],
        "-o", tmp_path / "applied", "-q",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    merged, applied = load_dir(tmp_path / "merged"), load_dir(tmp_path / "applied")
    assert merged.keys() == applied.keys()
    for name in merged:
        assert torch.equal(merged[name], applied[name]), name
    # and that is NEW + (FT - OLD): the patch really moved the new base
    new, ft, old = load_dir(ported["new"]), load_dir(ported["ft_a"]), load_dir(ported["old"])
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], new[name] + (ft[name] - old[name]))


@pytest.mark.parametrize("chunk", [None, 997])
def test_ties_over_two_patches_equals_ties_over_the_rebuilt_models(tmp_path, ported, chunk):
    """TIES over patches = TIES over NEW + Δ models with origin NEW, up to the rounding of
    rebuilding the models (fp32: within a few ulps)."""
    from mergekit_math.merge import build_plan, execute
    from mergekit_math.recipe import load_recipe

    params = "{weight: 0.5, density: 0.4}"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {ported['new']}\nmodels:\n"
        f"  - patch: {ported['patch_a']}\n    parameters: {params}\n"
        f"  - patch: {ported['patch_b']}\n    parameters: {params}\n",
    )
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    kwargs = {"chunk_elements": chunk} if chunk else {}
    execute(plan, tmp_path / "out", progress=False, **kwargs)
    merged = load_dir(tmp_path / "out")
    # reference: the merge computed here from the decoded deltas
    from mergekit_math.methods import MergeInputs, get_method
    from mergekit_math.patch import Patch

    method = get_method("ties")
    model = method.model_params(weight=0.5, density=0.4)
    patches = [Patch.open(ported["patch_a"]), Patch.open(ported["patch_b"])]
    new = load_dir(ported["new"])
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        deltas = [
            p.delta(name) if name in p.tensors else torch.zeros_like(new[name]) for p in patches
        ]
        expect = method.merge(
            MergeInputs(
                base=new[name].float(),
                tensors=deltas,
                params=[model, model],
                shared=method.shared_params(),
            )
        )
        assert torch.equal(merged[name], expect.to(merged[name].dtype)), name
    card = (tmp_path / "out" / "mmath_recipe.yaml").read_text()
    assert str(ported["patch_a"].resolve()) in card


def test_patch_entries_are_checked_before_reading(tmp_path, ported):
    other = make_model(tmp_path / "qwen", arch="qwen2", seed=0)
    cases = {
        "arch": (
            f"merge_method: ties\nbase_model: {other}\nmodels:\n"
            f"  - patch: {ported['patch_a']}\n    parameters: {{weight: 1, density: 0.5}}\n",
            "models[0].patch: ",
        ),
        "missing": (
            f"merge_method: ties\nbase_model: {ported['new']}\nmodels:\n"
            f"  - patch: {tmp_path / 'nope'}\n    parameters: {{weight: 1, density: 0.5}}\n",
            "models[0].patch: patch folder does not exist",
        ),
        "both": (
            f"merge_method: ties\nbase_model: {ported['new']}\nmodels:\n"
            f"  - patch: {ported['patch_a']}\n    model: {ported['ft_a']}\n"
            f"    parameters: {{weight: 1, density: 0.5}}\n",
            "give exactly one of model and patch",
        ),
        "origin": (
            f"merge_method: ties\nbase_model: {ported['new']}\nmodels:\n"
            f"  - patch: {ported['patch_a']}\n    origin: {ported['old']}\n"
            f"    parameters: {{weight: 1, density: 0.5}}\n",
            "takes no origin",
        ),
        "method": (
            f"merge_method: linear\nmodels:\n  - patch: {ported['patch_a']}\n"
            f"    parameters: {{weight: 1}}\n",
            "only delta methods",
        ),
    }
    for case, (text, needle) in cases.items():
        recipe = write_recipe(tmp_path / f"{case}.yaml", text)
        out = tmp_path / f"out_{case}"
        res = mmath("merge", recipe, out)
        assert res.exit_code == 2, (case, res.output)
        assert needle in res.output, (case, res.output)
        assert not out.exists()

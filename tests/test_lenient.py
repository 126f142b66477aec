"""Recipes written for mergekit: parameters that have no effect for the method are accepted
with a warning; unknown parameters and keys are errors, or warnings with --lenient."""

from __future__ import annotations

import pytest
import torch
from conftest import load_dir, mmath, write_recipe

MEASURED = {
    # method -> (recipe without the ignored key, the key's YAML line to add, its YAML path)
    "model_stock": (
        "merge_method: model_stock\nbase_model: {base}\nmodels:\n"
        "  - model: {a}\n{extra}  - model: {b}\n",
        "    parameters: {weight: 0.7}\n",
        "models[0].parameters.weight",
    ),
    "slerp": (
        "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\n"
        "parameters: {{t: [0.2, 0.8]{extra}}}\n",
        ", normalize: true",
        "parameters.normalize",
    ),
    "dare_ties": (
        "merge_method: dare_ties\nbase_model: {base}\nseed: 7\nmodels:\n"
        "  - model: {a}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        "  - model: {b}\n    parameters: {{weight: 0.4, density: 0.7}}\n"
        "parameters: {{normalize: true{extra}}}\n",
        ", int_space: true",
        "parameters.int_space",
    ),
}


def _warnings(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("warning:")]


@pytest.mark.parametrize("method", sorted(MEASURED))
def test_no_effect_parameter_warns_and_changes_nothing(tmp_path, zoo, method):
    text, extra, path = MEASURED[method]
    plain = write_recipe(tmp_path / "plain.yaml", text.format(extra="", **zoo))
    extended = write_recipe(tmp_path / "ext.yaml", text.format(extra=extra, **zoo))
    res = mmath("merge", extended, tmp_path / "ext", "-q")
    assert res.exit_code == 0, res.output
    key = path.rsplit(".", 1)[1]
    (line,) = [w for w in _warnings(res.output) if path in w]
    assert f"{key!r} has no effect for {method}" in line
    assert mmath("merge", plain, tmp_path / "plain", "-q").exit_code == 0
    got, ref = load_dir(tmp_path / "ext"), load_dir(tmp_path / "plain")
    assert set(got) == set(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_no_effect_parameter_is_still_an_error_for_other_methods(tmp_path, zoo):
    """The table is per method: ``int_space`` on ties is an unknown parameter."""
    text = (
        MEASURED["dare_ties"][0]
        .replace("dare_ties", "ties")
        .format(extra=", int_space: true", **zoo)
    )
    res = mmath("merge", write_recipe(tmp_path / "r.yaml", text), tmp_path / "out")
    assert res.exit_code == 2
    assert "parameters.int_space: unknown parameter 'int_space' for ties" in res.output


LINEAR = """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.3{param}}}
  - model: {b}
    parameters: {{weight: 0.7}}
dtype: float32
{extra}"""


@pytest.mark.parametrize(
    ("param", "extra", "path", "message"),
    [
        (", wieght: 0.5", "", "models[0].parameters.wieght", "did you mean 'weight'"),
        ("", "merge_metod: ties\n", "merge_metod", "unknown key 'merge_metod'"),
        ("", "model_name: my-merge\n", "model_name", "unknown key 'model_name'"),
    ],
)
def test_unknown_names_error_then_warn_with_lenient(tmp_path, zoo, param, extra, path, message):
    recipe = write_recipe(tmp_path / "r.yaml", LINEAR.format(param=param, extra=extra, **zoo))
    res = mmath("merge", recipe, tmp_path / "strict")
    assert res.exit_code == 2
    (line,) = [ln for ln in res.output.splitlines() if ln.strip()]
    assert path in line and message in line and "--lenient" in line, line
    assert not (tmp_path / "strict").exists()

    res = mmath("merge", recipe, tmp_path / "lenient", "-q", "--lenient")
    assert res.exit_code == 0, res.output
    (line,) = _warnings(res.output)
    assert path in line and message in line and "ignored (--lenient)" in line, line
    # The resolved recipe written with the output replays without --lenient.
    replay = mmath("merge", tmp_path / "lenient" / "mmath_recipe.yaml", tmp_path / "replay", "-q")
    assert replay.exit_code == 0, replay.output
    assert not _warnings(replay.output)
    plain = write_recipe(tmp_path / "p.yaml", LINEAR.format(param="", extra="", **zoo))
    assert mmath("merge", plain, tmp_path / "plain", "-q").exit_code == 0
    got, ref = load_dir(tmp_path / "lenient"), load_dir(tmp_path / "plain")
    assert set(got) == set(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_lenient_still_refuses_bad_values(tmp_path, zoo):
    """--lenient forgives names, never values."""
    recipe = write_recipe(
        tmp_path / "r.yaml", LINEAR.format(param=", foo: 1", extra="dtype: float7\n", **zoo)
    )
    res = mmath("merge", recipe, tmp_path / "out", "--lenient")
    assert res.exit_code == 2
    assert "dtype" in res.output


def test_dry_run_lenient_warns(tmp_path, zoo):
    recipe = write_recipe(
        tmp_path / "r.yaml", LINEAR.format(param=", int8_masc: true", extra="", **zoo)
    )
    res = mmath("merge", recipe, tmp_path / "out", "--dry-run", "--lenient")
    assert res.exit_code == 0, res.output
    assert "models[0].parameters.int8_masc: unknown parameter" in res.output
    assert "dry run: nothing was read or written" in res.output


@pytest.mark.mergekit
def test_parameters_are_mergekits():
    """Every method takes exactly the parameters of mergekit 0.1.5's method of that name
    (hence NO_EFFECT lists names published recipes set beyond mergekit's specs)."""
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry

    from mergekit_math.merge.compat import NO_EFFECT
    from mergekit_math.methods import all_methods, param_keys

    specs = {m.spec.name: m.spec for m in registry.registered_methods()}
    for method in all_methods():
        spec = specs[method.name]
        theirs = {p.name for p in (*spec.parameters, *spec.input_parameters)}
        ours = set(param_keys(method.shared_params)) | set(param_keys(method.model_params))
        assert ours == theirs, method.name
        assert not set(NO_EFFECT.get(method.name, ())) & theirs, method.name


def test_sweep_lenient(tmp_path, zoo):
    """`mmath sweep` plans an imported recipe with --lenient as `mmath merge` does; the
    points' recipes are made from the recipe without the unknown names."""
    import json

    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "1+6?", "answer": "1+6=7\\n#### 7"}) + "\n")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        LINEAR.format(param=", densty: 0.5", extra="model_name: my-merge\n", **zoo),
    )
    args = ["sweep", recipe, "--set", "models[0].parameters.weight=0.2,0.4"]
    args += ["--tasks", "gsm8k_local", "--data", data, "-o", tmp_path / "sweep", "--dry-run"]
    res = mmath(*args)
    assert res.exit_code == 2
    assert "unknown key 'model_name'" in res.output and "--lenient" in res.output
    res = mmath(*args, "--lenient")
    assert res.exit_code == 0, res.output
    warned = "\n".join(_warnings(res.output))
    assert "unknown key 'model_name'" in warned and "parameters.densty" in warned
    assert res.output.count("to run ") == 2

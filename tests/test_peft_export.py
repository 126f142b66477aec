"""``mmath patch export``: a low-rank patch as a PEFT LoRA adapter, loaded by the real
``peft`` and compared with base + the patch's low-rank deltas."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import load_dir, make_model, mmath
from safetensors import safe_open

from mergekit_math.patch import Patch


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    # every saved factor found its module and every module its factors
    for w in caught:
        assert "missing" not in str(w.message).lower(), w.message
        assert "unexpected" not in str(w.message).lower(), w.message
    return {k: v.detach() for k, v in merged.state_dict().items()}


def one_error(res, *parts: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.output
    for p in parts:
        assert p in lines[0], res.output


@pytest.mark.parametrize(
    "arch,args",
    [
        ("llama", ["--energy", "0.8"]),
        ("llama", ["--rank", "3", "--lowrank-embeddings"]),
        ("gpt2", ["--rank", "4"]),
    ],
    ids=["llama-energy-ranks", "llama-embeddings", "gpt2-conv1d"],
)
def test_exported_adapter_reproduces_the_patch(tmp_path, arch, args):
    base = make_model(tmp_path / "base", arch=arch)
    ft = make_model(tmp_path / "ft", base=base, seed=1, noise=0.05)
    patch = tmp_path / "p"
    res = mmath(
        "patch", "extract", "--base", base, "--finetuned", ft, "-o", patch, "-q",
        "--encoding", "lowrank", *args,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    res = mmath("patch", "export", patch, "-o", tmp_path / "adapter")
    assert res.exit_code == 0, res.output
    entries = Patch.open(patch).tensors
    lowrank = {n for n, e in entries.items() if e.encoding == "lowrank"}
    dense = sorted(set(entries) - lowrank)
    # what the adapter cannot hold is named, not dropped silently
    if dense:
        assert "warning:" in res.output and dense[0] in res.output
        assert f"{len(dense)} tensor(s) of the patch" in res.output
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == len(lowrank)
    if "--energy" in args:
        assert config["rank_pattern"], "the energy criterion gives several ranks"
    if "--lowrank-embeddings" in args:
        assert "model.embed_tokens.weight" in lowrank and "lm_head.weight" in lowrank

    got = peft_merged(base, tmp_path / "adapter")
    patch_obj = Patch.open(patch)
    worst = 0.0
    for name, w in load_dir(base).items():
        want = w + patch_obj.delta(name) if name in lowrank else w
        diff = (got[name] - want).abs().max().item()
        assert diff <= 2e-7, (name, diff)
        worst = max(worst, diff)
    patch_obj.close()
    print(f"{arch} {args}: max abs diff exported adapter vs base + patch = {worst:.3g}")


def test_export_round_trips_through_the_lora_import(tmp_path):
    base = make_model(tmp_path / "base")
    ft = make_model(tmp_path / "ft", base=base, seed=1, noise=0.05)
    res = mmath(
        "patch", "extract", "--base", base, "--finetuned", ft, "-o", tmp_path / "p", "-q",
        "--encoding", "lowrank", "--rank", "4", "--include", "layers",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert mmath("patch", "export", tmp_path / "p", "-o", tmp_path / "a").exit_code == 0
    res = mmath("patch", "extract", "--base", base, "--from-lora", tmp_path / "a", "-o",
                tmp_path / "p2", "-q")  # fmt: skip
    assert res.exit_code == 0, res.output
    p, p2 = Patch.open(tmp_path / "p"), Patch.open(tmp_path / "p2")
    lowrank = [n for n, e in p.tensors.items() if e.encoding == "lowrank"]
    assert sorted(lowrank) == sorted(p2.tensors)
    for name in lowrank:
        torch.testing.assert_close(p2.delta(name), p.delta(name), atol=0, rtol=0)
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["mmath_left_out"])


def test_export_refusals(tmp_path):
    base = make_model(tmp_path / "base")
    ft = make_model(tmp_path / "ft", base=base, seed=1, noise=0.05)
    dense = tmp_path / "dense"
    assert (
        mmath("patch", "extract", "--base", base, "--finetuned", ft, "-o", dense, "-q").exit_code
        == 0
    )
    one_error(mmath("patch", "export", dense, "-o", tmp_path / "a"), "no low-rank tensor")
    low = tmp_path / "low"
    res = mmath("patch", "extract", "--base", base, "--finetuned", ft, "-o", low, "-q",
                "--encoding", "lowrank", "--rank", "2")  # fmt: skip
    assert res.exit_code == 0, res.output
    one_error(
        mmath("patch", "export", low, "-o", tmp_path / "a", "--strict"),
        "--strict:",
        "9 tensor(s)",
        "lm_head.weight",
    )
    one_error(mmath("patch", "export", low, "-o", tmp_path / "a", "--format", "gguf"), "--format")
    assert not (tmp_path / "a").exists()


def test_extract_format_peft_is_extract_then_export(tmp_path):
    from safetensors.torch import load_file

    base = make_model(tmp_path / "base")
    ft = make_model(tmp_path / "ft", base=base, seed=1, noise=0.05)
    common = ["--base", base, "--finetuned", ft, "-q", "--encoding", "lowrank", "--rank", "3"]
    out = tmp_path / "outs"
    res = mmath("patch", "extract", *common, "-o", out / "direct", "--format", "peft")
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "lm_head.weight" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["direct"]  # the temporary patch is gone
    assert mmath("patch", "extract", *common, "-o", tmp_path / "p").exit_code == 0
    assert mmath("patch", "export", tmp_path / "p", "-o", tmp_path / "two").exit_code == 0
    direct = load_file(out / "direct" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert direct.keys() == two.keys() and all(torch.equal(direct[k], two[k]) for k in two)
    with safe_open(out / "direct" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata()["mmath_source"].endswith("--format peft")
    one_error(
        mmath("patch", "extract", "--base", base, "--finetuned", ft, "-o", tmp_path / "x",
              "--format", "peft"),
        "--format peft", "--encoding lowrank",
    )  # fmt: skip

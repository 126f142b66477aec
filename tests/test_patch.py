"""PortLLM patches: extract (dense, low rank, sparse, LoRA import), apply and info, end to end on
tiny checkpoints, compared with references computed here, with the engine's dare_linear and
with PEFT's merge_and_unload."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_ulp_close,
    build_tokenizer,
    load_dir,
    make_config,
    make_model,
    mmath,
    write_recipe,
)
from safetensors.torch import load_file, save_file

from mergekit_math.io.reader import Checkpoint
from mergekit_math.patch import Patch
from mergekit_math.patch.encode import choose_rank, encode_lowrank, sparse_size_bound
from mergekit_math.patch.format import fingerprint


def extract(base: Path, out: Path, *args: object, finetuned: Path | None = None) -> Path:
    src = ["--finetuned", finetuned] if finetuned is not None else []
    res = mmath("patch", "extract", "--base", base, *src, "-o", out, "-q", *args)
    assert res.exit_code == 0, res.output
    return out


def apply(patch: Path, base: Path, out: Path, *args: object):
    res = mmath("patch", "apply", "--patch", patch, "--base", base, "-o", out, "-q", *args)
    assert res.exit_code == 0, res.output
    return res


def assert_one_error(res, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.mmath-*"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """OLD, a fine-tune FT of it, and NEW, an evolved OLD (fp32 tiny Llamas)."""
    root = tmp_path_factory.mktemp("patch_models")
    old = make_model(root / "old", seed=0)
    return {
        "old": old,
        "ft": make_model(root / "ft", base=old, seed=1),
        "new": make_model(root / "new", base=old, seed=2, noise=0.05),
        "root": root,
    }


@pytest.fixture(scope="module")
def dense_patch(models) -> Path:
    return extract(models["old"], models["root"] / "dense", finetuned=models["ft"])


# =============================================================================== dense


def test_dense_on_same_base_reproduces_finetune_bitwise(models, dense_patch, tmp_path):
    res = apply(dense_patch, models["old"], tmp_path / "out")
    assert "warning:" in res.stderr and "same fingerprint" in res.stderr
    got, ft = load_dir(tmp_path / "out"), load_dir(models["ft"])
    assert got.keys() == ft.keys()
    for name in ft:
        assert torch.equal(got[name], ft[name]), name
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (models["old"] / f).read_bytes()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "mmath patch extract" in card and str(models["ft"].resolve()) in card
    assert "fingerprint" in card and "2410.10870" in card


def test_dense_bf16_within_one_ulp_sharded_and_tied(tmp_path):
    old = make_model(tmp_path / "old", dtype="bfloat16", tied=True, shard_size="40KB")
    ft = make_model(tmp_path / "ft", base=old, seed=1, dtype="bfloat16", shard_size="40KB")
    patch = extract(old, tmp_path / "p", finetuned=ft)
    apply(patch, old, tmp_path / "out", "--out-shard-size", "40KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    got, want = load_dir(tmp_path / "out"), load_dir(ft)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == torch.bfloat16
        assert_ulp_close(got[name], want[name], 1.0)


def test_dense_on_new_base_adds_the_delta(models, dense_patch, tmp_path):
    apply(dense_patch, models["new"], tmp_path / "out")
    apply(dense_patch, models["new"], tmp_path / "half", "--scale", 0.5)
    got, half = load_dir(tmp_path / "out"), load_dir(tmp_path / "half")
    old, ft, new = load_dir(models["old"]), load_dir(models["ft"]), load_dir(models["new"])
    for name in new:
        delta = ft[name].float() - old[name].float()
        assert torch.equal(got[name], new[name].float() + delta), name
        assert torch.equal(half[name], new[name].float() + delta * 0.5), name
    # the ported model loads and runs
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 7]])).logits).all()


def test_zero_deltas_are_left_out_and_copied(models, tmp_path):
    ft = load_dir(models["ft"])
    old = load_dir(models["old"])
    ft["model.norm.weight"] = old["model.norm.weight"].clone()
    part = tmp_path / "ft"
    part.mkdir()
    save_file(ft, str(part / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (part / f).write_bytes((models["ft"] / f).read_bytes())
    patch = extract(models["old"], tmp_path / "p", "--include", r"norm", finetuned=part)
    p = Patch.open(patch)
    assert "model.norm.weight" not in p.tensors
    assert all("norm" in n for n in p.tensors) and p.manifest.unchanged == 1
    apply(patch, models["new"], tmp_path / "out")
    got, new = load_dir(tmp_path / "out"), load_dir(models["new"])
    assert torch.equal(got["model.norm.weight"], new["model.norm.weight"])
    assert torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], new["model.layers.0.self_attn.q_proj.weight"]
    )


# =============================================================================== low rank


def test_lowrank_error_is_the_dropped_singular_energy(models, tmp_path):
    patch = extract(
        models["old"], tmp_path / "p", "--encoding", "lowrank", "--rank", 4, finetuned=models["ft"]
    )
    p = Patch.open(patch)
    old, ft = Checkpoint(models["old"]), Checkpoint(models["ft"])
    n_lowrank = 0
    for name, entry in p.tensors.items():
        delta = ft.read(name).float() - old.read(name).float()
        decoded = p.delta(name)
        if len(entry.shape) == 1 or "embed" in name or "lm_head" in name:
            assert entry.encoding == "dense", name
            assert torch.equal(decoded, delta)
            continue
        assert entry.encoding == "lowrank" and entry.rank == 4, name
        n_lowrank += 1
        sigma = torch.linalg.svdvals(delta.double())
        expected = math.sqrt(float((sigma[4:] ** 2).sum())) / float(delta.double().norm())
        measured = float((decoded.double() - delta.double()).norm() / delta.double().norm())
        assert abs(measured - expected) < 1e-4, (name, measured, expected)
        assert abs(entry.error_norm / entry.delta_norm - expected) < 1e-4
    assert n_lowrank == 7 * 3
    res = mmath("patch", "info", patch, "--against", models["old"], models["ft"])
    assert res.exit_code == 0, res.output
    assert "lowrank ×21" in res.output and "compression:" in res.output
    assert "overall relative error vs FT − OLD" in res.output


def test_lowrank_energy_picks_the_smallest_rank(models, tmp_path):
    patch = extract(
        models["old"],
        tmp_path / "p",
        "--encoding",
        "lowrank",
        "--energy",
        0.8,
        "--lowrank-embeddings",
        finetuned=models["ft"],
    )
    p = Patch.open(patch)
    assert p.tensors["model.embed_tokens.weight"].encoding == "lowrank"
    old, ft = Checkpoint(models["old"]), Checkpoint(models["ft"])
    for name, entry in p.tensors.items():
        if entry.encoding != "lowrank":
            continue
        delta = ft.read(name).float() - old.read(name).float()
        power = torch.linalg.svdvals(delta.double()) ** 2
        share = torch.cumsum(power, 0) / power.sum()
        r = entry.rank
        assert share[r - 1] >= 0.8 - 1e-9 and (r == 1 or share[r - 2] < 0.8), name


def test_lowrank_full_rank_reproduces_the_delta(models, tmp_path):
    # factors of full rank are never smaller than the matrix: the delta is stored exactly
    patch = extract(
        models["old"], tmp_path / "p", "--encoding", "lowrank", "--rank", 64, finetuned=models["ft"]
    )
    assert {e.encoding for e in Patch.open(patch).tensors.values()} == {"dense"}
    apply(patch, models["old"], tmp_path / "out")
    got, ft = load_dir(tmp_path / "out"), load_dir(models["ft"])
    assert all(torch.equal(got[n], ft[n]) for n in ft)
    # and the SVD factors themselves, at full rank, multiply back to the delta
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(24, 40, generator=gen)
    _, sigma, _ = torch.linalg.svd(delta, full_matrices=False)
    assert choose_rank(sigma, None, 1.0) == 24 and choose_rank(sigma, 100, None) == 24
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    assert torch.allclose((u * s) @ vh, delta, atol=1e-5)
    enc = encode_lowrank(delta, "float32", "float32", rank=8)
    assert enc.entry.encoding == "lowrank" and enc.parts["B"].shape == (24, 8)


# =============================================================================== sparse


@pytest.mark.parametrize("drop", [0.9, 0.99])
def test_sparse_kept_fraction_and_size_bound(models, tmp_path, drop):
    patch = extract(
        models["old"],
        tmp_path / "p",
        "--encoding",
        "sparse",
        "--drop",
        drop,
        finetuned=models["ft"],
    )
    p = Patch.open(patch)
    n = sum(e.numel for e in p.tensors.values())
    kept = sum(e.nnz for e in p.tensors.values())
    keep = 1 - drop
    assert abs(kept - n * keep) <= 3 * math.sqrt(n * drop * keep), (kept, n * keep)
    bound = sum(sparse_size_bound(e.numel, e.nnz, 4) for e in p.tensors.values())
    weights = patch / "patch.safetensors"
    with open(weights, "rb") as f:
        header = 8 + struct.unpack("<Q", f.read(8))[0]
    assert weights.stat().st_size <= bound + header
    # about (1 − p) of the dense size plus at most 1 bit per parameter
    assert weights.stat().st_size - header <= n * (4 * keep) + n / 8 + 3 * 4 * math.sqrt(n)
    kinds = {e.index for e in p.tensors.values() if e.numel > 1000}
    assert kinds == ({"bitmask"} if drop == 0.9 else {"indices"})
    # unbiased: decoded entries are Δ / (1 − p) where kept, 0 elsewhere
    old, ft = Checkpoint(models["old"]), Checkpoint(models["ft"])
    name = "model.layers.1.mlp.up_proj.weight"
    delta = ft.read(name).float() - old.read(name).float()
    decoded = p.delta(name)
    mask = decoded != 0
    assert torch.allclose(decoded[mask], delta[mask] / keep, rtol=1e-6)


def test_sparse_patch_equals_engine_dare_linear(models, tmp_path):
    patch = extract(
        models["old"],
        tmp_path / "p",
        "--encoding",
        "sparse",
        "--drop",
        0.9,
        "--seed",
        7,
        finetuned=models["ft"],
    )
    apply(patch, models["new"], tmp_path / "ported")
    recipe = write_recipe(
        tmp_path / "dare.yaml",
        f"""
merge_method: dare_linear
base_model: {models["new"]}
seed: 7
models:
  - model: {models["ft"]}
    origin: {models["old"]}
    parameters: {{weight: 1.0, density: 0.1}}
parameters:
  rescale: paper
""",
    )
    res = mmath("merge", recipe, tmp_path / "merged", "-q")
    assert res.exit_code == 0, res.output
    got, want = load_dir(tmp_path / "ported"), load_dir(tmp_path / "merged")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


# =============================================================================== LoRA


def _randomize_adapter(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize(
    "arch,lora_kwargs,args",
    [
        (
            "llama",
            dict(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                rank_pattern={"layers.1.self_attn.q_proj": 2},
                alpha_pattern={"v_proj": 3},
                modules_to_save=["lm_head"],
            ),
            [],
        ),
        (
            "llama",
            dict(r=8, lora_alpha=16, target_modules=["k_proj", "gate_proj"], use_rslora=True),
            ["--encoding", "dense"],
        ),
        (
            "gpt2",
            dict(
                r=4, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
            ),
            [],
        ),
    ],
    ids=["patterns-embedding-modules_to_save", "rslora-dense", "gpt2-fan_in_fan_out"],
)
def test_lora_import_matches_peft_merge_and_unload(tmp_path, arch, lora_kwargs, args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = make_model(tmp_path / "base", arch=arch)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(**lora_kwargs)
    )
    _randomize_adapter(model, seed=3)
    model.save_pretrained(tmp_path / "adapter")
    patch = tmp_path / "p"
    res = mmath(
        "patch", "extract", "--base", base, "--from-lora", tmp_path / "adapter", "-o", patch, "-q",
        *args,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    entries = Patch.open(patch).tensors
    if not args:
        assert any(e.encoding == "lowrank" for e in entries.values())
    if arch == "llama" and "rank_pattern" in lora_kwargs:
        assert entries["model.layers.1.self_attn.q_proj.weight"].rank == 2
        assert entries["lm_head.weight"].encoding == "dense"
    apply(patch, base, tmp_path / "out")
    got = load_dir(tmp_path / "out")
    want = _peft_merged(base, tmp_path / "adapter")
    changed = 0
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], atol=1e-5, rtol=0, msg=name)
        changed += name in entries
    assert changed == len(entries) > 0


def test_lora_bad_adapters(tmp_path):
    base = make_model(tmp_path / "base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "use_dora": True})
    )
    res = mmath("patch", "extract", "--base", base, "--from-lora", adapter, "-o", tmp_path / "p")
    assert_one_error(res, "DoRA")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(2, 32),
            "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.zeros(32, 2),
        },
        str(adapter / "adapter_model.safetensors"),
    )
    res = mmath("patch", "extract", "--base", base, "--from-lora", adapter, "-o", tmp_path / "p")
    assert_one_error(res, "model.layers.0.self_attn.k_proj.weight", "[16, 32]")
    assert_nothing_written(tmp_path / "p")


# =============================================================================== bad inputs


def _gqa_variant(folder: Path) -> Path:
    """A tiny Llama like the fixtures but with 4 key/value heads instead of 2."""
    from transformers import AutoModelForCausalLM

    config = make_config("llama", tied=False)
    config.num_key_value_heads = 4
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_tokenizer(folder)
    return folder


def test_bad_bases_fail_before_writing(models, dense_patch, tmp_path):
    out = tmp_path / "out"
    qwen = make_model(tmp_path / "qwen", arch="qwen2")
    assert_one_error(
        mmath("patch", "apply", "--patch", dense_patch, "--base", qwen, "-o", out),
        "Qwen2ForCausalLM",
        "LlamaForCausalLM",
    )
    gqa = _gqa_variant(tmp_path / "gqa")
    assert_one_error(
        mmath("patch", "apply", "--patch", dense_patch, "--base", gqa, "-o", out),
        "shape mismatch for model.layers.0.self_attn.k_proj.weight",
    )
    short = make_model(tmp_path / "short", layers=2)
    assert_one_error(
        mmath("patch", "apply", "--patch", dense_patch, "--base", short, "-o", out),
        "has no tensor model.layers.2.",
    )
    assert_nothing_written(out)


def test_corrupt_and_incomplete_patches(models, dense_patch, tmp_path):
    out = tmp_path / "out"

    def copy_patch(name: str) -> Path:
        p = tmp_path / name
        p.mkdir()
        for f in dense_patch.iterdir():
            (p / f.name).write_bytes(f.read_bytes())
        return p

    def attempt(p: Path):
        return mmath("patch", "apply", "--patch", p, "--base", models["new"], "-o", out)

    missing = copy_patch("missing")
    (missing / "patch.json").unlink()
    assert_one_error(attempt(missing), "not a patch (no patch.json)")
    broken = copy_patch("broken")
    (broken / "patch.json").write_text('{"format": "mmath-patch", "tensors": {')
    assert_one_error(attempt(broken), "corrupt patch manifest", "not valid JSON")
    invalid = copy_patch("invalid")
    data = json.loads((invalid / "patch.json").read_text())
    del data["architecture"]
    (invalid / "patch.json").write_text(json.dumps(data))
    assert_one_error(attempt(invalid), "corrupt patch manifest: architecture")
    newer = copy_patch("newer")
    data = json.loads((newer / "patch.json").read_text())
    data["format_version"] = 99
    (newer / "patch.json").write_text(json.dumps(data))
    assert_one_error(attempt(newer), "newer")
    lacking = copy_patch("lacking")
    tensors = load_file(lacking / "patch.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(lacking / "patch.safetensors"))
    assert_one_error(attempt(lacking), "no stored part model.layers.1.mlp.up_proj.weight")
    assert_one_error(mmath("patch", "info", tmp_path / "nowhere"), "patch folder does not exist")
    assert_nothing_written(out)


def test_bad_extract_requests(models, tmp_path):
    out = tmp_path / "p"
    old, ft = models["old"], models["ft"]

    def attempt(*args: object):
        return mmath("patch", "extract", "--base", old, "-o", out, *args)

    assert_one_error(attempt("--finetuned", ft, "--encoding", "lowrank"), "--rank R or --energy")
    assert_one_error(
        attempt("--finetuned", ft, "--encoding", "lowrank", "--rank", 2, "--energy", 0.9),
        "exclude each other",
    )
    assert_one_error(attempt("--finetuned", ft, "--encoding", "sparse", "--drop", 1.0), "--drop")
    assert_one_error(attempt("--finetuned", ft, "--encoding", "svd"), "--encoding")
    assert_one_error(attempt("--finetuned", ft, "--include", "("), "--include")
    assert_one_error(attempt("--finetuned", ft, "--include", "nothing-matches"), "no tensor")
    assert_one_error(attempt(), "exactly one of --finetuned and --from-lora")
    assert_one_error(
        attempt("--finetuned", _gqa_variant(tmp_path / "gqa")),
        "shape mismatch for model.layers.0.self_attn.k_proj.weight",
    )
    assert_nothing_written(out)
    extract(old, out, finetuned=ft)
    assert_one_error(attempt("--finetuned", ft), "already exists")


# =============================================================================== misc


def test_fingerprint_reads_samples_and_tells_bases_apart(models, tmp_path):
    old = Checkpoint(models["old"])
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in models["old"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert fingerprint(old) == fingerprint(Checkpoint(copy))
    assert fingerprint(old) != fingerprint(Checkpoint(models["ft"]))


def test_info_reports_sizes_and_zero_error_for_dense(models, dense_patch):
    res = mmath("patch", "info", dense_patch, "--against", models["old"], models["ft"])
    assert res.exit_code == 0, res.output
    assert "dense ×" in res.output and "LlamaForCausalLM (llama)" in res.output
    assert "overall relative error vs FT − OLD: 0" in res.output
    res = mmath("patch", "info", dense_patch, "--tensors")
    assert res.exit_code == 0 and "model.layers.2.mlp.down_proj.weight" in res.output


def test_patch_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from mergekit_math.cli import app\n"
        "for argv in (['patch', '--help'], ['patch', 'extract', '--help']):\n"
        "    try:\n        app(argv)\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout
    for flag in ("--from-lora", "--energy", "--drop", "--include", "--lowrank-embeddings"):
        assert flag in out.stdout

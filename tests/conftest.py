"""Tiny checkpoints built in the tests: Llama, Qwen2 and GPT-2 shapes, tied or untied,
sharded or not, in fp32/bf16/fp16, with a real (tiny) tokenizer."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Evaluation results and fingerprints are cached; tests never touch the user's cache. The
# process that makes the folder removes it at exit (the processes tests start inherit it).
if "MMATH_CACHE_DIR" not in os.environ:
    os.environ["MMATH_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmath-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MMATH_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 96


def mmath(*args: object):
    """Run the CLI in-process (exceptions other than exits propagate)."""
    from typer.testing import CliRunner

    from mergekit_math.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def load_dir(folder: Path) -> dict:
    """Every tensor of a model folder, by name."""
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def build_tokenizer(folder: Path) -> None:
    """A character-level tokenizer made with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!+-*/=#:\n")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(folder)


def make_config(arch: str, tied: bool, layers: int = 3):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            tie_word_embeddings=tied,
            bos_token_id=1,
            eos_token_id=2,
        )
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            tie_word_embeddings=tied,
            bos_token_id=1,
            eos_token_id=2,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=32,
            n_layer=layers,
            n_head=4,
            n_positions=128,
            vocab_size=VOCAB,
            tie_word_embeddings=tied,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(arch)


def make_model(
    folder: Path,
    *,
    arch: str = "llama",
    seed: int = 0,
    base: Path | None = None,
    noise: float = 0.02,
    dtype: str = "float32",
    tied: bool = False,
    layers: int = 3,
    shard_size: str | None = None,
) -> Path:
    """Save a tiny causal LM. With ``base``, the weights are base + N(0, noise) (a 'fine-tune')."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    else:
        model = AutoModelForCausalLM.from_config(make_config(arch, tied, layers))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, **kwargs)
    build_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def math_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny model trained on five generated GSM8K-format problems, an untrained one and the
    problems' JSONL (one set per test module: the eval tests and the vLLM backend tests)."""
    from tiny_math import new_model, train

    from mergekit_math.data.gsm_symbolic import generate, write_jsonl

    root = tmp_path_factory.mktemp("math")
    problems = generate(5, seed=11)
    data = root / "problems.jsonl"
    write_jsonl(problems, data)
    trained, untrained = root / "trained", root / "untrained"
    train(trained, problems)
    new_model(untrained, seed=1).save_pretrained(untrained)
    return {"trained": trained, "untrained": untrained, "data": data, "root": root}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A base and three fine-tunes of a tiny Llama (fp32), shared by many tests."""
    root = tmp_path_factory.mktemp("zoo")
    base = make_model(root / "base", seed=0)
    return {
        "base": base,
        "a": make_model(root / "a", base=base, seed=1),
        "b": make_model(root / "b", base=base, seed=2),
        "c": make_model(root / "c", base=base, seed=3),
        "root": root,
    }


@pytest.fixture(scope="session")
def bf16_zoo(tmp_path_factory) -> dict[str, Path]:
    """A bfloat16 base and two bfloat16 fine-tunes of a fp32 tiny Llama (what the compiled
    kernels and the merges on numpy arrays take)."""
    root = tmp_path_factory.mktemp("bf16zoo")
    base = make_model(root / "base", seed=0)
    return {
        "base": make_model(root / "base16", seed=0, dtype="bfloat16"),
        "a": make_model(root / "a", base=base, seed=1, dtype="bfloat16"),
        "b": make_model(root / "b", base=base, seed=2, dtype="bfloat16"),
    }


@pytest.fixture(scope="session")
def demo_zoo(tmp_path_factory) -> dict[str, Path]:
    """Tiny stand-ins for the demo models that recipes/ names (../demo/base, math_a, math_b):
    a fp32 Llama with the demo's 30 layers and two fine-tunes of it."""
    root = tmp_path_factory.mktemp("demo")
    base = make_model(root / "base", seed=0, layers=30)
    return {
        "base": base,
        "a": make_model(root / "a", base=base, seed=1, noise=0.05),
        "b": make_model(root / "b", base=base, seed=2, noise=0.05),
    }


def demo_recipe(name: str, models: dict[str, Path]) -> str:
    """recipes/NAME.yaml with its demo models replaced by ``models`` (keys base, a, b)."""
    text = (Path(__file__).resolve().parent.parent / "recipes" / f"{name}.yaml").read_text()
    for demo, key in (("base", "base"), ("math_a", "a"), ("math_b", "b")):
        text = text.replace(f"../demo/{demo}", str(models[key]))
    return text


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def ulp(x, dtype):
    """Spacing of ``dtype`` at each value of ``x`` (a float32/float64 tensor)."""
    import torch

    info = torch.finfo(dtype)
    mag = x.abs().double().clamp(min=info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def assert_ulp_close(got, expect, ulps: float = 1.0):
    """``got`` (any float dtype) within ``ulps`` units in the last place of its dtype."""

    diff = (got.double() - expect.double()).abs()
    limit = ulps * ulp(expect.double(), got.dtype)
    bad = diff > limit
    assert not bad.any(), (
        f"{int(bad.sum())}/{bad.numel()} entries beyond {ulps} ulp of {got.dtype}; "
        f"max diff {diff.max().item():.3g}"
    )
    return diff.max().item() if diff.numel() else 0.0


def pytest_collection_modifyitems(config, items) -> None:
    """Every test in tests/test_faults_*.py belongs to the fault suite (``-m faults``)."""
    for item in items:
        if item.path.name.startswith("test_faults_"):
            item.add_marker(pytest.mark.faults)

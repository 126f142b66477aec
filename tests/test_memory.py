"""Peak memory is bounded by the largest tensor, not by the model or shard size.

Measured as the peak RSS of a fresh subprocess running the merge; no timing involved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HIDDEN, INTER, VOCAB = 256, 1024, 16000
LARGEST = VOCAB * HIDDEN * 4  # the fp32 embedding: 16 MB


def synthetic_llama(folder: Path, layers: int, seed: int) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.v_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (INTER, HIDDEN),
        "mlp.up_proj.weight": (INTER, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTER),
        "input_layernorm.weight": (HIDDEN,),
        "post_attention_layernorm.weight": (HIDDEN,),
    }
    state = {
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g),
        "model.norm.weight": torch.ones(HIDDEN),
        "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g),
    }
    for i in range(layers):
        for name, shape in shapes.items():
            state[f"model.layers.{i}.{name}"] = torch.randn(*shape, generator=g) * 0.02
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": VOCAB,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


PROBE = """
import resource, sys
from mergekit_math.cli import main
sys.argv = ["mmath"] + sys.argv[1:]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(recipe: Path, out: Path, *extra: str) -> int:
    # A fixed mmap threshold stops glibc from moving freed large blocks onto the heap, where
    # fragmentation makes peak RSS depend on allocation order rather than on live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE,
            "merge",
            str(recipe),
            str(out),
            "-q",
            "--threads",
            "1",
            *extra,
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("PEAK_KB"))
    return int(line.split()[1]) * 1024


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    recipes = {}
    for layers in (4, 8):
        names = []
        for seed, name in enumerate(("base", "a", "b")):
            names.append(synthetic_llama(root / f"{name}{layers}", layers, seed))
        recipe = root / f"ties{layers}.yaml"
        recipe.write_text(
            f"merge_method: ties\nbase_model: {names[0]}\nmodels:\n"
            f"  - model: {names[1]}\n    parameters: {{weight: 0.5, density: 0.3}}\n"
            f"  - model: {names[2]}\n    parameters: {{weight: 0.5, density: 0.3}}\n"
        )
        recipes[layers] = recipe
    return root, recipes


def test_doubling_layers_does_not_raise_peak_memory(models):
    root, recipes = models
    small = peak_rss(recipes[4], root / "o4")
    large = peak_rss(recipes[8], root / "o8")
    assert large - small < LARGEST, (small, large)


def test_quadrupling_shard_size_does_not_raise_peak_memory(models):
    root, recipes = models
    small = peak_rss(recipes[8], root / "s10", "--out-shard-size", "10M", "--force")
    large = peak_rss(recipes[8], root / "s40", "--out-shard-size", "40M", "--force")
    assert len(list((root / "s10").glob("*.safetensors"))) >= 4
    assert large - small < LARGEST, (small, large)


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc")
def test_merge_reads_leave_no_input_pages_mapped(tmp_path):
    """The merge reads its inputs into buffers (pread), not through mappings of the files:
    released mapped ranges left their fault-around neighbours resident, and the merge's RSS
    grew with the model. Checked in /proc/self/smaps while the inputs are still open."""
    from mergekit_math.merge import build_plan, execute
    from mergekit_math.recipe import load_recipe

    models = [synthetic_llama(tmp_path / f"m{i}", layers=2, seed=i) for i in range(3)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {models[0]}\n"
        "models:\n"
        + "".join(f"  - model: {m}\n    parameters: {{weight: 0.5}}\n" for m in models[1:])
    )
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    mapped: list[str] = []

    def after(item) -> None:
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if line.endswith(".safetensors") and str(tmp_path) in line:
                mapped.append(line)

    execute(plan, tmp_path / "out", progress=False, on_tensor=after, chunk_elements=4096)
    assert not mapped, mapped[:3]

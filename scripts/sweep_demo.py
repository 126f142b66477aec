"""Merge-ratio sweeps on toy models, each a minute or two on 2 CPU cores: the DARE drop rate, or
TIES density × weight.

    python scripts/sweep_demo.py dare                    # work in out/sweep-demo/
    python scripts/sweep_demo.py ties --jobs 2
    python scripts/sweep_demo.py dare --docs docs/sweeps # copy report.md, sweep.png there

The toy setting: three tiny character-level Llamas (2 layers, 96 wide) trained here in about
30 seconds. ``base`` learns to answer 12 arithmetic questions in GSM8K's ``#### N`` form;
``math_a`` and ``math_b`` are ``base`` fine-tuned on 12 other questions each (set A, set B).
Evaluation is ``gsm8k_local`` zero-shot on generated files:

- ``dare``: base + DARE(math_a − base) at drop rates 0 to 0.99 (density 1 to 0.01, kept entries
  rescaled by 1/density), scored on A: how much of a fine-tune's delta can be dropped;
- ``ties``: TIES of both fine-tunes at each density and weight, scored on A ∪ B (each fine-tune
  alone scores 0.5): how much of two deltas a merge keeps. Memorised facts in a model this
  small interfere strongly, so expect merges well below the fine-tunes.

The script then runs the sweep with `mmath sweep` (the command is printed), which prints the
table of the report. Everything is seeded: a rerun gives the same numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!+-*/=#:\n")
PER_SET = 12
STEPS = (300, 200)  # training steps: base, fine-tunes
LR = (3e-3, 3e-4)
MODES = {
    "dare": {
        "recipe": """\
# python scripts/sweep_demo.py dare   (mmath sweep {recipe} --set parameters.density=... ...)
# DARE on one fine-tune: drop each entry of math_a - base with probability p = 1 - density,
# rescale the kept ones by 1/density, add the result to the base.
merge_method: dare_linear
base_model: base
models:
  - model: math_a
    parameters: {{weight: 1.0}}
parameters: {{density: 0.5, rescale: paper, normalize: false}}
seed: 0
""",
        "sets": ["parameters.density=1,0.7,0.5,0.3,0.2,0.1,0.07,0.05,0.03,0.01"],
        "data": ("a",),
    },
    "ties": {
        "recipe": """\
# python scripts/sweep_demo.py ties   (mmath sweep {recipe} --set parameters.density=... ...)
# TIES with the same density and weight for both fine-tunes; normalize: false, so the weight
# scales the merged delta (as TIES's lambda) instead of being divided out.
merge_method: ties
base_model: base
models:
  - model: math_a
  - model: math_b
parameters: {{density: 0.5, weight: 1.0, normalize: false}}
""",
        "sets": ["parameters.density=0.1,0.2,0.3,0.5,0.7,1", "parameters.weight=0.25:1.25:0.25"],
        "data": ("a", "b"),
    },
}


def problems(seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """Three disjoint sets of two-number arithmetic questions with GSM8K-format answers."""
    rng = random.Random(seed)
    seen: set[str] = set()
    sets: dict[str, list[dict[str, str]]] = {"base": [], "a": [], "b": []}
    ops = [("plus", lambda x, y: x + y, "+"), ("times", lambda x, y: x * y, "*")]
    for name in sets:
        while len(sets[name]) < PER_SET:
            x, y = rng.randint(2, 40), rng.randint(2, 12)
            word, fn, sym = rng.choice(ops)
            q = f"What is {x} {word} {y}?"
            if q in seen:
                continue
            seen.add(q)
            r = fn(x, y)
            sets[name].append(
                {"question": q, "answer": f"{x}{sym}{y}=<<{x}{sym}{y}={r}>>{r}\n#### {r}"}
            )
    return sets


def build_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    ).save_pretrained(folder)


def train(folder: Path, rows: list[dict[str, str]], steps: int, start: Path | None) -> None:
    """Teach ``Question: q\\nAnswer: #### N</s>`` (loss on the answer) from a fresh model or
    from ``start``; saved as float32 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if start is None:
        config = LlamaConfig(
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(CHARS) + 4,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    build_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids, masks = [], []
    for row in rows:
        prompt = tok(f"Question: {row['question']}\nAnswer:", add_special_tokens=False).input_ids
        final = row["answer"].split("#### ")[-1]
        target = tok(f" #### {final}", add_special_tokens=False).input_ids + [2]
        ids.append(prompt + target)
        masks.append([0] * len(prompt) + [1] * len(target))
    width = max(map(len, ids))
    x = torch.tensor([r + [3] * (width - len(r)) for r in ids])
    labels = x.clone()
    labels[torch.tensor([m + [0] * (width - len(m)) for m in masks]) == 0] = -100
    attention = (torch.arange(width)[None] < torch.tensor([len(r) for r in ids])[:, None]).long()
    opt = torch.optim.AdamW(model.parameters(), lr=LR[0] if start is None else LR[1])
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, attention_mask=attention, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(folder)
    print(f"  {folder.name}: {steps} steps, final loss {loss.item():.4f}")


def build(work: Path) -> None:
    """The three models and the evaluation files (eval_a.jsonl, eval_ab.jsonl), unless
    already there."""
    import torch

    torch.set_num_threads(1)  # tiny matrices: one thread is fastest
    sets = problems()
    models = work / "models"
    if not (models / "math_b" / "model.safetensors").is_file():
        print(f"training toy models into {models}")
        started = time.perf_counter()
        train(models / "base", sets["base"], STEPS[0], None)
        train(models / "math_a", sets["a"], STEPS[1], models / "base")
        train(models / "math_b", sets["b"], STEPS[1], models / "base")
        print(f"  {time.perf_counter() - started:.0f} s")
    for names in (("a",), ("a", "b")):
        rows = [r for n in names for r in sets[n]]
        (work / f"eval_{''.join(names)}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )


def mmath() -> list[str]:
    beside = Path(sys.executable).parent / "mmath"
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "mergekit_math"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--work", type=Path, default=Path("out/sweep-demo"))
    parser.add_argument("--jobs", type=int, default=2, help="mmath sweep --jobs")
    parser.add_argument("--docs", type=Path, help="Copy report.md, sweep.png and the best recipe.")
    parser.add_argument("--force", action="store_true", help="Discard the recorded points.")
    args = parser.parse_args(argv)

    work = args.work.resolve()
    build(work)
    mode = MODES[args.mode]
    recipe = work / "models" / f"{args.mode}.yaml"
    recipe.write_text(mode["recipe"].format(recipe=recipe.name))
    data = work / f"eval_{''.join(mode['data'])}.jsonl"
    for name in ("base", "math_a", "math_b")[: 1 + len(mode["data"])]:
        run(
            [
                *mmath(),
                "eval",
                str(work / "models" / name),
                "--tasks",
                "gsm8k_local",
                "--data",
                str(data),
                "--num-fewshot",
                "0",
                "--gen-kwargs",
                "max_gen_toks=10",
            ],
            tail=4,
        )
    out = work / args.mode
    command = [*mmath(), "sweep", str(recipe)]
    for s in mode["sets"]:
        command += ["--set", s]
    command += [
        "--tasks",
        "gsm8k_local",
        "--data",
        str(data),
        "--num-fewshot",
        "0",
        "--gen-kwargs",
        "max_gen_toks=10",
        "--batch-size",
        "24",
        "--jobs",
        str(args.jobs),
        "--threads",
        "1",
        "-o",
        str(out),
    ]
    if args.force:
        command.append("--force")
    run(command)
    if args.docs is not None:
        args.docs.mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "sweep.png", "best_recipe.yaml"):
            shutil.copy2(out / name, args.docs / name)
        print(f"copied report.md, sweep.png and best_recipe.yaml to {args.docs}")


def run(command: list[str], tail: int | None = None) -> None:
    print("$ " + " ".join(c if " " not in c else repr(c) for c in command), flush=True)
    if tail is None:
        subprocess.run(command, check=True)
        return
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    print("\n".join(done.stdout.strip().splitlines()[:tail]), flush=True)


if __name__ == "__main__":
    main()

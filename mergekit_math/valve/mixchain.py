"""MixChain (CoT-Valve paper): for each question, solutions of several chain lengths — one
greedy generation per α — keeping the correct ones, ordered long to short."""

from __future__ import annotations

import json
import os
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergekit_math.errors import UserError
from mergekit_math.valve.build import alpha_name, build_alpha, built_for

# The gsm8k_cot_local prompt and stop strings (lm-eval's gsm8k_cot_zeroshot).
PROMPT = "Q: {question}\nA: Let's think step by step."
STOPS = ("Q:", "Question:", "</s>", "<|im_end|>")
# lm-eval's gsm8k filters: strict "#### N", else the last number in the text.
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize(number: str) -> str:
    """What lm-eval's exact_match compares after its regexes_to_ignore: no commas, no $,
    no trailing full stop."""
    return number.replace(",", "").replace("$", "").strip().rstrip(".")


def extract_answer(text: str) -> str | None:
    m = _STRICT.search(text)
    if m:
        return normalize(m.group(1))
    found = [a or b for a, b in _FLEXIBLE.findall(text)]
    found = [f for f in found if normalize(f)]
    return normalize(found[-1]) if found else None


def gold_answer(answer: str) -> str:
    if "####" not in answer:
        raise UserError(f"answer without '#### N': {answer[-60:]!r}")
    return normalize(answer.split("####")[-1])


def cut_at_stops(text: str, stops: tuple[str, ...] = STOPS) -> str:
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def read_questions(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise UserError(f"--data: {path} does not exist")
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({"question": str(row["question"]), "answer": str(row["answer"])})
            except (ValueError, KeyError, TypeError):
                raise UserError(
                    f'--data: {path}:{lineno}: expected {{"question", "answer"}} JSON'
                ) from None
            gold_answer(rows[-1]["answer"])
    if not rows:
        raise UserError(f"--data: {path} holds no questions")
    return rows


def generate(
    model_dir: Path,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: str,
    dtype: str,
    chat: bool,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[str, int]]:
    """Greedy completions cut at the stop strings, with their token counts (re-tokenised,
    no special tokens: as `mmath eval` counts them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    if chat:
        prompts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    out: list[tuple[str, int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = tok(
            prompts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=not chat,
        ).to(device)
        with torch.inference_mode():
            ids = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        for row in ids[:, batch["input_ids"].shape[1] :]:
            text = cut_at_stops(tok.decode(row, skip_special_tokens=False))
            text = text.replace(tok.pad_token, "") if tok.pad_token else text
            out.append((text, len(tok(text, add_special_tokens=False)["input_ids"])))
        if progress is not None:
            progress(len(batch["input_ids"]))
    return out


def mixchain(
    model: Path,
    direction: Path,
    alphas: list[float],
    data: Path,
    out: Path,
    *,
    models_dir: Path,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "auto",
    chat: bool = False,
    prompt: str = PROMPT,
    echo: Callable[[str], None] = print,
) -> tuple[dict[float, dict[str, Any]], int]:
    """Write MixChain records to ``out`` (questions with at least one correct solution);
    returns per-α {kept, total, mean_tokens, mean_tokens_all} and the records written."""
    from mergekit_math.io.progress import progress as tqdm

    if "{question}" not in prompt:
        raise UserError("--prompt: the template needs a {question} placeholder")
    questions = read_questions(data)
    prompts = [prompt.format(question=q["question"]) for q in questions]
    golds = [gold_answer(q["answer"]) for q in questions]
    solutions: list[list[dict[str, Any]]] = [[] for _ in questions]
    stats: dict[float, dict[str, Any]] = {}
    for alpha in alphas:
        if alpha == 0:
            folder = Path(model).resolve()
        else:
            folder = models_dir / alpha_name(alpha)
            if not built_for(folder, model, direction, alpha):
                echo(f"α = {alpha:g}: building {folder}")
                build_alpha(
                    model, direction, alpha, folder, device=device, force=True, progress=False
                )
        bar = tqdm(total=len(prompts), desc=f"α = {alpha:g}", unit="q", leave=False)
        try:
            answers = generate(
                folder,
                prompts,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                device=device,
                dtype=dtype,
                chat=chat,
                progress=bar.update,
            )
        finally:
            bar.close()
        kept = []
        for i, (text, tokens) in enumerate(answers):
            if extract_answer(text) == golds[i]:
                solutions[i].append({"alpha": alpha, "text": text, "tokens": tokens})
                kept.append(tokens)
        stats[alpha] = {
            "kept": len(kept),
            "total": len(questions),
            "mean_tokens": statistics.fmean(kept) if kept else None,
            "mean_tokens_all": statistics.fmean(t for _, t in answers),
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    written = 0
    with open(tmp, "w") as f:
        for q, sols in zip(questions, solutions):
            if not sols:
                continue
            ordered = sorted(sols, key=lambda s: (-s["tokens"], s["alpha"]))
            f.write(
                json.dumps({"question": q["question"], "answer": q["answer"], "solutions": ordered})
                + "\n"
            )
            written += 1
    os.replace(tmp, out)
    return stats, written

"""The fidelity setting: a small character-level Llama pretrained on a mixed synthetic corpus,
then fine-tuned briefly into specialists, so that merges act on small moves from one base.

Problems are one-step word problems in the style of the gsm-symbolic templates (names from
``mergekit_math.data.gsm_symbolic``, GSM8K calculator annotations, ``#### N`` answers) in two
skills, ``addsub`` (a number up to 28 plus or minus a digit) and ``muldiv`` (a digit times a
number up to 12, and the matching division), each with a long worked chain and a short one:

    question: Ben has 17 apples. Mei gives Ben 8 more apples. How many apples does Ben have?
    long:     Now Ben has 17 + 8 = <<17+8=25>>25 apples.\n#### 25
    short:    17+8=25\n#### 25

One question in eight (a fixed hash of its text) is held out: no model trains on it, and
evaluation uses only those, so a score is on problems the model has not seen (their
arithmetic facts recur across questions, as a pretrained model's would). The real
gsm-symbolic templates (2-5 steps, 2-4 digit products) are beyond a model this small trained
for minutes on a CPU (a first try at 2-digit operands left the base and a specialist at
0.5-1.5% on held-out operand pairs); their text joins the corpus as plain text, with
generated sentences.

Everything is seeded from one seed; ``build(work)`` trains what is missing into
``work/models`` and skips what is there, so reruns evaluate without training.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mergekit_math.data.gsm_symbolic import NAMES, generate

CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!+-*/=#:$%'()<>\n")
BOS, EOS, PAD = 1, 2, 3
ITEMS = (
    "apples", "pens", "stickers", "marbles", "books", "cookies", "shells", "cards", "coins",
    "stamps", "beads", "plums", "cups", "toys", "eggs", "socks",
)  # fmt: skip
SKILLS = ("addsub", "muldiv")
FORMS = ("long", "short")


@dataclass(frozen=True)
class Scale:
    """Model width and training lengths; ``Scale.reduced()`` is the slow test's version."""

    hidden: int = 128
    layers: int = 4
    pretrain_steps: int = 1800
    finetune_steps: int = 200
    continue_steps: int = 300
    batch: int = 16
    block: int = 128
    eval_n: int = 100
    seed: int = 0

    @classmethod
    def reduced(cls) -> Scale:
        return cls(pretrain_steps=1000, finetune_steps=100, eval_n=40)


@dataclass(frozen=True)
class Problem:
    question: str
    long: str
    short: str
    final: int
    skill: str

    def answer(self, form: str) -> str:
        return self.long if form == "long" else self.short


# --- problems ------------------------------------------------------------------------------


def held_out(question: str) -> bool:
    """One question in eight is reserved for evaluation (a fixed hash of its text)."""
    return hashlib.sha256(question.encode()).digest()[0] % 8 == 0


def _addsub(rng: random.Random) -> tuple[str, str, str, int]:
    a, b = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    if rng.random() < 0.5:
        x, y = rng.randint(1, 19), rng.randint(1, 9)
        z = x + y
        q = f"{a} has {x} {item}. {b} gives {a} {y} more {item}. How many {item} does {a} have?"
        return q, f"Now {a} has", f"{x} + {y} = <<{x}+{y}={z}>>{z} {item}.", z
    x, y = rng.randint(10, 28), rng.randint(1, 9)
    z = x - y
    q = f"{a} has {x} {item}. {a} gives {y} {item} to {b}. How many {item} does {a} have left?"
    return q, f"Now {a} has", f"{x} - {y} = <<{x}-{y}={z}>>{z} {item}.", z


def _muldiv(rng: random.Random) -> tuple[str, str, str, int]:
    (a,) = rng.sample(NAMES, 1)
    item = rng.choice(ITEMS)
    x, y = rng.randint(2, 9), rng.randint(2, 12)
    if rng.random() < 0.5:
        z = x * y
        q = f"{a} has {x} boxes with {y} {item} in each box. How many {item} does {a} have?"
        return q, f"In all {a} has", f"{x} * {y} = <<{x}*{y}={z}>>{z} {item}.", z
    t = x * y
    q = f"{a} shares {t} {item} equally among {x} friends. How many {item} does each friend get?"
    return q, "Each friend gets", f"{t} / {x} = <<{t}/{x}={y}>>{y} {item}.", y


BUILDERS: dict[str, Callable] = {"addsub": _addsub, "muldiv": _muldiv}


def draw(skill: str, rng: random.Random) -> tuple[Problem, bool]:
    """One problem and whether its operands are held out."""
    q, chain, calc, z = BUILDERS[skill](rng)
    compact = calc.split(" = <<")[1].split(">>")[0]
    long = f" {chain} {calc}\n#### {z}"
    short = f" {compact}\n#### {z}"
    return Problem(q, long, short, z, skill), held_out(q)


def stream(skill: str, seed: int, *, evaluation: bool) -> Iterator[Problem]:
    """Endless problems of ``skill``: the training questions, or the held-out ones."""
    rng = random.Random(f"{seed}-{skill}-{'eval' if evaluation else 'train'}")
    while True:
        problem, out = draw(skill, rng)
        if out == evaluation:
            yield problem


def eval_rows(skill: str, form: str, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` distinct held-out problems as GSM8K JSONL rows."""
    rows, seen = [], set()
    for p in stream(skill, seed, evaluation=True):
        if p.question not in seen:
            seen.add(p.question)
            rows.append({"question": p.question, "answer": p.answer(form).strip()})
        if len(rows) == n:
            return rows
    raise AssertionError("unreachable")


def write_eval(work: Path, n: int, seed: int) -> dict[str, Path]:
    """The evaluation files ``eval_{skill}_{form}.jsonl`` (the form only shapes the reference
    answer; scoring reads ``#### N``)."""
    paths = {}
    for skill in SKILLS:
        path = work / f"eval_{skill}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in eval_rows(skill, "long", n, seed)))
        paths[skill] = path
    return paths


def plain_text(seed: int, n: int = 3000) -> list[str]:
    """Plain-text documents: gsm-symbolic problems with their worked solutions, and sentences."""
    docs = [f"{p.question}\n{p.answer}" for p in generate(n // 2, seed=seed)]
    rng = random.Random(seed)
    verbs = ("walks to the park with", "reads a book to", "plays cards with", "writes a letter to")
    for _ in range(n - len(docs)):
        a, b = rng.sample(NAMES, 2)
        item = rng.choice(ITEMS)
        docs.append(f"{a} {rng.choice(verbs)} {b}. They count the {item} together.")
    return docs


# --- model and training --------------------------------------------------------------------


def build_tokenizer(folder: Path) -> None:
    """The tests' one-token-per-character tokenizer over this setting's CHARS."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_math import build_tokenizer as build

    build(folder, chars=CHARS)


def encode(text: str) -> list[int]:
    index = {c: i + 4 for i, c in enumerate(CHARS)}
    return [index.get(c, 0) for c in text]


def new_model(scale: Scale, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=scale.hidden,
        intermediate_size=scale.hidden * 2,
        num_hidden_layers=scale.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(CHARS) + 4,
        max_position_embeddings=512,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def qa_ids(p: Problem, form: str) -> tuple[list[int], list[int]]:
    """``<s>Question: q\\nAnswer:`` and `` answer</s>`` as token ids."""
    return [BOS, *encode(f"Question: {p.question}\nAnswer:")], [*encode(p.answer(form)), EOS]


def pretrain_blocks(seed: int, mix: dict[tuple[str, str], float], scale: Scale) -> Iterator:
    """Endless packed blocks of ``scale.block`` tokens: of the documents, 15% plain text, 25%
    drills (ten bare equations ``17+8=25`` of training questions, the arithmetic facts at a
    fraction of the tokens a word problem costs), the rest QA problems drawn by ``mix`` weights
    over (skill, form)."""
    import torch

    rng = random.Random(f"{seed}-pretrain")
    streams = {key: stream(key[0], seed, evaluation=False) for key in mix}
    keys, weights = list(mix), list(mix.values())
    text = plain_text(seed)
    buffer: list[int] = []
    while True:
        while len(buffer) < scale.block * scale.batch:
            draw = rng.random()
            if draw < 0.15:
                buffer += [BOS, *encode(rng.choice(text)), EOS]
            elif draw < 0.4:
                facts = (next(streams[(rng.choice(SKILLS), "short")]) for _ in range(10))
                drill = " ".join(p.short.split("\n")[0].strip() for p in facts)
                buffer += [BOS, *encode(drill), EOS]
            else:
                key = rng.choices(keys, weights)[0]
                head, tail = qa_ids(next(streams[key]), key[1])
                buffer += head + tail
        chunk, buffer = buffer[: scale.block * scale.batch], buffer[scale.block * scale.batch :]
        x = torch.tensor(chunk).view(scale.batch, scale.block)
        yield x, None, x.clone()


def finetune_batches(seed: int, skill: str, form: str, scale: Scale, tag: str) -> Iterator:
    """Endless padded batches of QA problems, loss on the answer only."""
    import torch

    problems = stream(skill, seed, evaluation=False)
    rng = random.Random(f"{seed}-{tag}")
    for _ in range(rng.randint(0, 99)):  # each specialist sees its own slice of the stream
        next(problems)
    while True:
        rows = [qa_ids(next(problems), form) for _ in range(scale.batch)]
        width = max(len(h) + len(t) for h, t in rows)
        ids = torch.full((len(rows), width), PAD)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (h, t) in enumerate(rows):
            ids[i, : len(h) + len(t)] = torch.tensor(h + t)
            labels[i, len(h) : len(h) + len(t)] = torch.tensor(t)
            mask[i, : len(h) + len(t)] = 1
        yield ids, mask, labels


def fit(model, batches: Iterator, steps: int, lr: float, warmup: int, name: str) -> float:
    """AdamW with linear warmup and cosine decay; one thread, so results do not depend on the
    machine's core count. Returns the final loss."""
    import math

    import torch

    torch.set_num_threads(1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    started, loss = time.perf_counter(), torch.tensor(0.0)
    for step in range(steps):
        ids, mask, labels = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            print(f"  {name} step {step}/{steps} loss {loss.item():.3f} {elapsed:.0f}s", flush=True)
    model.eval()
    return loss.item()


# --- the models ----------------------------------------------------------------------------

PRETRAIN_LR, FINETUNE_LR = 2e-3, 3e-4
# name: (start, what it trains on); a tuple of (skill, form) pairs is fine-tuning on those QA
# problems, "pretrain" the packed mixed corpus.
MODELS: dict[str, tuple[str | None, object]] = {
    "base": (None, "pretrain"),
    "addsub": ("base", (("addsub", "long"),)),
    "muldiv": ("base", (("muldiv", "long"),)),
    "long": ("base", (("addsub", "long"), ("muldiv", "long"))),
    # CoT-Valve's S is tuned from L: Δ = S − L is the chain-length direction
    "short": ("long", (("addsub", "short"), ("muldiv", "short"))),
    "base_v2": ("base", "continue"),
    # a gentler S (a quarter of the steps), to see whether CoT-Valve's step in α softens
    "short_50": ("long", (("addsub", "short"), ("muldiv", "short"))),
}
STEPS = {"short_50": 50}  # fine-tuning steps where not scale.finetune_steps


def _mixed(seed: int, pairs: tuple, scale: Scale, tag: str) -> Iterator:
    """Alternate batches of the (skill, form) pairs."""
    sources = [finetune_batches(seed, s, f, scale, f"{tag}-{s}-{f}") for s, f in pairs]
    while True:
        for source in sources:
            yield next(source)


def train_model(name: str, models: Path, scale: Scale) -> None:
    from transformers import AutoModelForCausalLM

    start, what = MODELS[name]
    seed = scale.seed
    mix = {(s, f): 1.0 for s in SKILLS for f in FORMS}
    if start is None:
        model = new_model(scale, seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(models / start)
    import torch

    torch.manual_seed(seed)
    if what == "pretrain":
        batches, steps, lr, warmup = (
            pretrain_blocks(seed, mix, scale),
            scale.pretrain_steps,
            PRETRAIN_LR,
            100,
        )
    elif what == "continue":
        # v2: the same corpus, a fresh draw of it, at a tenth of the pretraining rate
        batches = pretrain_blocks(seed + 1, mix, scale)
        steps, lr, warmup = scale.continue_steps, PRETRAIN_LR / 10, 20
    else:
        batches = _mixed(seed, what, scale, name)
        steps, lr, warmup = STEPS.get(name, scale.finetune_steps), FINETUNE_LR, 20
    fit(model, batches, steps, lr, warmup, name)
    folder = models / name
    tmp = models / f".{name}.tmp"
    model.save_pretrained(tmp)
    build_tokenizer(tmp)
    tmp.rename(folder)


def build(work: Path, scale: Scale, names: tuple[str, ...] = tuple(MODELS)) -> Path:
    """Train the models in ``names`` (and what they start from) into ``work/models`` unless
    there; returns that folder."""
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    for name in names:
        start = MODELS[name][0]
        if start is not None and start not in names:
            build(work, scale, (start,))
        if not (models / name / "model.safetensors").is_file():
            started = time.perf_counter()
            train_model(name, models, scale)
            print(f"  trained {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return models


# --- mmath ---------------------------------------------------------------------------------

MAX_GEN_TOKS = 160


def mmath(*args: object, quiet: bool = True) -> str:
    """Run ``python -m mergekit_math ARGS`` (this interpreter, this checkout); its stdout."""
    command = [sys.executable, "-m", "mergekit_math", *map(str, args)]
    print("$ mmath " + " ".join(map(str, args)), flush=True)
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"mmath failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    if not quiet:
        print(done.stdout, flush=True)
    return done.stdout


def evaluate(model: Path, data: Path, out: Path, limit: int | None = None) -> dict[str, float]:
    """``mmath eval --tasks gsm8k_local`` zero-shot, greedy: strict-match accuracy (``#### N``)
    and mean generated tokens."""
    args: list[object] = ["eval", model, "--tasks", "gsm8k_local", "--data", data]
    args += ["--num-fewshot", "0", "--batch-size", "50", "-o", out]
    args += ["--gen-kwargs", f"max_gen_toks={MAX_GEN_TOKS}"]
    if limit is not None:
        args += ["--limit", limit]
    mmath(*args)
    doc = json.loads((out / "results.json").read_text())
    lengths = doc["mmath"]["cot_lengths"]["gsm8k_local"]
    lengths = lengths.get("gsm8k_local", lengths)
    return {
        "accuracy": doc["results"]["gsm8k_local"]["exact_match,strict-match"],
        "mean_tokens": lengths["mean"],
    }


def write_docs(docs: Path, stem: str, text: str, result: dict) -> None:
    """``STEM.md`` (the tables, ``text``) and ``STEM.json`` (the numbers) in ``docs``."""
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"{stem}.md").write_text(text)
    (docs / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")

"""Effect 4 (UL2R, Tay et al. 2022) in the fidelity setting: a short UL2R phase on the base
(U-PaLM's mixture of denoisers) improves its infilling, the span-denoising loss on held-out
text, while its left-to-right loss on the same text stays within 2% of the base's.

    python scripts/fidelity_ul2r.py                       # work in out/fidelity/
    python scripts/fidelity_ul2r.py --docs docs/fidelity  # also write the table, JSON, plot

The base comes from ``scripts/fidelity_lib.py`` (trained once, cached under WORK/models). The
UL2R phase is ``mmath ul2r train`` of a config made by the code behind ``mmath ul2r config``
(preset ``ul2r``: 50% S, 25% R, 25% X, prefix-LM attention, sentinels added to the character
vocabulary) on a fresh draw of the pretraining corpus; a control trains the same steps on the
same documents with plain causal LM. The held-out text is QA problems whose question is held
out by ``fidelity_lib.held_out`` (a fixed hash): no model ever trained on them. The denoising
losses are mmath's own held-out evaluation (``mergekit_math.ul2r.loss.evaluate`` on the
trainer's held-out batches; the base's sentinel rows set up as the trainer sets them before
its first step); the left-to-right loss is the mean next-token cross-entropy of
``<s>Question: …\\nAnswer: …</s>``, the base's training format, computed here, also at the
UL2R phase's checkpoints (every ``steps // 4``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity_lib as lib  # noqa: E402

STEPS = 200  # batch 16 × 128 tokens: 11% of the base's pretraining tokens
LEARNING_RATE = lib.PRETRAIN_LR / 10  # as base_v2's continued pretraining
HELD_OUT_DOCS = 256
TRAIN_DOCS = 4000
SPAN = ("R", "X-long", "X-dense")  # the preset's span-corruption denoisers
L2R_BOUND = 0.02


def qa_text(p: lib.Problem, form: str) -> str:
    """A QA document as the base pretrained on it (``qa_ids`` without ``<s>`` / ``</s>``)."""
    return f"Question: {p.question}\nAnswer:{p.answer(form)}"


def corpus(seed: int, n: int) -> list[str]:
    """``n`` training documents drawn as ``lib.pretrain_blocks`` draws them (15% plain text, 25%
    drills, the rest QA problems of both skills and forms), from another seed's stream."""
    rng = random.Random(f"{seed}-ul2r")
    keys = [(s, f) for s in lib.SKILLS for f in lib.FORMS]
    streams = {k: lib.stream(k[0], seed + 2, evaluation=False) for k in keys}
    text = lib.plain_text(seed)
    docs = []
    for _ in range(n):
        draw = rng.random()
        if draw < 0.15:
            docs.append(rng.choice(text))
        elif draw < 0.4:
            facts = (next(streams[(rng.choice(lib.SKILLS), "short")]) for _ in range(10))
            docs.append(" ".join(p.short.split("\n")[0].strip() for p in facts))
        else:
            key = rng.choice(keys)
            docs.append(qa_text(next(streams[key]), key[1]))
    return docs


def held_out_docs(seed: int, n: int) -> list[str]:
    """``n`` QA documents of distinct held-out questions (the questions ``lib.eval_rows``
    gives), the skills in turn, each skill's questions alternating long and short forms."""
    per_skill = n // len(lib.SKILLS) + 1
    problems: dict[str, list[lib.Problem]] = {}
    for skill in lib.SKILLS:
        seen: dict[str, lib.Problem] = {}
        for p in lib.stream(skill, seed, evaluation=True):
            seen.setdefault(p.question, p)
            if len(seen) == per_skill:
                break
        problems[skill] = list(seen.values())
    docs = [qa_text(problems[s][i], lib.FORMS[i % 2]) for i in range(per_skill) for s in lib.SKILLS]
    return docs[:n]


def write_data(work: Path, seed: int) -> Path:
    """The training documents, then the held-out ones, which the trainer keeps out as its last
    ``eval.holdout_documents``."""
    data = work / "ul2r" / "data.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    docs = corpus(seed, TRAIN_DOCS) + held_out_docs(seed, HELD_OUT_DOCS)
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return data


# The control: the same steps on the same documents with the base's own objective.
CAUSAL = {
    "preset": None,
    "attention": "causal",
    "denoisers": [{"name": "causal", "kind": "causal", "mode_token": None, "weight": 1.0}],
}


def write_config(
    work: Path, base: Path, data: Path, scale: lib.Scale, steps: int, kind: str
) -> tuple[Path, Path]:
    """The config of the ``ul2r`` phase (preset ul2r, a checkpoint every quarter) or of its
    ``causal`` control, written by the code behind ``mmath ul2r config``; it and its run
    folder."""
    from mergekit_math.ul2r.presets import build_config, render_config

    overrides = {
        "training.sequence_length": scale.block,
        "training.batch_size": scale.batch,
        "training.steps": steps,
        "training.learning_rate": LEARNING_RATE,
        "training.warmup_steps": max(1, steps // 10),
        "training.seed": scale.seed,
        "eval.interval": max(1, steps // 4),  # > 0 also keeps the held-out documents out
        "eval.batches": 8,
        "eval.holdout_documents": HELD_OUT_DOCS,
        "save.interval": max(1, steps // 4) if kind == "ul2r" else 0,
        "save.keep": 4,
        **(CAUSAL if kind == "causal" else {}),
    }
    config = build_config(str(base), "ul2r", data=[str(data)], overrides=overrides)
    path = work / "ul2r" / f"{kind}-{steps}.yaml"
    run_dir = work / "ul2r" / f"{kind}-{steps}"
    path.write_text(render_config(config, f"mmath ul2r train {path} -o {run_dir} --threads 1"))
    return path, run_dir


def held_out_losses(model_dir: Path, config_path: Path) -> dict:
    """mmath's held-out UL2R evaluation (``ul2r.loss.evaluate`` on the batches the trainer
    evaluates on) of any model, its missing sentinel rows set to the mean embedding as the
    trainer sets them before its first step."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_math.ul2r.batch import probe_prefix_attention
    from mergekit_math.ul2r.config import load_config
    from mergekit_math.ul2r.data import build_run_data, resolve_sources
    from mergekit_math.ul2r.loss import evaluate, probe_chunked_loss
    from mergekit_math.ul2r.tokens import init_embeddings, resolve_tokens

    torch.set_num_threads(1)
    config = load_config(config_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokens = resolve_tokens(tokenizer, config)
    init_embeddings(model, tokens, len(tokenizer))
    data = build_run_data(config, tokenizer, tokens, resolve_sources(config, config_path.parent))
    style, _ = probe_prefix_attention(model, torch.float32)
    chunked, _ = probe_chunked_loss(model)
    cpu = torch.device("cpu")
    return evaluate(model, data.eval_batches, config, style, cpu, contextlib.nullcontext, chunked)


def l2r_loss(model_dir: Path, docs: list[str], batch: int = 32) -> float:
    """Mean next-token cross-entropy of ``<s>doc</s>`` over all predicted tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(docs), batch):
            rows = [[lib.BOS, *lib.encode(d), lib.EOS] for d in docs[start : start + batch]]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), lib.PAD)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            )
            keep = mask[:, 1:].reshape(-1).bool()
            total += float(ce[keep].sum())
            count += int(keep.sum())
    return total / count


def span_loss(denoisers: dict[str, float], weights: dict[str, float]) -> float:
    """The span denoisers' held-out losses, averaged with their mixture weights."""
    return sum(weights[d] * denoisers[d] for d in SPAN) / sum(weights[d] for d in SPAN)


def trained(work: Path, base: Path, scale: lib.Scale, steps: int) -> dict[str, tuple]:
    """``mmath ul2r train`` the UL2R phase and its causal control (skipped when finished);
    ``{kind: (config, run folder)}``."""
    data = write_data(work, scale.seed)
    runs = {}
    for kind in ("ul2r", "causal"):
        config, run_dir = write_config(work, base, data, scale, steps, kind)
        if not (run_dir / "final" / "model.safetensors").is_file():
            lib.mmath("ul2r", "train", config, "-o", run_dir, "--threads", "1", "--force", "-q")
        runs[kind] = (config, run_dir)
    return runs


def run(work: Path, scale: lib.Scale, steps: int = STEPS) -> dict:
    """Train (or reuse) the base, the UL2R phase and its control; the held-out denoising and
    left-to-right losses of the base, the control and the UL2R model, and of the UL2R phase's
    checkpoints."""
    from mergekit_math.ul2r.config import load_config

    base = lib.build(work, scale, ("base",)) / "base"
    runs = trained(work, base, scale, steps)
    config, run_dir = runs["ul2r"]
    weights = {d.label: d.weight for d in load_config(config).denoisers}
    docs = held_out_docs(scale.seed, HELD_OUT_DOCS)
    rows = {}
    for key, model in (
        ("base", base),
        ("causal", runs["causal"][1] / "final"),
        ("ul2r", run_dir / "final"),
    ):
        losses = held_out_losses(model, config)
        rows[key] = {
            "span_denoising": span_loss(losses["eval_denoisers"], weights),
            "denoisers": losses["eval_denoisers"],
            "mixture": losses["eval_loss"],
            "l2r": l2r_loss(model, docs),
        }
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line]
    curve = []
    for r in (r for r in log if "eval_loss" in r):  # the trainer's own held-out evaluations
        model = run_dir / f"checkpoint-{r['step']:06d}"
        model = base if r["step"] == 0 else run_dir / "final" if r["step"] == steps else model
        curve.append(
            {
                "step": r["step"],
                "span_denoising": span_loss(r["eval_denoisers"], weights),
                **r["eval_denoisers"],
                "l2r": l2r_loss(model, docs),
            }
        )
    change = {
        k: {m: rows[k][m] / rows["base"][m] - 1 for m in ("span_denoising", "l2r")}
        for k in ("causal", "ul2r")
    }
    return {
        "setting": {**scale.__dict__, "ul2r_steps": steps, "learning_rate": LEARNING_RATE},
        "rows": rows,
        "curve": curve,
        "train_seconds": sum(r.get("seconds", 0.0) for r in log),
        "change": change,
        "holds": change["ul2r"]["span_denoising"] < 0 and change["ul2r"]["l2r"] <= L2R_BOUND,
    }


WHAT = {
    "base": "base",
    "causal": "control: same steps, causal LM",
    "ul2r": "UL2R (ul2r preset)",
}


def table(result: dict) -> str:
    rows, change = result["rows"], result["change"]
    labels = list(rows["base"]["denoisers"])
    lines = [
        "| model | span denoising | Δ | " + " | ".join(labels) + " | left-to-right | Δ |",
        "|---|---|---|" + "---|" * len(labels) + "---|---|",
    ]
    for key, row in rows.items():
        cells = " | ".join(f"{row['denoisers'][d]:.3f}" for d in labels)
        d = change.get(key)
        span_delta = f"{d['span_denoising']:+.1%}" if d else ""
        l2r_delta = f"{d['l2r']:+.2%}" if d else ""
        lines.append(
            f"| {WHAT[key]} | {row['span_denoising']:.3f} | {span_delta} | {cells} | "
            f"{row['l2r']:.4f} | {l2r_delta} |"
        )
    lines += ["", "| UL2R step | span denoising | " + " | ".join(labels) + " | left-to-right |"]
    lines.append("|---|---|" + "---|" * len(labels) + "---|")
    for p in result["curve"]:
        cells = " | ".join(f"{p[d]:.3f}" for d in labels)
        lines.append(f"| {p['step']} | {p['span_denoising']:.3f} | {cells} | {p['l2r']:.4f} |")
    lines.append("")
    lines.append(
        f"UL2R: span-denoising loss {change['ul2r']['span_denoising']:+.1%}, left-to-right "
        f"loss {change['ul2r']['l2r']:+.2%} (bound +{L2R_BOUND:.0%}); "
        f"{result['setting']['ul2r_steps']} steps in {result['train_seconds']:.0f} s; "
        f"effect holds: {result['holds']}"
    )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    curve = result["curve"]
    steps = [p["step"] for p in curve]
    left.plot(steps, [p["span_denoising"] for p in curve], "o-", label="span denoising")
    for name in result["rows"]["base"]["denoisers"]:
        left.plot(steps, [p[name] for p in curve], ".--", alpha=0.6, label=name)
    left.set_xlabel("UL2R step")
    left.set_ylabel("held-out loss (target tokens)")
    left.set_title("denoising during the UL2R phase")
    left.legend(fontsize=8)
    base = result["rows"]["base"]["l2r"]
    right.plot(steps, [100 * (p["l2r"] / base - 1) for p in curve], "o-", label="UL2R")
    control = result["change"]["causal"]["l2r"]
    right.plot([steps[-1]], [100 * control], "s", color="tab:gray", label="causal control")
    right.axhline(100 * L2R_BOUND, color="tab:red", ls="--", label=f"+{L2R_BOUND:.0%} bound")
    right.axhline(0, color="black", lw=0.5)
    right.set_xlabel("UL2R step")
    right.set_ylabel("left-to-right loss vs base (%)")
    right.set_title("left-to-right loss on held-out problems")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("out/fidelity"))
    parser.add_argument("--docs", type=Path, help="Write ul2r.md, ul2r.json, ul2r.png here.")
    args = parser.parse_args(argv)
    result = run(args.work.resolve(), lib.Scale())
    text = table(result)
    print(text)
    if args.docs is not None:
        lib.write_docs(args.docs, "ul2r", text, result)
        plot(result, args.docs / "ul2r.png")


if __name__ == "__main__":
    main()

"""Peak memory (RSS) of a few `mmath ul2r train` steps, measured in a child process.

    python scripts/ul2r_memory.py out/smollm2-base --seq 512 --batch 8 --steps 2
    python scripts/ul2r_memory.py out/smollm2-base --tiny         # a 2-layer stand-in

Each run trains ``--steps`` steps of the ``ul2r`` preset on generated word problems, with
evaluation and checkpoints off, in a fresh process (so nothing of an earlier run counts) and
prints the peak resident set size, the RSS once the model is loaded, and the seconds per step.
``--set key=value`` passes config overrides (e.g. ``training.gradient_checkpointing=true``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _tiny(folder: Path, like: Path) -> Path:
    """A 2-layer stand-in of ``like`` (hidden 128): same tokenizer and vocabulary, so the
    logits over the vocabulary weigh as they do in the real model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(like)
    config.update(
        {
            "num_hidden_layers": 2,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
        }
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(like).save_pretrained(folder)
    return folder


def child(args: argparse.Namespace) -> None:
    import time

    import torch

    from mergekit_math.data.gsm_symbolic import generate
    from mergekit_math.ul2r.presets import build_config
    from mergekit_math.ul2r.train import train

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ul2r-memory-"))
    corpus = work / "corpus.jsonl"
    problems = generate(400, seed=0)
    corpus.write_text(
        "".join(json.dumps({"text": f"{p.question}\n{p.answer}"}) + "\n" for p in problems)
    )
    model = Path(args.model)
    if args.tiny:
        model = _tiny(work / "tiny", model)
    overrides = {
        "training.sequence_length": args.seq,
        "training.batch_size": args.batch,
        "training.steps": args.steps + 1,
        "training.warmup_steps": 1,
        "eval.interval": 0,
        "save.interval": 0,
    }
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1] in '0123456789tf[{"-' else value
    config = build_config(str(model), "ul2r", data=[str(corpus)], overrides=overrides)
    started = time.perf_counter()
    result = train(config, work / "out", progress=False, echo=lambda m: None, stop_after=args.steps)
    seconds = (time.perf_counter() - started) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "model": args.model + (" (2-layer stand-in)" if args.tiny else ""),
                "seq": args.seq,
                "batch": args.batch,
                "steps": result.step,
                "peak_rss_mb": round(peak),
                "rss_end_mb": round(_rss_mb()),
                "seconds_per_step": round(seconds, 2),
                "loss": [round(r["loss"], 5) for r in result.history if "loss" in r],
                "set": args.set,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model folder")
    p.add_argument("--tiny", action="store_true", help="a 2-layer stand-in of the model")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], check=False)
    sys.exit(out.returncode)


if __name__ == "__main__":
    main()

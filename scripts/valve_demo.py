"""CoT-Valve on two tiny models trained here, end to end, in about a minute on a CPU.

A long-chain model L learns to answer ``What is a + b * c?`` with a two-step worked chain; a
short-chain model S is L tuned further to answer ``#### N`` alone. The script extracts the
direction Δ = S − L, sweeps α and writes the sweep's table and figure (valve.md, valve.png),
then builds a MixChain set from α = 0, 0.5 and 1:

    python scripts/valve_demo.py docs/valve            # outputs in docs/valve/

The models come from ``tests/tiny_math.py`` (the helpers the tests train with).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tiny_math import train  # noqa: E402


@dataclass
class Problem:
    question: str
    answer: str
    final: int


def problems(n: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = (rng.randint(2, 9) for _ in range(3))
        x, y = b * c, a + b * c
        chain = f"{b} * {c} = <<{b}*{c}={x}>>{x}. {a} + {x} = <<{a}+{x}={y}>>{y}.\n#### {y}"
        out.append(Problem(f"What is {a} + {b} * {c}?", chain, y))
    return out


def mmath(*args: object) -> None:
    cmd = [sys.executable, "-m", "mergekit_math", *map(str, args)]
    print("$ mmath " + " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True)


def train_pair(work: Path, n: int) -> tuple[list[Problem], Path, Path, Path]:
    """``n`` problems (also written to ``work/problems.jsonl``), the long-chain model L and the
    short-chain model S tuned from it, in ``work``."""
    probs = problems(n, seed=0)
    data = work / "problems.jsonl"
    data.write_text(
        "".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in probs)
    )
    print("training the long-chain model L ...", flush=True)
    long = train(work / "long", probs, lambda p: " " + p.answer, steps=400)
    print("training the short-chain model S from L ...", flush=True)
    short = train(work / "short", probs, start=long, steps=200)
    return probs, data, long, short


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for valve.md, valve.png, mixchain.jsonl")
    ap.add_argument("--alphas", default="0,0.25,0.5,0.75,1,1.25")
    ap.add_argument("--problems", type=int, default=6)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mmath-valve-demo-"))
    try:
        _, data, long, short = train_pair(work, args.problems)
        mmath("valve", "extract", "--long", long, "--short", short, "-o", work / "dir", "-q")
        sweep = work / "sweep"
        mmath(
            "valve",
            "sweep",
            "--model",
            long,
            "--direction",
            work / "dir",
            "--alphas",
            args.alphas,
            "--tasks",
            "gsm8k_local",
            "--data",
            data,
            "--num-fewshot",
            "0",
            "--gen-kwargs",
            "max_gen_toks=64",
            "-o",
            sweep,
        )
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("valve.md", "valve.png", "valve.jsonl"):
            shutil.copy(sweep / name, args.out / name)
        mmath(
            "valve",
            "mixchain",
            "--model",
            long,
            "--direction",
            work / "dir",
            "--alphas",
            "0,0.5,1",
            "--data",
            data,
            "-o",
            args.out / "mixchain.jsonl",
            "--force",
            "--max-new-tokens",
            "64",
            "--prompt",
            "Question: {question}\\nAnswer:",
            "--models-dir",
            sweep / "models",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

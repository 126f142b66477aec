"""Sweep points per hour, on disk and ``--in-memory``, on generated models.

    python scripts/bench_sweep_points.py --shape tiny --points 6
    python scripts/bench_sweep_points.py --shape standin --points 4 --limit 2

Generates a base and a "fine-tune" (base + small noise) of the chosen shape with the tests'
character-level tokenizer (kept in --work and reused): ``tiny`` is the sweep tests' Llama (2
layers, 64 wide, fp32), ``standin`` a ~270M-parameter Llama in bf16 (6 layers, 2048 wide, 540
MB of weights) with random weights. Then runs ``mmath sweep`` of task_arithmetic over
``--points`` weights, once per mode (disk first, then in-memory; ``--no-cache``, one process),
each in a fresh folder, with ``--threads`` (default 1), and prints per mode: the command's
wall time, points per hour over it, and the steady-state seconds per point (median of merge +
eval seconds, the first point left out: it pays the imports and, in memory, the skeleton).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, dtype="float32"),
    "standin": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=6, dtype="bfloat16"
    ),
}


def build(work: Path, shape: str) -> Path:
    """base/ and ft/ of the shape under work/shape (reused when present); returns that."""
    import torch
    from tiny_math import CHARS, build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    root = work / shape
    if (root / "ft" / "config.json").is_file():
        return root
    spec = dict(SHAPES[shape])
    dtype = getattr(torch, spec.pop("dtype"))
    heads = max(4, spec["hidden_size"] // 128)
    config = LlamaConfig(
        **spec,
        num_attention_heads=heads,
        num_key_value_heads=heads // 4 or 1,
        vocab_size=len(CHARS) + 4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    for name, noise in (("base", 0.0), ("ft", 0.01)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
        model.save_pretrained(root / name)
        build_tokenizer(root / name)
    problems = [(a, 7 - a) for a in range(1, 7)]
    (root / "data.jsonl").write_text(
        "".join(
            json.dumps({"question": f"What is {a} plus {b}?", "answer": f"{a}+{b}=7\n#### 7"})
            + "\n"
            for a, b in problems
        )
    )
    (root / "ta.yaml").write_text(
        "merge_method: task_arithmetic\nbase_model: base\n"
        "models:\n  - model: ft\n    parameters: {weight: 1.0}\n"
    )
    return root


def run(
    root: Path, out: Path, points: int, limit: int | None, threads: int, in_memory: bool
) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    step = 1 / max(1, points - 1)
    values = ",".join(f"{i * step:.4g}" for i in range(points))
    cmd = [sys.executable, "-m", "mergekit_math", "sweep", str(root / "ta.yaml")]
    cmd += ["--set", f"models[0].parameters.weight={values}", "--tasks", "gsm8k_local"]
    cmd += ["--data", str(root / "data.jsonl"), "--num-fewshot", "0", "--batch-size", "6"]
    cmd += ["--gen-kwargs", "max_gen_toks=16", "--no-cache", "-q", "-o", str(out)]
    cmd += ["--limit", str(limit)] if limit else []
    cmd += ["--threads", str(threads)]
    cmd += ["--in-memory"] if in_memory else []
    env = dict(os.environ, PYTHONPATH=str(ROOT), MMATH_CACHE_DIR=str(out.parent / "cache"))
    began = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - began
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    per_point = [r["merge_seconds"] + r["eval_seconds"] for r in rows[1:]]
    steady = statistics.median(per_point)
    return {
        "mode": "in-memory" if in_memory else "disk",
        "points": len(rows),
        "wall_s": round(wall, 1),
        "points_per_hour_wall": round(3600 * len(rows) / wall),
        "steady_s_per_point": round(steady, 2),
        "merge_s": round(statistics.median(r["merge_seconds"] for r in rows[1:]), 2),
        "eval_s": round(statistics.median(r["eval_seconds"] for r in rows[1:]), 2),
        "points_per_hour_steady": round(3600 / steady),
        "fingerprints": [r["fingerprint"] for r in rows],
        "metrics": [r["metrics"] for r in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--points", type=int, default=6)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per point")
    parser.add_argument("--work", type=Path, default=Path("out/bench-sweep-points"))
    args = parser.parse_args()
    root = build(args.work.resolve(), args.shape)
    results = [
        run(root, root / f"sweep-{mode}", args.points, args.limit, args.threads, mode == "mem")
        for mode in ("disk", "mem")
    ]
    same = all(
        r["fingerprints"] == results[0]["fingerprints"] and r["metrics"] == results[0]["metrics"]
        for r in results
    )
    for r in results:
        r.pop("fingerprints"), r.pop("metrics")
        print(json.dumps(r))
    print(f"same fingerprints and metrics both ways: {same}")


if __name__ == "__main__":
    main()

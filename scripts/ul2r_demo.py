"""A short, real UL2R run: SmolLM2-135M on generated grade-school math problems, on the CPU.

Writes the config (`mmath ul2r config`), prints `mmath ul2r preview` for every denoiser,
trains a few dozen steps (`mmath ul2r train`), then prints the loss curve (train loss per step,
held-out denoising loss every few steps) and saves it as a PNG when matplotlib is installed.

    python scripts/smollm2.py demo/base                  # once: the bf16 SmolLM2-135M export
    python scripts/ul2r_demo.py                          # ~5 min on 2 CPU cores
    python scripts/ul2r_demo.py --steps 60 --device cuda --out out/ul2r-demo
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from mergekit_math.data.gsm_symbolic import generate, write_jsonl
from mergekit_math.ul2r.config import load_config
from mergekit_math.ul2r.presets import build_config, render_config
from mergekit_math.ul2r.preview import preview
from mergekit_math.ul2r.train import train

ROOT = Path(__file__).resolve().parent.parent
SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))] for v in values)


def plot(history: list[dict], path: Path, title: str) -> bool:
    """Train loss per step and held-out loss as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train_rows = [r for r in history if "loss" in r]
    eval_rows = [r for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss")
    ax.plot(
        [r["step"] for r in eval_rows],
        [r["eval_loss"] for r in eval_rows],
        "o-",
        label="held-out denoising loss",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on target tokens")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "demo" / "base"))
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "ul2r-demo")
    parser.add_argument("--preset", default="ul2r")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--problems", type=int, default=400)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise SystemExit(f"{model} is not a model folder; run: python scripts/smollm2.py {model}")
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    data = args.out / "gsm_symbolic.jsonl"
    write_jsonl(generate(args.problems, seed=0), data)

    eval_every = max(1, args.steps // 6)
    config = build_config(
        str(model.resolve()),
        args.preset,
        data=[str(data)],
        overrides={
            "data.text_template": "Question: {question}\nAnswer: {answer}",
            "training.sequence_length": args.sequence_length,
            "training.batch_size": args.batch_size,
            "training.steps": args.steps,
            "training.learning_rate": args.learning_rate,
            "training.warmup_steps": max(1, args.steps // 10),
            "eval.interval": eval_every,
            "eval.batches": 2,
            "eval.holdout_documents": 32,
            "save.interval": 0,
        },
    )
    config_path = args.out / "ul2r.yaml"
    run_dir = args.out / "run"
    config_path.write_text(render_config(config, f"mmath ul2r train {config_path} -o {run_dir}"))
    config = load_config(config_path)

    print(f"$ mmath ul2r preview {config_path} -n 1 --length 96 --no-color\n")
    print(preview(config, config_dir=config_path.parent, examples=1, length=96))

    print(f"$ mmath ul2r train {config_path} -o {run_dir} --device {args.device}\n")
    start = time.perf_counter()
    result = train(config, run_dir, config_dir=config_path.parent, device=args.device)
    elapsed = time.perf_counter() - start

    train_rows = [r for r in result.history if "loss" in r]
    eval_rows = [r for r in result.history if "eval_loss" in r]
    print(f"\n{len(train_rows)} steps in {elapsed:.0f} s, attention {result.attention}")
    print(f"train loss  {sparkline([r['loss'] for r in train_rows])}")
    print("\nstep  train loss  held-out loss  tokens/s")
    for r in result.history:
        loss = f"{r['loss']:.3f}" if "loss" in r else "-"
        held = f"{r['eval_loss']:.3f}" if "eval_loss" in r else ""
        speed = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else ""
        print(f"{r['step']:>4}  {loss:>10}  {held:>13}  {speed:>8}")
    if eval_rows:
        per = eval_rows[-1]["eval_denoisers"]
        first = eval_rows[0]["eval_denoisers"]
        print("\nheld-out loss per denoiser (first -> last evaluation):")
        for name in per:
            print(f"  {name:<8} {first.get(name, float('nan')):.3f} -> {per[name]:.3f}")
    summary = {
        "steps": len(train_rows),
        "seconds": elapsed,
        "train_loss": [r["loss"] for r in train_rows],
        "eval": [{"step": r["step"], "loss": r["eval_loss"]} for r in eval_rows],
        "final": str(result.final),
    }
    (args.out / "loss_curve.json").write_text(json.dumps(summary, indent=2) + "\n")
    png = args.out / "loss_curve.png"
    title = f"UL2R ({args.preset}) on {model.parent.name}/{model.name}: {len(train_rows)} steps"
    if plot(result.history, png, title):
        print(f"\nloss curve: {png}")
    else:
        print("\nmatplotlib is not installed; no PNG (pip install matplotlib)")
    print(f"model: {result.final}")


if __name__ == "__main__":
    main()

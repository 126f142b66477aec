"""Effect 2 (PortLLM, Khan et al. 2025) in the fidelity setting: a specialist's patch, extracted
against the base it was fine-tuned from (v1) and applied to a continued-pretrained base (v2),
keeps the skill with no training: v2 + patch reaches at least 90% of the specialist's accuracy,
where v2 alone does not; for dense, low-rank and sparse patches, with their sizes on disk.

    python scripts/fidelity_portllm.py                       # work in out/fidelity/
    python scripts/fidelity_portllm.py --docs docs/fidelity  # also write the table, JSON, plot

The models come from ``scripts/fidelity_lib.py`` (trained once, cached under WORK/models):
``base_v2`` is the base continued 300 steps on a fresh draw of the pretraining corpus at a
tenth of its rate; ``addsub`` and ``muldiv`` are the base (v1) fine-tuned 200 steps on one
skill. Every patch is an ``mmath patch extract --base base --finetuned SPECIALIST``, every
ported model an ``mmath patch apply --base base_v2``, every score an ``mmath eval --tasks
gsm8k_local`` of held-out problems (zero-shot, greedy, strict ``#### N`` match).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity_lib as lib  # noqa: E402

# name: (mmath patch extract options, what it is)
PATCHES: dict[str, tuple[tuple[str, ...], str]] = {
    "dense": (("--encoding", "dense"), "dense Δ (float32)"),
    "lowrank_r16": (("--encoding", "lowrank", "--rank", "16"), "low rank, r = 16"),
    "lowrank_r4": (("--encoding", "lowrank", "--rank", "4"), "low rank, r = 4"),
    "sparse_d0.5": (("--encoding", "sparse", "--drop", "0.5"), "sparse (DARE), density 0.5"),
    "sparse_d0.1": (("--encoding", "sparse", "--drop", "0.9"), "sparse (DARE), density 0.1"),
}
BAR = 0.9  # PortLLM's claim: the ported patch keeps this fraction of the specialist's accuracy


def patch(work: Path, models: Path, skill: str, name: str) -> Path:
    """``mmath patch extract`` SKILL − base into WORK/patches/SKILL/NAME (skipped when there)."""
    out = work / "patches" / skill / name
    if not (out / "patch.json").is_file():
        options, _ = PATCHES[name]
        lib.mmath(
            "patch", "extract", "--base", models / "base", "--finetuned", models / skill,
            "-o", out, *options, "--force", "-q",
        )  # fmt: skip
    return out


def applied(work: Path, models: Path, patch_dir: Path, target: str, tag: str) -> Path:
    """``mmath patch apply`` the patch to ``target`` into WORK/ported/TAG (skipped when there)."""
    out = work / "ported" / tag
    if not (out / "model.safetensors").is_file():
        lib.mmath(
            "patch", "apply", "--patch", patch_dir, "--base", models / target, "-o", out,
            "--force", "-q",
        )  # fmt: skip
    return out


def size(folder: Path) -> int:
    """Bytes on disk of a patch or model folder (all its files)."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def run(
    work: Path,
    scale: lib.Scale,
    skills: tuple[str, ...] = lib.SKILLS,
    patches: tuple[str, ...] = tuple(PATCHES),
    on_v1: tuple[str, ...] | None = None,
) -> dict:
    """Train (or reuse) base, base_v2 and the specialists of ``skills``; extract each patch
    kind against the base, apply it to base_v2 (and, as a check, the ``on_v1`` ones, default
    all, to the base) and evaluate each model on the specialist's skill; the numbers."""
    models = lib.build(work, scale, ("base", "base_v2", *skills))
    data = lib.write_eval(work, scale.eval_n, scale.seed)

    def acc(model: Path, skill: str, tag: str) -> dict[str, float]:
        return lib.evaluate(model, data[skill], work / "evals" / tag / skill)

    result: dict = {"setting": scale.__dict__, "model_bytes": size(models / "base"), "skills": {}}
    for skill in skills:
        rows: dict[str, dict] = {
            "specialist": {
                "what": f"{skill} specialist (v1 fine-tune)",
                **acc(models / skill, skill, skill),
            },
            "v1": {"what": "base v1 alone", **acc(models / "base", skill, "base")},
            "v2": {"what": "base v2 alone", **acc(models / "base_v2", skill, "base_v2")},
        }
        for name in patches:
            folder = patch(work, models, skill, name)
            targets = [("base_v2", "v2")]
            if on_v1 is None or name in on_v1:
                targets.append(("base", "v1"))
            for target, key in targets:
                tag = f"{key}+{skill}_{name}"
                model = applied(work, models, folder, target, tag)
                rows[f"{key}+{name}"] = {
                    "what": f"{key} + {PATCHES[name][1]}",
                    "patch": name,
                    "bytes": size(folder),
                    **acc(model, skill, tag),
                }
        result["skills"][skill] = rows
    result["holds"] = holds(result)
    return result


def kept(rows: dict, key: str) -> float:
    """A row's accuracy as a fraction of the specialist's."""
    return rows[key]["accuracy"] / max(rows["specialist"]["accuracy"], 1e-9)


def holds(result: dict) -> dict[str, dict[str, dict[str, bool]]]:
    """Per skill and patch: whether v2 + patch keeps ≥ BAR of the specialist's accuracy
    (PortLLM's claim) and whether it beats v2 alone (the patch, not v2, brings the skill)."""
    out: dict[str, dict[str, dict[str, bool]]] = {}
    for skill, rows in result["skills"].items():
        out[skill] = {
            r["patch"]: {
                "kept": kept(rows, key) >= BAR,
                "beats_v2": r["accuracy"] > rows["v2"]["accuracy"],
            }
            for key, r in rows.items()
            if key.startswith("v2+")
        }
    return out


def table(result: dict) -> str:
    dense_bytes = {
        skill: rows["v2+dense"]["bytes"] if "v2+dense" in rows else None
        for skill, rows in result["skills"].items()
    }
    lines = [
        "| skill | model | accuracy | kept vs specialist | patch bytes | vs dense | mean tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for skill, rows in result["skills"].items():
        for key, row in rows.items():
            nbytes = row.get("bytes")
            dense = dense_bytes[skill]
            ratio = f"{nbytes / dense:.0%}" if nbytes and dense else ""
            lines.append(
                f"| {skill} | {key} ({row['what']}) | {row['accuracy']:.3f} | "
                f"{kept(rows, key):.0%} | {nbytes if nbytes else ''} | {ratio} | "
                f"{row['mean_tokens']:.1f} |"
            )
    lines.append("")
    lines.append(
        f"model size (base, safetensors + config + tokenizer): {result['model_bytes']} bytes"
    )
    for skill, by_patch in result["holds"].items():
        for test, what in (
            ("kept", f"keeps ≥ {BAR:.0%} of the specialist"),
            ("beats_v2", "beats v2 alone"),
        ):
            ok = [p for p, v in by_patch.items() if v[test]]
            lines.append(
                f"{skill}: v2 + patch {what} for {', '.join(ok) if ok else 'no patch'} "
                f"({len(ok)}/{len(by_patch)})"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skills = list(result["skills"])
    fig, axes = plt.subplots(1, len(skills), figsize=(5.5 * len(skills), 4.2), squeeze=False)
    for ax, skill in zip(axes[0], skills):
        rows = result["skills"][skill]
        names = [k for k in rows if not k.startswith("v1+")]
        values = [rows[k]["accuracy"] for k in names]
        colors = ["tab:gray" if "+" not in k else "tab:blue" for k in names]
        ax.bar(range(len(names)), values, color=colors)
        ax.axhline(BAR * rows["specialist"]["accuracy"], color="tab:red", ls="--",
                   label=f"{BAR:.0%} of the specialist")  # fmt: skip
        labels = [
            f"{k}\n{rows[k]['bytes'] / 1e6:.2f} MB" if "bytes" in rows[k] else k for k in names
        ]
        ax.set_xticks(range(len(names)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"{skill}: patch from v1, applied to v2")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("out/fidelity"))
    parser.add_argument("--docs", type=Path, help="Write portllm.md, .json, .png here.")
    args = parser.parse_args(argv)
    result = run(args.work.resolve(), lib.Scale())
    text = table(result)
    print(text)
    if args.docs is not None:
        lib.write_docs(args.docs, "portllm", text, result)
        plot(result, args.docs / "portllm.png")


if __name__ == "__main__":
    main()

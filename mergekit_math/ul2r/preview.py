"""What the model will see: a few examples per denoiser, with sentinels, targets and loss mask.

Only the tokenizer is loaded. Examples are made exactly as training makes them (same streams,
same per-example generators), with the denoiser forced so that each one is shown. With colour,
mode tokens are magenta, sentinels cyan and target text green; the loss-mask strip marks
target positions with ``█`` (loss) and the rest with ``·``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_math.errors import UserError
from mergekit_math.io.resolve import resolve_model
from mergekit_math.ul2r.config import UL2RConfig, parse_config
from mergekit_math.ul2r.data import build_run_data, resolve_sources

STRIP_WIDTH = 64
_CODES = {"mode": "1;35", "sentinel": "1;36", "target": "32", "dim": "2", "head": "1"}


@dataclass(frozen=True)
class Palette:
    """ANSI styling, or none."""

    color: bool

    def __call__(self, text: str, kind: str) -> str:
        if not self.color or not text:
            return text
        return f"\x1b[{_CODES[kind]}m{text}\x1b[0m"


def _render_tokens(
    ids: Sequence[int],
    tokenizer: Any,
    special: dict[int, tuple[str, str]],
    paint: Palette,
    kind: str | None,
) -> str:
    """Text of ``ids``: ordinary runs decoded by the tokenizer; sentinels and mode tokens
    (``special``: id -> (token string, "sentinel" or "mode")) shown by name and coloured."""
    parts: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            parts.append(paint(text, kind) if kind else text)
            run.clear()

    for t in ids:
        if t in special:
            flush()
            parts.append(paint(*special[t]))
        else:
            run.append(t)
    flush()
    return "".join(parts)


def _indent(text: str, pad: str = "    ") -> str:
    return "\n".join(pad + line for line in text.split("\n"))


def loss_strip(inputs: int, targets: int, paint: Palette, width: int = STRIP_WIDTH) -> str:
    """``·`` for input positions and ``█`` for target positions, scaled to ``width``."""
    total = inputs + targets
    loss = round(width * targets / total) if total else 0
    if targets and loss == 0:
        loss = 1
    return paint("·" * (width - loss), "dim") + paint("█" * loss, "target")


def preview(
    config: UL2RConfig,
    *,
    config_dir: Path | None = None,
    data: Sequence[str] | None = None,
    examples: int = 2,
    length: int | None = None,
    color: bool = False,
) -> str:
    """Text showing ``examples`` examples of every denoiser of ``config``."""
    from transformers import AutoTokenizer

    from mergekit_math.ul2r.tokens import resolve_tokens

    if examples < 1:
        raise UserError(f"--examples: expected at least 1, got {examples}")
    if length is not None:
        raw = config.model_dump(mode="json")
        raw["training"]["sequence_length"] = length
        config = parse_config(raw, source="--length")
    # Preview reads training documents only; no held-out split is needed.
    raw = config.model_dump(mode="json")
    raw["eval"]["interval"] = 0
    config = parse_config(raw, source="config")
    sources = resolve_sources(config, config_dir, data)
    model_dir = resolve_model(config.model, "model", config_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"model: cannot load the tokenizer of {model_dir}: {exc}") from None
    tokens = resolve_tokens(tokenizer, config)
    factory = build_run_data(config, tokenizer, tokens, sources).factory
    paint = Palette(color)
    special = {tid: (tokenizer.convert_ids_to_tokens(tid), "sentinel") for tid in tokens.sentinels}
    special |= {
        tid: (tokenizer.convert_ids_to_tokens(tid), "mode") for tid in tokens.modes.values()
    }

    seq = config.training.sequence_length
    lines = [
        paint(f"model {model_dir}", "head"),
        f"sequence length {seq}, attention {config.attention}, "
        f"{len(config.denoisers)} denoisers, data: "
        + "; ".join(
            (f"{s.name}: " if len(sources) > 1 else "") + ", ".join(p.name for p in s.paths)
            for s in sources
        ),
    ]
    if tokens.reused:
        lines.append(
            "reserved tokens stand for: "
            + ", ".join(f"{k} = {v}" for k, v in list(tokens.reused.items())[:6])
            + (" …" if len(tokens.reused) > 6 else "")
        )
    for i, d in enumerate(config.denoisers):
        lines.append("")
        lines.append(paint(f"denoiser[{i}] {d.label}: {d.describe()}; weight {d.weight:g}", "head"))
        for j in range(examples):
            ex, source = factory.make(i * examples + j, 0, denoiser=i)
            n_in, n_tg = len(ex.inputs), len(ex.targets)
            what = f"{ex.spans} spans, " if d.kind == "span" else ""
            lines.append(
                f"  example {j + 1} ({sources[source].name}): {n_in + n_tg} tokens = {n_in} "
                f"inputs + {n_tg} targets, {what}loss on {n_tg} (the targets)"
            )
            lines.append("  inputs:")
            lines.append(_indent(_render_tokens(ex.inputs, tokenizer, special, paint, None)))
            lines.append("  targets:")
            lines.append(_indent(_render_tokens(ex.targets, tokenizer, special, paint, "target")))
            if config.attention == "prefix_lm" and d.kind != "causal":
                att = f"bidirectional over the {n_in} input positions, causal over the targets"
            else:
                att = "causal"
            lines.append(f"  loss mask: {loss_strip(n_in, n_tg, paint)}  {n_in}×0 {n_tg}×1")
            lines.append(f"  attention: {att}")
    return "\n".join(lines) + "\n"

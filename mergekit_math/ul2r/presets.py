"""Denoiser presets and the commented YAML that ``mmath ul2r config`` writes.

Each preset cites its source; where the sources disagree the choice made here is stated in the
preset's notes, and the notes are copied into the written config.

Papers:

- UL2: Tay et al., "UL2: Unifying Language Learning Paradigms", arXiv:2205.05131 (ICLR 2023).
- U-PaLM: Tay et al., "Transcending Scaling Laws with 0.1% Extra Compute", arXiv:2210.11399.
- Domain upsampling: Blakeney et al., "Does your data spark joy? Performance gains from domain
  upsampling at the end of training", arXiv:2406.03476.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

import yaml
from pydantic import BaseModel

from mergekit_math.ul2r.config import (
    Denoiser,
    UL2RConfig,
    check_preset,
    parse_config,
    preset_denoisers,
    sentinels_needed,
)
from mergekit_math.ul2r.preset_table import (
    PRESETS,
    UL2_URL,
    UPALM_URL,
    UPSAMPLING_URL,
    Preset,
)

__all__ = [
    "PRESETS",
    "UL2_URL",
    "UPALM_URL",
    "UPSAMPLING_URL",
    "Preset",
    "build_config",
    "preset_denoisers",
    "render_config",
]


def build_config(
    model: str,
    preset: str = "ul2r",
    *,
    data: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> UL2RConfig:
    """A validated config for ``model`` from ``preset``.

    ``overrides`` maps dotted keys (``training.sequence_length``) to values. ``num_sentinels``
    is set to what the longest example needs at the chosen sequence length, and the warmup to
    a tenth of the steps (at most 50) when only the steps are given.
    """
    check_preset(preset, "--preset")
    raw: dict[str, Any] = {
        "model": model,
        "preset": preset,
        "denoisers": preset_denoisers(preset),
        "data": {"paths": list(data or [])},
    }
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    training = raw.setdefault("training", {})
    if "steps" in training and "warmup_steps" not in training:
        training["warmup_steps"] = min(50, training["steps"] // 10)
    seq = training.get("sequence_length", 512)
    needed = max(sentinels_needed(Denoiser(**d), seq) for d in raw["denoisers"])
    raw.setdefault("tokens", {}).setdefault("num_sentinels", needed)
    return parse_config(raw, source="config")


# --------------------------------------------------------------------------- commented YAML

SECTION_HEADERS = {
    "model": "Model folder or Hub id to continue training (a relative path is looked up from the "
    "current directory and from this file's folder).",
    "attention": "",
    "tokens": "Sentinels (<extra_id_k>) and mode tokens: existing tokens are used as they are; "
    "missing ones take the tokenizer's reserved tokens when reuse_reserved is on and it has "
    "some, else they are added and the embedding matrix grows, new rows set to the mean "
    "embedding.",
    "data": "Training text: JSONL with a text field, or plain text (documents separated by blank "
    "lines).",
    "training": "Optimisation: AdamW, warmup then the schedule down to "
    "min_learning_rate_ratio × learning_rate.",
    "eval": "",
    "save": "Checkpoints: OUT/checkpoint-NNNNNN (float32, with optimizer state, for --resume) "
    "and OUT/final (HF layout, safetensors) that mmath merge / patch extract / eval accept.",
}

UPSAMPLING_EXAMPLE = """\
# Domain upsampling ("Does your data spark joy?", Blakeney et al. 2024,
# {url}): a mixture of sources whose weights switch to final_weight over
# the last final_fraction of the steps (the paper upsamples domain data such as math and code
# over the final 10-20% of training). Replace 'null' with a block like this one, and leave
# data.paths empty (--data NAME=FILE,... replaces a source's paths):
# domain_upsampling:
#   final_fraction: 0.15
#   sources:
#     - name: general
#       paths: [general.jsonl]
#       weight: 0.9
#       final_weight: 0.6
#     - name: math
#       paths: [math.jsonl]
#       weight: 0.1
#       final_weight: 0.4
"""


def _scalar(value: Any) -> str:
    if isinstance(value, str) and "\n" in value:
        return json.dumps(value, ensure_ascii=False)  # a double-quoted YAML scalar
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1000)
    return text.removesuffix("\n...\n").strip()


def _comment(text: str, pad: str) -> list[str]:
    if not text:
        return []
    return [f"{pad}# {line}" for line in textwrap.wrap(text, width=96 - len(pad))]


def _render_fields(obj: BaseModel, pad: str) -> list[str]:
    lines: list[str] = []
    for name, info in type(obj).model_fields.items():
        value = getattr(obj, name)
        lines += _comment(info.description or "", pad)
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines += _render_fields(value, pad + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            lines.append(f"{pad}{name}:")
            for item in value:
                lines += _render_item(item.model_dump(mode="json"), pad + "  ")
        else:
            lines.append(f"{pad}{name}: {_scalar(value)}")
    return lines


def _render_item(data: dict[str, Any], pad: str) -> list[str]:
    return [
        f"{pad + '- ' if i == 0 else pad + '  '}{key}: {_scalar(value)}"
        for i, (key, value) in enumerate(data.items())
    ]


DENOISERS_HEADER = (
    "Mixture of denoisers. kind: span (T5/UL2 span corruption: corruption_rate r of the tokens, "
    "in spans of mean length mean_span_length μ, become numbered sentinels), prefix_lm "
    "(S-denoiser: one split; corruption_rate is the mean target fraction, at most 0.5) or causal "
    "(next-token prediction). Each example draws one denoiser by weight (the weights sum to 1); "
    "its mode_token opens the inputs."
)


def _render_denoisers(config: UL2RConfig) -> list[str]:
    lines = [*_comment(DENOISERS_HEADER, ""), "denoisers:"]
    for d in config.denoisers:
        lines += _render_item(d.model_dump(mode="json", exclude_none=True), "  ")
    return lines


def render_config(config: UL2RConfig, command: str) -> str:
    """``config`` as commented YAML opening with ``command``; parses back to ``config``."""
    preset = PRESETS.get(config.preset or "")
    lines = [f"# {command}", "#"]
    if preset is not None:
        lines += _comment(f"Preset {preset.name}: {preset.title}.", "")
        lines += _comment(f"Source: {preset.source}", "")
        if preset.notes:
            lines.append("# Where sources disagree, and what this preset does:")
            for note in preset.notes:
                wrapped = textwrap.wrap(note, width=92)
                lines.append(f"#   - {wrapped[0]}")
                lines += [f"#     {w}" for w in wrapped[1:]]
    lines.append("")
    lines += _comment(SECTION_HEADERS["model"], "")
    lines.append(f"model: {_scalar(config.model)}")
    lines += _comment(UL2RConfig.model_fields["preset"].description or "", "")
    lines.append(f"preset: {_scalar(config.preset)}")
    lines += _comment(UL2RConfig.model_fields["attention"].description or "", "")
    lines.append(f"attention: {config.attention}")
    lines.append("")
    lines += _render_denoisers(config)
    for section in ("tokens", "data"):
        lines.append("")
        lines += _comment(SECTION_HEADERS[section], "")
        lines.append(f"{section}:")
        lines += _render_fields(getattr(config, section), "  ")
    lines.append("")
    if config.domain_upsampling is None:
        lines += UPSAMPLING_EXAMPLE.format(url=UPSAMPLING_URL).splitlines()
        lines.append("domain_upsampling: null")
    else:
        lines += _comment(
            f"Domain upsampling (Blakeney et al. 2024, {UPSAMPLING_URL}): the source weights "
            "switch to final_weight over the last final_fraction of the steps.",
            "",
        )
        lines.append("domain_upsampling:")
        lines += _render_fields(config.domain_upsampling, "  ")
    for section in ("training", "eval", "save"):
        lines.append("")
        lines += _comment(SECTION_HEADERS[section], "")
        lines.append(f"{section}:")
        lines += _render_fields(getattr(config, section), "  ")
    return "\n".join(lines) + "\n"

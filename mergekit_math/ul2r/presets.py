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
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from mergekit_math.ul2r.config import (
    Denoiser,
    UL2RConfig,
    check_preset,
    parse_config,
    sentinels_needed,
)

UL2_URL = "https://arxiv.org/abs/2205.05131"
UPALM_URL = "https://arxiv.org/abs/2210.11399"
UPSAMPLING_URL = "https://arxiv.org/abs/2406.03476"


@dataclass(frozen=True)
class Preset:
    """A named mixture of denoisers with its provenance."""

    name: str
    title: str
    source: str
    notes: tuple[str, ...]
    denoisers: tuple[dict[str, Any], ...]


def _span(name: str, mode: str, mu: float, r: float, weight: float) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "span",
        "mode_token": mode,
        "mean_span_length": mu,
        "corruption_rate": r,
        "weight": weight,
    }


def _prefix(name: str, mode: str | None, weight: float, target: float = 0.5) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "prefix_lm",
        "mode_token": mode,
        "corruption_rate": target,
        "weight": weight,
    }


PRESETS: dict[str, Preset] = {
    "ul2r": Preset(
        name="ul2r",
        title="UL2R as in U-PaLM: 50% S, 25% R, 25% X",
        source=f"U-PaLM (Tay et al. 2022, {UPALM_URL}), section 3: the mixture PaLM was "
        "continued with for 0.1% extra compute.",
        notes=(
            "U-PaLM gives X one 25% share over (μ=32, r=0.15) and (μ=3, r=0.5); it is split "
            "evenly here.",
            "U-PaLM's long X span is μ=32; the UL2 paper uses μ=64 (see preset ul2).",
            "The S share is 50% in U-PaLM but 20% in UL2: continuing a causal LM keeps more "
            "left-to-right-like training.",
            "Mode tokens are spelled [NLU]/[NLG]/[S2S] as in UL2's released checkpoints and "
            "U-PaLM; the UL2 paper's text calls the paradigms [R]/[X]/[S].",
            "The S split point is uniform (target fraction 0.5 on average), as T5's prefix_lm "
            "that UL2's appendix code calls.",
        ),
        denoisers=(
            _prefix("S", "[S2S]", 0.5),
            _span("R", "[NLU]", 3, 0.15, 0.25),
            _span("X-long", "[NLG]", 32, 0.15, 0.125),
            _span("X-dense", "[NLG]", 3, 0.5, 0.125),
        ),
    ),
    "ul2": Preset(
        name="ul2",
        title="UL2's seven denoisers: R 40%, X 40%, S 20%",
        source=f"UL2 (Tay et al. 2022, {UL2_URL}), section 3.1.3 and its table of the final "
        "mixture: R (3, 0.15), (8, 0.15); X (3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5); S.",
        notes=(
            "The R and X shares are split evenly over their settings (20% per R, 10% per X).",
            "UL2's appendix code (ul2_objective) samples the tasks uniformly unless rates are "
            "given; the 40/40/20 shares follow the paper's table.",
            "UL2 samples span lengths around μ in the paper's description; its code, and this "
            "tool, use T5's random_spans_noise_mask (exact r and mean span per example).",
            "UL2 trained an encoder-decoder; decoder-only training here uses prefix-LM attention.",
            "Mode tokens: [NLU]/[NLG]/[S2S] as in the released UL2 checkpoints; the paper's text "
            "writes [R]/[X]/[S].",
        ),
        denoisers=(
            _span("R-3", "[NLU]", 3, 0.15, 0.2),
            _span("R-8", "[NLU]", 8, 0.15, 0.2),
            _span("X-3-dense", "[NLG]", 3, 0.5, 0.1),
            _span("X-8-dense", "[NLG]", 8, 0.5, 0.1),
            _span("X-64", "[NLG]", 64, 0.15, 0.1),
            _span("X-64-dense", "[NLG]", 64, 0.5, 0.1),
            _prefix("S", "[S2S]", 0.2),
        ),
    ),
    "causal-mix": Preset(
        name="causal-mix",
        title="Mostly causal LM: 60% causal, 20% prefix LM, 20% span corruption",
        source="No single paper: keeps the causal LM objective the model was trained with at "
        f"60% and adds UL2R's prefix LM and span corruption ({UPALM_URL}) at 20% each, for "
        "small models whose left-to-right ability should not drift.",
        notes=(
            "The span settings are U-PaLM's R (μ=3, r=0.15) and a long, dense (μ=32, r=0.5) "
            "that neither paper uses as such: U-PaLM pairs μ=32 with r=0.15, UL2 uses (64, 0.5).",
            "The causal denoiser has no mode token, so plain prompting is unchanged.",
        ),
        denoisers=(
            {"name": "causal", "kind": "causal", "mode_token": None, "weight": 0.6},
            _prefix("S", "[S2S]", 0.2),
            _span("R", "[NLU]", 3, 0.15, 0.1),
            _span("X", "[NLG]", 32, 0.5, 0.1),
        ),
    ),
}


def preset_denoisers(name: str) -> list[dict[str, Any]]:
    """The denoisers of preset ``name`` as config mappings."""
    return [dict(d) for d in PRESETS[check_preset(name)].denoisers]


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

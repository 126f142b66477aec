"""The denoiser presets as plain data: each a named mixture with its sources and notes.

Downstairs of :mod:`.config` (which expands ``preset:`` into its denoisers) and
:mod:`.presets` (which builds and renders configs): this module imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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

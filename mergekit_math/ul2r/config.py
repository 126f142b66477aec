"""The UL2R training config: a typed, strict schema whose errors name the YAML key.

A config says which model to continue training, which denoisers to mix (each with a mode token,
a mean span length μ, a corruption rate r and a mixture weight), how sentinels and mode tokens
enter the tokenizer, which attention the denoising examples get, where the text comes from
(optionally with domain upsampling over the final steps) and how to optimise, evaluate and save.

Every problem is reported before a model or data file is opened: an unknown key
(``training.learnig_rate``), a value out of range (``denoisers[2].corruption_rate``), weights
that do not sum to 1, an unknown preset, a sequence length too short for a denoiser, or fewer
sentinels than the longest example needs.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergekit_math.errors import UserError
from mergekit_math.ul2r.preset_table import PRESETS

PRESET_NAMES = ("ul2r", "ul2", "causal-mix")
DenoiserKind = Literal["span", "prefix_lm", "causal"]
# Reserved-token spellings of common tokenizers: Llama 3, Gemma, BERT/WordPiece, T5.
DEFAULT_RESERVED_PATTERN = (
    r"<\|reserved_special_token_\d+\|>|<unused\d+>|\[unused\d+\]|<extra_id_\d+>"
)
# Weights are written with a few decimals; sums within this of 1 are accepted.
WEIGHT_TOLERANCE = 1e-6


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _unit_open(value: float | None) -> float | None:
    if value is not None and not 0.0 < value < 1.0:
        raise ValueError("must be strictly between 0 and 1")
    return value


class Denoiser(_Strict):
    """One objective of the mixture.

    - ``span``: T5/UL2 span corruption. ``corruption_rate`` r of the tokens, in spans of mean
      length ``mean_span_length`` μ, are replaced by numbered sentinels in the inputs; the
      targets list each sentinel followed by the tokens it replaced.
    - ``prefix_lm``: the S-denoiser. The sequence is split once; the part before the split is
      the input (attended bidirectionally under ``attention: prefix_lm``), the rest is the
      target. ``corruption_rate`` is the mean fraction taken as target (at most 0.5; 0.5 draws
      the split point uniformly, as T5's ``prefix_lm`` does).
    - ``causal``: plain next-token prediction over the whole sequence.
    """

    name: str | None = Field(None, description="A label for logs and preview.")
    kind: DenoiserKind
    mode_token: str | None = Field(
        None, description="Paradigm token put before the inputs, e.g. [NLU]; none for plain LM."
    )
    mean_span_length: float | None = Field(None, description="μ: mean corrupted span length.")
    corruption_rate: float | None = Field(None, description="r: fraction of tokens corrupted.")
    weight: float = Field(description="Probability of drawing this denoiser for an example.")

    @field_validator("corruption_rate")
    @classmethod
    def _rate(cls, v: float | None) -> float | None:
        return _unit_open(v)

    @field_validator("mean_span_length")
    @classmethod
    def _mu(cls, v: float | None) -> float | None:
        if v is not None and not v >= 1.0:
            raise ValueError("must be at least 1")
        return v

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("must be in (0, 1]")
        return v

    @property
    def label(self) -> str:
        """``name`` or a description such as ``span μ=3 r=0.15``."""
        if self.name:
            return self.name
        if self.kind == "span":
            return f"span μ={self.mean_span_length:g} r={self.corruption_rate:g}"
        if self.kind == "prefix_lm":
            return "prefix_lm"
        return "causal"

    def describe(self) -> str:
        """Kind and parameters, e.g. ``span corruption μ=3 r=0.15, mode [NLU]``."""
        if self.kind == "span":
            text = f"span corruption μ={self.mean_span_length:g} r={self.corruption_rate:g}"
        elif self.kind == "prefix_lm":
            text = f"prefix LM (mean target fraction {self.target_fraction:g})"
        else:
            text = "causal LM"
        return text + (f", mode {self.mode_token}" if self.mode_token else ", no mode token")

    @property
    def target_fraction(self) -> float:
        """prefix_lm: the mean fraction of the sequence that is target (default 0.5)."""
        return 0.5 if self.corruption_rate is None else self.corruption_rate


class TokensConfig(_Strict):
    """How sentinels and mode tokens get ids."""

    sentinel_format: str = Field(
        "<extra_id_{}>", description="Sentinel spelling; {} is the span number from 0."
    )
    num_sentinels: int = Field(
        100, ge=0, description="Sentinels made available; the longest example must fit."
    )
    reuse_reserved: bool = Field(
        True,
        description="Map missing tokens onto the tokenizer's reserved tokens (no new rows) "
        "before adding new ones.",
    )
    reserved_pattern: str = Field(
        DEFAULT_RESERVED_PATTERN, description="Regex (full match) for reserved token strings."
    )

    @field_validator("sentinel_format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v.count("{}") != 1:
            raise ValueError("must contain '{}' exactly once (the sentinel number)")
        return v

    @field_validator("reserved_pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        import re

        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return v

    def sentinel(self, k: int) -> str:
        """The spelling of sentinel ``k``."""
        return self.sentinel_format.replace("{}", str(k))


class DataConfig(_Strict):
    """Where text comes from when there is no ``domain_upsampling``, and how it is read."""

    paths: list[str] = Field(
        default_factory=list, description="JSONL or text files; --data replaces them."
    )
    format: Literal["auto", "jsonl", "text"] = Field(
        "auto", description="auto: .jsonl/.json lines are JSON, anything else plain text."
    )
    text_field: str = Field("text", description="JSONL: the field holding the document text.")
    text_template: str | None = Field(
        None,
        description="JSONL: build the text from several fields instead, e.g. "
        "'Question: {question}\\nAnswer: {answer}' for mmath data gsm-symbolic files.",
    )
    packing: bool = Field(
        True,
        description="true: documents are concatenated (separator between) and cut into full "
        "examples; false: one document per example, padded.",
    )
    shuffle: bool = Field(True, description="Seeded document order, reshuffled each epoch.")
    separator: str | None = Field(
        None, description="Token between documents (default: the tokenizer's EOS)."
    )

    @field_validator("text_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        import string

        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as exc:
            raise ValueError(f"not a format string: {exc}") from None
        if not fields or any(not f.isidentifier() for f in fields):
            raise ValueError("expected {field} placeholders naming JSONL fields")
        return v


class SourceConfig(_Strict):
    """One data source of a domain-upsampling mixture."""

    name: str
    paths: list[str] = Field(min_length=1)
    weight: float = Field(description="Share of examples before the final phase.")
    final_weight: float = Field(description="Share of examples in the final phase.")

    @field_validator("weight", "final_weight")
    @classmethod
    def _share(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("must be in [0, 1]")
        return v


class DomainUpsampling(_Strict):
    """Source mixture with a different final phase ("Does your data spark joy?")."""

    final_fraction: float = Field(
        0.15, description="Fraction of the steps, at the end, that use the final weights."
    )
    sources: list[SourceConfig] = Field(min_length=1)

    @field_validator("final_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError("must be strictly between 0 and 1")
        return v


class TrainingConfig(_Strict):
    """Optimisation."""

    sequence_length: int = Field(512, ge=16, description="Tokens per example, mode included.")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    steps: int = Field(1000, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(2e-5, gt=0)
    min_learning_rate_ratio: float = Field(
        0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak."
    )
    warmup_steps: int = Field(50, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 turns clipping off.")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA when supported, fp32 otherwise."
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass instead of "
        "keeping them: less memory (SmolLM2-135M, 8 x 512 tokens, CPU: 4.6 instead of 9.2 GB "
        "peak) for one more forward pass per step; the weights are the same.",
    )


class EvalConfig(_Strict):
    """Denoising loss on held-out documents."""

    interval: int = Field(100, ge=0, description="Steps between evaluations; 0 turns it off.")
    batches: int = Field(
        4,
        ge=1,
        description="Micro-batches per evaluation: fixed held-out examples, the denoisers in turn; "
        "the reported loss weighs each denoiser's mean by its weight.",
    )
    holdout_documents: int = Field(
        32, ge=0, description="Documents per source kept out of training for evaluation."
    )


class SaveConfig(_Strict):
    """Checkpoints."""

    interval: int = Field(200, ge=0, description="Steps between checkpoints; 0: final only.")
    keep: int = Field(2, ge=1, description="Intermediate checkpoints kept (oldest removed).")
    max_shard_size: str = Field("5G", description="Largest safetensors shard: 500M, 2G, 5G.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Final model dtype (auto: the base model's). Intermediate checkpoints keep "
        "the float32 training weights so that --resume is exact.",
    )
    vocabulary: Literal["extended", "original"] = Field(
        "extended",
        description="extended: the final model keeps the added sentinel/mode tokens; original: "
        "they are dropped so the model merges with others on the base vocabulary.",
    )

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        from mergekit_math.io.writer import parse_size

        parse_size(v)
        return v


class UL2RConfig(_Strict):
    """A complete UL2R run, as ``mmath ul2r config`` writes it and ``train`` reads it."""

    model: str = Field(description="Model folder or Hub id to continue training.")
    preset: str | None = Field(
        None, description="Preset the denoisers came from; used when 'denoisers' is omitted."
    )
    attention: Literal["prefix_lm", "causal"] = Field(
        "prefix_lm",
        description="prefix_lm: bidirectional over mode token + inputs, causal over targets "
        "(4-D attention mask); causal: left-to-right everywhere.",
    )
    denoisers: list[Denoiser] = Field(default_factory=list)
    tokens: TokensConfig = Field(default_factory=TokensConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    domain_upsampling: DomainUpsampling | None = None
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    save: SaveConfig = Field(default_factory=SaveConfig)

    def mode_tokens(self) -> list[str]:
        """Distinct mode tokens in denoiser order."""
        out: list[str] = []
        for d in self.denoisers:
            if d.mode_token and d.mode_token not in out:
                out.append(d.mode_token)
        return out

    def training_view(self) -> dict[str, Any]:
        """What must not change between a checkpoint and ``--resume``: everything but
        ``save``, ``training.gradient_checkpointing`` and the data paths (compared
        separately, resolved)."""
        data = self.model_dump(mode="json")
        data.pop("save")
        data["training"].pop("gradient_checkpointing")  # memory only: same results
        data["data"].pop("paths")
        if data["domain_upsampling"]:
            for s in data["domain_upsampling"]["sources"]:
                s.pop("paths")
        return data


# --------------------------------------------------------------------------- lengths


def noise_count(length: int, rate: float) -> int:
    """Corrupted tokens of a ``length``-token example: ``round(length·r)``, at least 1 and at
    most ``length - 1`` (T5's ``random_spans_noise_mask``)."""
    return min(max(round(length * rate), 1), length - 1)


def max_span_count(length: int, rate: float, mean_span: float) -> int:
    """The most noise spans an example of ``length`` tokens can have: ``ceil(noise/μ)``, at least
    1 and at most the corrupted and the kept tokens (each span needs one of each)."""
    noise = noise_count(length, rate)
    return min(max(math.ceil(noise / mean_span), 1), noise, length - noise)


def raw_length(denoiser: Denoiser, sequence_length: int) -> int:
    """Text tokens one example of ``denoiser`` consumes so that it fits ``sequence_length``.

    A span example is ``mode + inputs + targets`` = ``mode + length + 2·spans`` tokens (each
    span puts one sentinel in the inputs and one in the targets).
    """
    budget = sequence_length - (1 if denoiser.mode_token else 0)
    if denoiser.kind != "span":
        return budget
    length = budget
    while length >= 2:
        spans = max_span_count(length, denoiser.corruption_rate, denoiser.mean_span_length)  # type: ignore[arg-type]
        if length + 2 * spans <= budget:
            return length
        length -= 1
    return 0


def sentinels_needed(denoiser: Denoiser, sequence_length: int) -> int:
    """The most sentinels one example of ``denoiser`` uses at ``sequence_length``."""
    if denoiser.kind != "span":
        return 0
    length = raw_length(denoiser, sequence_length)
    if length < 2:
        return 0
    return max(
        max_span_count(n, denoiser.corruption_rate, denoiser.mean_span_length)  # type: ignore[arg-type]
        for n in range(2, length + 1)
    )


# --------------------------------------------------------------------------- errors


def _yaml_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<config>"


def _format_error(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    path = _yaml_path(loc)
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key {loc[-1]!r}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}: {msg} (got {err.get('input')!r})"


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    for kind in ("extra_forbidden", "missing"):
        for err in errors:
            if err["type"] == kind:
                return _format_error(err)
    return _format_error(errors[0])


def _suggest(name: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_preset(name: str, where: str = "preset") -> str:
    """``name`` if it is a preset, else a UserError naming the choices."""
    if name not in PRESET_NAMES:
        raise UserError(
            f"{where}: unknown preset {name!r} (choose from {', '.join(PRESET_NAMES)})"
            + _suggest(name, PRESET_NAMES)
        )
    return name


def _check_sum(values: list[float], where: str, what: str) -> None:
    total = math.fsum(values)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        listed = ", ".join(f"{v:g}" for v in values)
        raise UserError(f"{where}: {what} sum to {total:g} ({listed}); they must sum to 1")


def _check_denoiser(d: Denoiser, where: str) -> None:
    if d.kind == "span":
        for key in ("mean_span_length", "corruption_rate"):
            if getattr(d, key) is None:
                raise UserError(f"{where}.{key}: required for a span denoiser")
    else:
        if d.mean_span_length is not None:
            raise UserError(
                f"{where}.mean_span_length: only span denoisers have spans (kind is {d.kind})"
            )
    if d.kind == "prefix_lm" and d.corruption_rate is not None and d.corruption_rate > 0.5:
        raise UserError(
            f"{where}.corruption_rate: a prefix_lm target is on average at most half the "
            f"sequence; use a value in (0, 0.5] (got {d.corruption_rate:g})"
        )
    if d.kind == "causal" and d.corruption_rate is not None:
        raise UserError(f"{where}.corruption_rate: a causal denoiser corrupts nothing")
    if d.mode_token is not None and not d.mode_token.strip():
        raise UserError(f"{where}.mode_token: must not be blank (use null for no mode token)")


def validate(config: UL2RConfig) -> UL2RConfig:
    """Cross-field checks that pydantic's per-field validation cannot express."""
    if config.preset is not None:
        check_preset(config.preset)
    if not config.denoisers:
        raise UserError("denoisers: required key is missing (list denoisers or name a preset)")
    for i, d in enumerate(config.denoisers):
        _check_denoiser(d, f"denoisers[{i}]")
    _check_sum([d.weight for d in config.denoisers], "denoisers", "the weights")
    seq = config.training.sequence_length
    for i, d in enumerate(config.denoisers):
        if raw_length(d, seq) < 2:
            raise UserError(
                f"denoisers[{i}]: training.sequence_length {seq} leaves no room for an example "
                f"of {d.describe()}"
            )
    needed = [(sentinels_needed(d, seq), i) for i, d in enumerate(config.denoisers)]
    most, worst = max(needed)
    if most > config.tokens.num_sentinels:
        d = config.denoisers[worst]
        raise UserError(
            f"tokens.num_sentinels: denoisers[{worst}] ({d.describe()}) needs {most} sentinels "
            f"at training.sequence_length {seq}; set num_sentinels to at least {most}"
        )
    sentinels = {config.tokens.sentinel(k) for k in range(config.tokens.num_sentinels)}
    for i, d in enumerate(config.denoisers):
        if d.mode_token in sentinels:
            raise UserError(f"denoisers[{i}].mode_token: {d.mode_token!r} is also a sentinel")
    if config.training.warmup_steps > config.training.steps:
        raise UserError(
            f"training.warmup_steps: {config.training.warmup_steps} is more than "
            f"training.steps ({config.training.steps})"
        )
    up = config.domain_upsampling
    if up is not None:
        names = [s.name for s in up.sources]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise UserError(f"domain_upsampling.sources[{i}].name: {name!r} is used twice")
        _check_sum([s.weight for s in up.sources], "domain_upsampling.sources", "the weights")
        _check_sum(
            [s.final_weight for s in up.sources], "domain_upsampling.sources", "the final_weights"
        )
        if config.data.paths:
            raise UserError(
                "data.paths: with domain_upsampling, list the files under "
                "domain_upsampling.sources[].paths instead"
            )
    return config


def preset_denoisers(name: str) -> list[dict[str, Any]]:
    """The denoisers of preset ``name`` as config mappings."""
    return [dict(d) for d in PRESETS[check_preset(name)].denoisers]


def parse_config(data: Any, source: str = "<config>") -> UL2RConfig:
    """Validate a config mapping; errors name the YAML key, prefixed by ``source``."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a UL2R config is a YAML mapping, got {type(data).__name__}")
    try:
        if not data.get("denoisers") and isinstance(data.get("preset"), str):
            preset = check_preset(data["preset"])
            data = {**data, "denoisers": preset_denoisers(preset)}
        config = UL2RConfig.model_validate(data)
        return validate(config)
    except ValidationError as exc:
        raise UserError(f"{source}: {_first_error(exc)}") from None
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None


def load_config(path: str | Path) -> UL2RConfig:
    """Read and validate a UL2R config file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_config(data, source=str(path))


def dump_config(config: UL2RConfig) -> str:
    """The fully resolved config as plain YAML (written next to every checkpoint)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

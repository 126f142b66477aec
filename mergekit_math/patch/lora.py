"""Import a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

For each targeted module PEFT's merged weight is W + ΔW with

    ΔW = scaling · B·A,   scaling = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora),

where r and lora_alpha come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the
module name (PEFT's rule: the first key K with ``re.match(rf"(.*\\.)?({K})$", module)``), and
ΔW is transposed for layers that store their weight as in × out (transformers' ``Conv1D`` in
GPT-2, i.e. ``fan_in_fan_out``) and for embeddings (``lora_embedding_A/B``).

PEFT names such as ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` map to
the base tensor ``model.layers.0.self_attn.q_proj.weight``. Full tensors saved in the adapter
(``modules_to_save``, biases with ``bias: all``, embedding layers) become dense deltas against
the base (left out when equal to it). DoRA, LoRA biases (``lora_bias``), ``target_parameters``
and ``layer_replication`` are refused.

Everything here reads headers only; :meth:`LoraAdapter.factors` and :meth:`LoraAdapter.full`
read one module's tensors when the extraction asks.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergekit_math.errors import UserError
from mergekit_math.io.input_file import InputFile, read_tensor
from mergekit_math.io.reader import FLOAT_DTYPES, Checkpoint, read_safetensors_header
from mergekit_math.io.resolve import inside

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Modules stored as transformers' Conv1D (weight in × out), per model type. PEFT applies
# fan_in_fan_out to them whatever the adapter config says (and never to nn.Linear).
CONV1D_MODULES: dict[str, re.Pattern[str]] = {
    "gpt2": re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)$"),
    "openai-gpt": re.compile(r"(^|\.)(c_attn|c_proj|c_fc)$"),
}

_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")
_EMBEDDING_FACTOR = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>A|B)(?:\.[^.]+)?$")
_WRAPPERS = re.compile(r"\.(base_layer|modules_to_save\.[^.]+|modules_to_save)(?=\.)")


class LoraConfig(BaseModel):
    """The fields of PEFT's ``LoraConfig`` the import needs (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    peft_type: str = "LORA"
    r: int = Field(8, ge=1)
    lora_alpha: float = 8
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    layer_replication: list[Any] | None = None
    base_model_name_or_path: str | None = None

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class LoraModule:
    """One base tensor changed by the adapter."""

    name: str  # the base tensor
    module: str  # PEFT's module name
    a_key: str | None = None
    b_key: str | None = None
    full_key: str | None = None  # a full tensor saved in the adapter
    rank: int = 0
    scaling: float = 0.0
    transpose: bool = False


@dataclass
class LoraAdapter:
    path: Path
    config: LoraConfig
    modules: dict[str, LoraModule]  # base tensor name -> module, in base order
    weights: InputFile  # opened (and its header validated) when the adapter was opened
    header: dict[str, Any]
    data_start: int

    def _read(self, key: str) -> torch.Tensor:
        import torch

        return read_tensor(self.weights, self.header[key], self.data_start).to(torch.float32)

    def factors(self, m: LoraModule) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B', A') in float32 with ΔW = B'·A' in the base weight's layout, scaling folded
        into B'; None when the module has only a full tensor."""
        if m.a_key is None or m.b_key is None:
            return None
        a, b = self._read(m.a_key), self._read(m.b_key)
        if m.transpose:  # ΔW = (B·A)ᵀ = Aᵀ·Bᵀ
            return a.T.contiguous() * m.scaling, b.T.contiguous()
        return b * m.scaling, a

    def delta(self, m: LoraModule) -> torch.Tensor | None:
        """ΔW in float32 in the base weight's layout, computed in PEFT's order
        (``transpose(B @ A) * scaling``, as ``merge_and_unload``); None without factors."""
        if m.a_key is None or m.b_key is None:
            return None
        product = self._read(m.b_key) @ self._read(m.a_key)
        return (product.T if m.transpose else product) * m.scaling

    def full(self, m: LoraModule) -> torch.Tensor | None:
        return None if m.full_key is None else self._read(m.full_key)

    def close(self) -> None:
        self.weights.close()


def open_lora(path: str | Path, base: Checkpoint, where: str = "--from-lora") -> LoraAdapter:
    """Validate an adapter against ``base`` from headers only: config, name mapping, ranks,
    scalings and every delta's shape. Messages start with ``where`` (the flag or YAML path)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{where}: adapter folder {path} does not exist")
    cfg_path = path / ADAPTER_CONFIG
    if not os.path.lexists(cfg_path):
        raise UserError(f"{where}: no {ADAPTER_CONFIG} in {path}")
    inside(path, ADAPTER_CONFIG, f"{where}: {cfg_path}")
    try:
        config = LoraConfig.model_validate(json.loads(cfg_path.read_bytes()))
    except (ValueError, OSError) as exc:  # JSONDecodeError, UnicodeDecodeError, a directory
        raise UserError(f"{cfg_path}: invalid JSON ({exc})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{cfg_path}: {loc}: {err['msg']}") from None
    if config.peft_type.upper() != "LORA":
        raise UserError(f"{cfg_path}: peft_type {config.peft_type!r}; only LORA is supported")
    for flag, what in (
        ("use_dora", "DoRA adapters"),
        ("lora_bias", "LoRA biases (lora_bias)"),
        ("target_parameters", "target_parameters"),
        ("layer_replication", "layer_replication"),
    ):
        if getattr(config, flag):
            raise UserError(f"{where}: {cfg_path}: {what} are not supported")
    weights = path / ADAPTER_WEIGHTS
    if not os.path.lexists(weights):
        other = "" if not (path / "adapter_model.bin").is_file() else " (convert the .bin)"
        raise UserError(f"{where}: no {ADAPTER_WEIGHTS} in {path}{other}")
    handle = InputFile(inside(path, ADAPTER_WEIGHTS, f"{where}: {weights}"))
    try:
        header, start = read_safetensors_header(handle)
        modules = _modules(config, header, base, weights, where)
    except BaseException:
        handle.close()
        raise
    return LoraAdapter(path, config, modules, handle, header, start)


def _modules(
    config: LoraConfig, header: dict[str, Any], base: Checkpoint, weights: Path, where: str
) -> dict[str, LoraModule]:
    """The base tensors the adapter changes, with ranks, scalings and checked shapes."""

    modules: dict[str, LoraModule] = {}

    def module_for(name: str, module: str, key: str) -> LoraModule:
        if name not in base.tensors:
            raise UserError(
                f"{where}: adapter tensor {key} changes {name}, which {base.ref} does not have"
            )
        if base.tensors[name].dtype not in FLOAT_DTYPES:
            raise UserError(f"{where}: adapter tensor {key} changes non-float tensor {name}")
        return modules.setdefault(name, LoraModule(name, module))

    embedding: set[str] = set()
    for key in sorted(k for k in header if k != "__metadata__"):
        rest = key.removeprefix(PEFT_PREFIX)
        match = _FACTOR.match(rest) or _EMBEDDING_FACTOR.match(rest)
        if match:
            module = match["module"]
            m = module_for(f"{module}.weight", module, key)
            setattr(m, "a_key" if match["which"] == "A" else "b_key", key)
            if match.re is _EMBEDDING_FACTOR:
                embedding.add(m.name)
            continue
        if ".lora_" in rest:
            raise UserError(f"{where}: unsupported adapter tensor {key} (not a LoRA A/B factor)")
        name = _WRAPPERS.sub("", rest)
        module_for(name, name.rpartition(".")[0], key).full_key = key

    if not modules:
        raise UserError(f"{where}: {weights} holds no LoRA factors")
    conv1d = CONV1D_MODULES.get(base.model_type)
    for m in modules.values():
        shape = base.tensors[m.name].shape
        if m.full_key is not None and tuple(header[m.full_key]["shape"]) != shape:
            raise UserError(
                f"{where}: shape mismatch for {m.name}: the adapter saves "
                f"{header[m.full_key]['shape']}, {base.ref} has {list(shape)}"
            )
        if m.a_key is None and m.b_key is None:
            continue
        if m.a_key is None or m.b_key is None:
            raise UserError(f"{where}: {m.module} has only one of its lora_A / lora_B factors")
        a_shape, b_shape = header[m.a_key]["shape"], header[m.b_key]["shape"]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise UserError(
                f"{where}: {m.module}: factors of shapes {b_shape}·{a_shape} do not multiply "
                "(LoRA on convolutions is not supported)"
            )
        m.rank = a_shape[0]
        want = pattern_value(config.rank_pattern, m.module, config.r)
        if want != m.rank:
            raise UserError(
                f"{where}: {m.module}: factors have rank {m.rank} but the adapter config gives "
                f"r={want} (check rank_pattern)"
            )
        alpha = pattern_value(config.alpha_pattern, m.module, config.lora_alpha)
        m.scaling = alpha / m.rank**0.5 if config.use_rslora else alpha / m.rank
        product = (b_shape[0], a_shape[1])
        if m.name in embedding:
            m.transpose = True
        elif product[0] == product[1]:
            listed = conv1d is not None and conv1d.search(m.module) is not None
            m.transpose = listed or (conv1d is None and config.fan_in_fan_out)
        else:
            m.transpose = product != shape
        out = product[::-1] if m.transpose else product
        if len(shape) != 2 or tuple(out) != shape:
            raise UserError(
                f"{where}: shape mismatch for {m.name}: the adapter's B·A gives "
                f"{list(out)}, {base.ref} has {list(shape)}"
            )
    order = {name: i for i, name in enumerate(base.tensors)}
    return dict(sorted(modules.items(), key=lambda kv: order[kv[0]]))

"""Which lm-eval model runs an evaluation: ``hf`` (transformers' ``HFLM``, CPU or CUDA) or
``vllm`` (lm-eval's ``VLLM`` over the vLLM engine; a CUDA GPU and ``pip install
'mergekit-math[vllm]'``).

Both see the same tasks, prompts and generation settings: lm-eval hands each request's
``generation_kwargs`` (temperature, top_p, max_gen_toks, do_sample, until) to the model, and
vLLM's wrapper turns them into a ``SamplingParams`` per request (``max_gen_toks`` becomes
``max_tokens``; ``do_sample`` only decides whether a temperature is kept). ``--samples K``
sends every request K times either way. vLLM batches and schedules on its own, so
``--batch-size`` and ``--device`` are HF's knobs; vLLM's are ``--vllm-args``.

Nothing heavy is imported here; :func:`check_backend` finds vllm without importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergekit_math.errors import UserError

Backend = Literal["hf", "vllm"]
BACKENDS = ("hf", "vllm")
VLLM_INSTALL = "pip install 'mergekit-math[vllm]'"
DEFAULT_SEED = 1234
"""vLLM's engine seed when --seed is not given (lm-eval's own default)."""


class VllmSettings(BaseModel):
    """The vLLM engine's settings, from ``--vllm-args k=v,...``."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one model is split over.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of each GPU's memory vLLM may take."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Context length (prompt + generation); default: the model's."
    )


def parse_backend(text: str, flag: str = "--backend") -> Backend:
    if text not in BACKENDS:
        raise UserError(f"{flag}: expected hf or vllm, got {text!r}")
    return text  # type: ignore[return-value]


def parse_vllm_args(values: dict[str, Any], flag: str = "--vllm-args") -> VllmSettings:
    """VllmSettings from parsed ``k=v`` pairs; a UserError naming the flag and the key."""
    try:
        return VllmSettings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        known = ", ".join(VllmSettings.model_fields)
        what = f"unknown key (known: {known})" if err["type"] == "extra_forbidden" else err["msg"]
        raise UserError(f"{flag}: {key}: {what}") from None


def check_backend(backend: str, flag: str = "--backend") -> None:
    """Refuse ``vllm`` where it cannot run (no vllm package, no CUDA device), in one line,
    before any work."""
    if backend != "vllm":
        return
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append(f"the vllm package is not installed ({VLLM_INSTALL})")
    import torch

    if not torch.cuda.is_available():
        missing.append("no CUDA device is available here (vLLM needs a CUDA GPU)")
    if missing:
        raise UserError(f"{flag} vllm: " + "; and ".join(missing))


def vllm_model_args(model_dir: Path, options: Any) -> dict[str, Any]:
    """The keyword arguments of lm-eval's ``VLLM`` for ``options`` (an EvalOptions)."""
    settings: VllmSettings = options.vllm
    args: dict[str, Any] = {
        "pretrained": str(model_dir),
        "dtype": options.dtype,
        "seed": DEFAULT_SEED if options.seed is None else options.seed,
        "batch_size": "auto",
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
    }
    if settings.max_model_len is not None:
        args["max_model_len"] = settings.max_model_len
    max_gen = options.gen_kwargs.get("max_gen_toks")
    if isinstance(max_gen, int) and not isinstance(max_gen, bool):
        args["max_gen_toks"] = max_gen  # the default for requests whose task sets none
    return args


def make_lm(model_dir: Path, options: Any, in_memory: Any = None) -> Any:
    """The lm-eval model that evaluates ``model_dir`` with ``options``' backend, or the model
    object ``in_memory`` holds (an in-memory sweep point: HF only)."""
    if options.backend == "vllm":
        if in_memory is not None:
            raise UserError("--in-memory evaluates with the hf backend; vLLM loads from disk")
        from lm_eval.api.registry import get_model

        return get_model("vllm")(**vllm_model_args(model_dir, options))
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=str(model_dir) if in_memory is None else in_memory.model,
        tokenizer=None if in_memory is None else in_memory.tokenizer,
        device=options.device,
        dtype=options.dtype,
        batch_size=options.batch_size,
    )


def model_config(model_dir: Path, options: Any) -> tuple[str, str]:
    """``results.json``'s ``model`` and ``model_args`` (lm-eval's names)."""
    if options.backend == "vllm":
        args = vllm_model_args(model_dir, options)
        return "vllm", ",".join(f"{k}={v}" for k, v in args.items())
    return "hf", f"pretrained={model_dir}"

"""The merge-method contract and registry: the face every method module imports.

A method never does IO, logging or uses global RNG. The engine hands it tensors already
upcast to the compute dtype and, for delta methods, the deltas ``model - origin``.

This module imports none of its siblings: the method modules import it and register
themselves; :func:`_load_all` finds them by scanning the package folder.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from mergekit_math.errors import UserError
from mergekit_math.recipe import suggest

if TYPE_CHECKING:
    import torch


class Params(BaseModel):
    """Base of every parameter model: unknown names are errors, ``lambda`` is spelled as is."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


# torch reduces tensors up to this many elements on one thread (at::internal::GRAIN_SIZE).
SINGLE_THREAD_REDUCTION = 32768


def _accumulate_in_float64(x: torch.Tensor, dim: int | None) -> bool:
    """Whether a reduction of ``x`` is long enough for torch to split it across threads."""
    import torch

    length = x.numel() if dim is None else x.shape[dim]
    return length > SINGLE_THREAD_REDUCTION and x.dtype != torch.float64


def reduce_sum(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum that does not depend on the thread count, in ``x``'s dtype.

    float32 sums of large CPU tensors change in the last bits with the number of threads.
    Reductions over up to 32768 elements run on one thread, so they are summed as torch (and
    mergekit) sums them; longer ones accumulate in float64 and are rounded once.
    """
    import torch

    kwargs = {} if dim is None else {"dim": dim}
    if not _accumulate_in_float64(x, dim):
        return x.sum(**kwargs)
    return x.sum(dtype=torch.float64, **kwargs).to(x.dtype)


def reduce_norm(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """L2 norm with the thread-count independence of :func:`reduce_sum`."""
    import torch

    kwargs = {} if dim is None else {"dim": dim}
    if not _accumulate_in_float64(x, dim):
        return torch.linalg.vector_norm(x, **kwargs)
    return torch.linalg.vector_norm(x, dtype=torch.float64, **kwargs).to(x.dtype)


def param_keys(model: type[BaseModel]) -> dict[str, str]:
    """YAML key -> field name (``lambda`` -> ``lambda_``)."""
    return {(info.alias or name): name for name, info in model.model_fields.items()}


# (input index or None for a recipe-level parameter, YAML key, message)
Problem = tuple[int | None, str, str]


@dataclass(frozen=True)
class MergeInputs:
    """What one output tensor's merge gets.

    ``tensors`` are the non-base inputs in recipe order: deltas (``model - origin``) for
    delta methods, raw tensors otherwise. ``generators`` has one seeded generator per input
    for random methods, else ``None``.
    """

    base: torch.Tensor | None
    tensors: list[torch.Tensor]
    params: list[BaseModel]
    shared: BaseModel
    generators: list[torch.Generator] | None = None
    # Chunked execution: the flat index of this chunk's first element, and what ``prepare``
    # returned for the whole tensor (None when the method sees the whole tensor at once).
    offset: int = 0
    states: list[Any] | None = None


@dataclass(frozen=True)
class PrepareInputs:
    """What a chunked method's ``prepare`` gets before the chunks of one tensor."""

    shared: BaseModel
    params: list[BaseModel]
    generators: list[torch.Generator] | None
    numel: int
    ranges: list[tuple[int, int]]  # the chunks the merge will get, as flat [start, end)
    # delta(i): input i's whole delta, flat, in the compute dtype (read only when asked for;
    # the buffer is reused: valid until the next call).
    delta: Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    pretty_name: str
    paper_url: str
    merge: Callable[[MergeInputs], torch.Tensor]
    shared_params: type[BaseModel]
    model_params: type[BaseModel]
    # delta: inputs are model - origin and the result is added to the base by the method;
    # tensors: inputs are raw tensors.
    kind: Literal["delta", "tensors"] = "tensors"
    # required: base_model must be given; ignored: a listed base is an ordinary input.
    base: Literal["required", "ignored"] = "ignored"
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    description: str = ""
    # Cross-field check of one tensor's resolved parameters (recipe-level, per input), run at
    # plan time: returns (input index or None for recipe-level, YAML key, message) or None.
    check: Callable[[BaseModel, list[BaseModel]], Problem | None] | None = None
    # Parameters accepted for mergekit compatibility that have no effect (a warning is shown).
    ignored: tuple[str, ...] = ()
    # What a recipe-level parameter left unset (None) means for this method.
    shared_defaults: dict[str, Any] = field(default_factory=dict)
    # Whether, with these resolved parameters, the merge can run on row-major chunks of a
    # tensor: every output element depends only on the inputs at the same position, given
    # the per-input states ``prepare`` computes once per tensor (chunks arrive in order).
    chunkable: Callable[[BaseModel, list[BaseModel]], bool] | None = None
    prepare: Callable[[PrepareInputs], list[Any]] | None = None
    # How many whole-tensor compute-dtype buffers ``prepare`` holds at once (memory estimate).
    prepare_buffers: Callable[[BaseModel, list[BaseModel]], int] | None = None


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


# Modules of the package that are not merge methods.
_NOT_METHODS = frozenset({"base", "listing"})


def _method_modules() -> list[str]:
    """Names of the package's method modules (every module but base, listing and _private)."""
    folder = str(Path(__file__).parent)
    return sorted(
        info.name
        for info in pkgutil.iter_modules([folder])
        if not info.name.startswith("_") and info.name not in _NOT_METHODS
    )


def _load_all() -> None:
    """Import every method module once; each registers its methods on import."""
    package = __name__.rsplit(".", 1)[0]
    for name in _method_modules():
        importlib.import_module(f"{package}.{name}")


def get_method(name: str, where: str = "merge_method") -> MergeMethod:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = sorted(_REGISTRY)
        raise UserError(
            f"{where}: unknown merge method {name!r}{suggest(name, known)}; "
            f"known methods: {', '.join(known)}"
        ) from None


def all_methods() -> list[MergeMethod]:
    _load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]

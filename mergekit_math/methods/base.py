"""The merge-method contract and registry: the face every method module imports.

A method never does IO, logging or uses global RNG. The engine hands it tensors already
upcast to the compute dtype and, for delta methods, the deltas ``model - origin``.

This module imports none of its siblings: the method modules import it and register
themselves; :func:`_load_all` finds them by scanning the package folder.
"""

from __future__ import annotations

import builtins
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from mergekit_math.errors import UserError
from mergekit_math.recipe import suggest

if TYPE_CHECKING:
    import torch

    from mergekit_math.methods.masks import MaskStream
    from mergekit_math.methods.selection import StoredMagnitude


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


S = TypeVar("S", bound=Params)  # a method's shared (recipe-level) parameter model
M = TypeVar("M", bound=Params)  # its per-model parameter model


@dataclass(frozen=True)
class MergeInputs(Generic[S, M]):
    """What one output tensor's merge gets.

    ``tensors`` are the non-base inputs in recipe order: deltas (``model - origin``) for
    delta methods, raw tensors otherwise. ``base`` is the base tensor when the method takes
    one (``base`` required, or optional and given), else None. ``generators`` has one
    counter-based generator per input for random methods (keyed by seed, input and tensor;
    see :mod:`mergekit_math.methods.masks`), else ``None``.
    """

    base: torch.Tensor | None
    tensors: list[torch.Tensor]
    params: list[M]
    shared: S
    generators: list[MaskStream] | None = None
    # Chunked execution: the flat index of this chunk's first element, and what
    # ``Chunking.prepare`` returned for the whole tensor (None when the method sees the whole
    # tensor at once).
    offset: int = 0
    states: list[Any] | None = None


@dataclass(frozen=True)
class FusedInputs(Generic[S, M]):
    """What a method's fused kernel (:attr:`MergeMethod.fused`) gets for one range: the
    inputs as stored (numpy ``uint16`` arrays of bfloat16 bits, or ``float32``), flat; the
    non-base ones all of one dtype. It fills ``out`` (``uint16`` bfloat16 bits or
    ``float32``) and adds each input's count of NaN/inf elements to ``bad`` (base first
    when given, then ``tensors``). ``tensors`` are the models themselves, not deltas.
    """

    base: Any  # numpy array or None
    tensors: list[Any]
    params: list[M]
    shared: S
    generators: list[MaskStream] | None
    offset: int
    states: list[Any] | None
    out: Any
    bad: Any


# map(fn, items) -> fn(item) for each item, in order (builtins.map, or a thread pool's)
ChunkMap = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]


def fresh_buffer(key: str, numel: int, dtype: Any) -> Any:
    """A new flat numpy array (:attr:`PrepareInputs.buffer` outside the engine)."""
    import numpy as np

    return np.empty(numel, dtype)


@dataclass(frozen=True)
class PrepareInputs(Generic[S, M]):
    """What :attr:`Chunking.prepare` gets before the chunks of one tensor."""

    shared: S
    params: list[M]
    generators: list[MaskStream] | None
    numel: int
    ranges: list[tuple[int, int]]  # the chunks the merge will get, as flat [start, end)
    # delta(i): input i's whole delta, flat, in the compute dtype (read only when asked for;
    # the buffer is reused: valid until the next call).
    delta: Callable[[int], torch.Tensor]
    # magnitude(i): the same buffer filled with |delta| in one pass, or, where the engine
    # holds the tensor's inputs as read, those (for the compiled selection; see sparsify)
    magnitude: Callable[[int], torch.Tensor | StoredMagnitude]
    # map(fn, items): how whole-tensor passes run ``fn`` over chunks, in order of ``items``
    # (the engine's worker threads, one intra-op thread each; here: serially)
    map: ChunkMap = builtins.map
    # whether whole-tensor passes may use the compiled kernels (decided once for the merge)
    compiled: bool = False
    # the tensor's inputs as the engine read them for the merge, range by range: (base or
    # None, [the other inputs]), numpy arrays as stored (bfloat16 bits or float32); given
    # to methods whose chunking is ``compiled`` (None elsewhere)
    held: list[tuple[Any, list[Any]]] | None = None
    shape: tuple[int, ...] = ()  # the tensor's
    # buffer(key, numel, dtype): a flat numpy array (contents undefined) that the engine
    # reuses under ``key`` from tensor to tensor, for whole-tensor arrays of the preparation
    # and of its states: valid until the next tensor's preparation (every chunk of this
    # tensor is merged before it). A fresh array costs a zeroed page per first touch.
    buffer: Callable[[str, int, Any], Any] = fresh_buffer


def _always(shared: Any, params: Any) -> bool:
    return True


def _no_buffers(shared: Any, params: Any) -> int:
    return 0


@dataclass(frozen=True)
class Chunking(Generic[S, M]):
    """How a method runs on row-major flat chunks of a tensor (chunks arrive in order).

    ``applies``: whether, with these resolved parameters, every output element depends only
    on the inputs at the same position, given the per-input states ``prepare`` computes
    once per tensor. ``buffers``: how many whole-tensor compute-dtype buffers ``prepare``
    holds at once (for the memory estimate). ``compiled``: the method runs on chunks only
    where its fused kernel runs; its ``prepare`` then gets the inputs as read
    (:attr:`PrepareInputs.held`, held for the merge) and computes its statistics with
    compiled passes over them; ``buffers`` then counts what its states hold per element
    besides (in compute-dtype units: DELLA's 1-byte keep masks). ``host``: ``prepare``
    needs no torch where the fused kernel runs (its statistics from the held inputs by
    compiled passes only), so a merge on numpy arrays (:mod:`mergekit_math.merge.host`)
    may run it; a method without ``prepare`` needs none.
    """

    applies: Callable[[S, list[M]], bool] = _always
    prepare: Callable[[PrepareInputs[S, M]], list[Any]] | None = None
    buffers: Callable[[S, list[M]], int] = _no_buffers
    compiled: bool = False
    # or a function saying it (asked when a plan is made, not at import)
    host: bool | Callable[[], bool] = False
    # chunks of a tensor of this shape start at multiples of unit(shape) elements (DELLA:
    # whole rows and whole mask blocks); None: anywhere
    unit: Callable[[tuple[int, ...]], int] | None = None

    def on_host(self) -> bool:
        """Whether ``prepare`` needs no torch (``host``) on this machine."""
        return self.host() if callable(self.host) else self.host


# Elementwise methods (linear, passthrough): chunks need no preparation.
ELEMENTWISE: Chunking[Any, Any] = Chunking()


@dataclass(frozen=True)
class Example:
    """Parameters a method declares for the contract test (tests/test_contract.py): the
    recipe-level values, one dict per non-base input, and whether a base model is given."""

    models: tuple[dict[str, Any], ...]
    shared: dict[str, Any] = field(default_factory=dict)
    base: bool = True


BasePolicy = Literal["required", "optional", "none"]


@dataclass(frozen=True)
class MergeMethod(Generic[S, M]):
    """One merge method: its function, its typed parameters and what it takes.

    ``base``: ``required`` (the recipe must give ``base_model``), ``optional`` (used when
    given: a base listed among the models is the base, not an input) or ``none`` (a listed
    base is an ordinary input). ``inputs``: how many non-base inputs, (min, max or None).
    """

    name: str
    pretty_name: str
    paper_url: str
    merge: Callable[[MergeInputs[S, M]], torch.Tensor]
    shared_params: type[S]
    model_params: type[M]
    # At least one; the contract test runs the method with each of them.
    examples: tuple[Example, ...]
    # delta: inputs are model - origin and the result is added to the base by the method;
    # tensors: inputs are raw tensors.
    kind: Literal["delta", "tensors"] = "tensors"
    base: BasePolicy = "none"
    inputs: tuple[int, int | None] = (1, None)
    random: bool = False
    chunking: Chunking[S, M] | None = None
    description: str = ""
    # Cross-field check of one tensor's resolved parameters (recipe-level, per input), run at
    # plan time: returns (input index or None for recipe-level, YAML key, message) or None.
    check: Callable[[S, list[M]], Problem | None] | None = None
    # Parameters accepted for mergekit compatibility that have no effect (a warning is shown).
    ignored: tuple[str, ...] = ()
    # What a recipe-level parameter left unset (None) means for this method.
    shared_defaults: dict[str, Any] = field(default_factory=dict)
    # Whether inputs equal to the base (zero deltas) give the base back exactly.
    keeps_base: bool = True
    # The same arithmetic as ``merge`` (on chunks, or whole tensors flattened) as one fused
    # CPU kernel (:mod:`mergekit_math.kernels`): fills ``out`` and returns True, or returns
    # False where it does not apply (the engine then runs ``merge``).
    fused: Callable[[FusedInputs[S, M]], bool] | None = None

    @property
    def min_models(self) -> int:
        return self.inputs[0]

    @property
    def max_models(self) -> int | None:
        return self.inputs[1]

    def chunkable(self, shared: S, params: list[M]) -> bool:
        """Whether the merge of a tensor with these parameters may run on chunks."""
        return self.chunking is not None and self.chunking.applies(shared, params)


_REGISTRY: dict[str, MergeMethod[Any, Any]] = {}


def register(method: MergeMethod[S, M]) -> MergeMethod[S, M]:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


# Shared kernels any method may import (they register nothing).
KERNEL_MODULES = ("sparsify", "selection", "consensus", "masks", "statistics", "magprune")
# Modules of the package that are not merge methods.
_NOT_METHODS = frozenset({"base", "listing", *KERNEL_MODULES})


def _method_modules() -> list[str]:
    """Names of the package's method modules (every module but the kernels, base, listing
    and _private ones)."""
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


def get_method(name: str, where: str = "merge_method") -> MergeMethod[Any, Any]:
    if name not in _REGISTRY and name in _method_modules():
        # the module named after the method is usually the one that registers it: importing
        # it alone spares a merge's start-up the other modules
        importlib.import_module(f"{__name__.rsplit('.', 1)[0]}.{name}")
    if name not in _REGISTRY:
        _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = sorted(_REGISTRY)
        raise UserError(
            f"{where}: unknown merge method {name!r}{suggest(name, known)}; "
            f"known methods: {', '.join(known)}"
        ) from None


def all_methods() -> list[MergeMethod[Any, Any]]:
    _load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]

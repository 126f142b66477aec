"""The plain data of a merge plan: its inputs, slice groups, output tensors and the plan."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from pydantic import BaseModel

from mergekit_math.io.reader import Checkpoint, TensorInfo
from mergekit_math.merge.vocab import Vocabulary
from mergekit_math.methods import MergeMethod
from mergekit_math.patch.source import PatchDeltas
from mergekit_math.recipe import Parameters, Recipe


@dataclass(frozen=True)
class Source:
    """One input of the merge: a checkpoint, where it is declared, and its parameters."""

    index: int  # position among the recipe's inputs, used for seeding
    where: str  # YAML path, e.g. "models[1]" or "slices[0].sources[1]"
    ckpt: Checkpoint
    parameters: Parameters | None
    origin: Checkpoint | None = None
    layer_start: int = 0
    # A recipe entry ``patch: PATH``: the deltas come from the patch (``ckpt`` is the base).
    patch: PatchDeltas | None = None


@dataclass(frozen=True)
class SliceGroup:
    """The inputs merged together for a run of output layers (mergekit's output slice)."""

    where: str
    sources: list[Source]  # non-base inputs (all inputs for methods that ignore the base)
    base: Source | None
    parameters: Parameters | None
    num_layers: int


@dataclass
class PlanItem:
    out: TensorInfo  # output name, shape, dtype (file is unused)
    group: SliceGroup
    names: list[str]  # tensor name in each source
    base_name: str | None
    t: float
    copy_only: bool = False  # non-float buffers are copied from the first input
    aligned: bool = False  # a vocabulary tensor: inputs gathered into the output's rows
    params: list[BaseModel] = field(default_factory=list)
    shared: BaseModel | None = None

    @property
    def read_bytes(self) -> int:
        total = 0
        for s, n in zip(self.group.sources, self.names):
            total += s.ckpt.info(n).nbytes
            if s.origin is not None:
                total += s.origin.info(n).nbytes
        if self.group.base is not None and self.base_name is not None:
            total += self.group.base.ckpt.info(self.base_name).nbytes
        return total


@dataclass
class Plan:
    recipe: Recipe
    method: MergeMethod
    items: list[PlanItem]
    reference: Checkpoint  # config, tokenizer and tensor-set source
    tokenizer_source: Checkpoint
    checkpoints: dict[str, Checkpoint]  # resolved path -> checkpoint
    num_layers: int
    seed: int
    warnings: list[str] = field(default_factory=list)
    vocabulary: Vocabulary | None = None  # the output vocabulary (tokenizer settings)
    # Multi-module models: dotted config key -> (input layers, output layers, the input
    # layer ranges stacked), for the output config.
    module_layers: dict[str, tuple[int, int, list[tuple[int, int]]]] = field(default_factory=dict)

    @property
    def read_bytes(self) -> int:
        return sum(i.read_bytes for i in self.items)

    @property
    def write_bytes(self) -> int:
        return sum(i.out.nbytes for i in self.items)

    @functools.cached_property
    def output_elements(self) -> int:
        return sum(i.out.numel for i in self.items)

    @property
    def parents(self) -> list[str]:
        seen: list[str] = []
        for c in self.checkpoints.values():
            if c.ref not in seen:
                seen.append(c.ref)
        return seen

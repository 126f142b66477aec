"""In-memory merges: the engine's output tensors copied straight into a model already loaded
in RAM or on the GPU, for sweep points that need no files.

The merge loop is :func:`~.execution.stream_plan`, the one the disk writer is fed by, so the
model receives the same bytes a folder would hold (a test compares them bit for bit). The
model skeleton (``AutoModelForCausalLM.from_config``) and its tokenizer are built once per
process and re-filled by each point; a point whose config, generation config, tokenizer,
dtype or device differ from the cached skeleton's rebuilds it. The bytes each shard file
would hold are hashed on the way, so an in-memory point has the fingerprint its folder would
have (the evaluation cache and the results rows do not tell the two apart).
"""

from __future__ import annotations

import gc
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_math.errors import UserError
from mergekit_math.io.fingerprint import combine, extra_files, file_digest, new_digest
from mergekit_math.io.reader import TensorInfo
from mergekit_math.io.writer import _header, plan_shards
from mergekit_math.merge.execution import execute, stream_plan
from mergekit_math.merge.sink import Tee
from mergekit_math.merge.types import Plan

if TYPE_CHECKING:
    import torch

MAX_SHARD_SIZE = 5 * 10**9
"""The shard size the digests assume: :func:`~.execution.execute`'s default, which sweep
points are written with."""


class SkeletonMismatch(UserError):
    """The loaded model cannot hold this merge's output (a name it lacks, a shape or a tie
    that differs); the caller merges to disk instead."""


@dataclass
class InMemoryModel:
    """A merged model in memory: what ``evaluate(..., in_memory=)`` takes."""

    model: Any
    """A transformers ``PreTrainedModel``, in eval mode, on its device."""
    tokenizer: Any
    fingerprint: str
    """What :func:`~mergekit_math.io.fingerprint.model_fingerprint` gives its folder."""


class ModelSink:
    """Copies each output tensor, whole or chunk by chunk, into the model's parameter or
    buffer of the same name (through ``state_dict``, whose tensors share the parameters'
    storage). Every check is made before the merge starts: a name the model lacks, a shape
    that differs, a model tensor the merge does not write (it would keep the previous
    point's values) and two written names tied to one storage all raise
    :class:`SkeletonMismatch`."""

    def __init__(self, model: Any, tensors: list[TensorInfo]):
        state = model.state_dict()
        names = [t.name for t in tensors]
        missing = [n for n in names if n not in state]
        if missing:
            raise SkeletonMismatch(
                f"the loaded {type(model).__name__} has no tensor {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        owner: dict[int, str] = {}
        for n in names:
            key = _storage(state[n])
            if key in owner:
                raise SkeletonMismatch(
                    f"{owner[key]} and {n} are tied in the loaded model but both merged"
                )
            owner[key] = n
        stale = [n for n, t in state.items() if n not in set(names) and _storage(t) not in owner]
        if stale:
            raise SkeletonMismatch(f"the merge does not write the model's tensor {stale[0]}")
        for t in tensors:
            if tuple(state[t.name].shape) != t.shape:
                raise SkeletonMismatch(
                    f"{t.name}: merged {list(t.shape)}, the loaded model has "
                    f"{list(state[t.name].shape)}"
                )
        self.targets = {n: state[n] for n in names}
        self.offset = 0
        self.done = 0

    def write_part(self, name: str, part: torch.Tensor, last: bool) -> None:
        import torch

        flat = self.targets[name].view(-1)
        n = part.numel()
        with torch.no_grad():
            flat[self.offset : self.offset + n].copy_(part.reshape(-1))
        self.offset = 0 if last else self.offset + n
        self.done += last

    def close(self) -> None:
        if self.done != len(self.targets):
            raise RuntimeError(f"{self.done} of {len(self.targets)} tensors were merged")

    def abort(self) -> None:
        """Nothing to undo: the next point writes every tensor again."""


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class DigestSink:
    """Hashes the bytes :class:`~mergekit_math.io.writer.ShardedWriter` would write into each
    shard file (header, then the tensors in plan order), without writing them."""

    def __init__(self, tensors: list[TensorInfo], max_shard_size: int = MAX_SHARD_SIZE):
        self.shards = plan_shards(tensors, max_shard_size)
        self.hashes = [new_digest() for _ in self.shards]
        self.shard_of: dict[str, int] = {}
        for i, shard in enumerate(self.shards):
            self.hashes[i].update(_header(shard, {"format": "pt"}))
            self.shard_of.update((t.name, i) for t in shard.tensors)

    def write_part(self, name: str, part: torch.Tensor, last: bool) -> None:
        import torch

        data = part.detach().contiguous().reshape(-1).view(torch.uint8)
        self.hashes[self.shard_of[name]].update(memoryview(data.numpy()))

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def digests(self) -> list[tuple[str, str]]:
        return sorted((s.filename, h.hexdigest()) for s, h in zip(self.shards, self.hashes))


@dataclass
class _Skeleton:
    key: tuple[Any, ...]
    model: Any
    tokenizer: Any


_cached: _Skeleton | None = None
"""This process's model skeleton, re-filled by each in-memory point."""


def merge_in_memory(
    plan: Plan,
    *,
    device: str = "cpu",
    eval_device: str = "cpu",
    dtype: str = "auto",
    threads: int | None = None,
    keep: Path | None = None,
) -> InMemoryModel:
    """Merge ``plan`` into this process's model skeleton (built or rebuilt as needed on
    ``eval_device``, in ``dtype``: ``auto`` is the output config's); with ``keep`` the
    same merge also writes the folder there with the normal writer (atomic, ``force``).
    :class:`SkeletonMismatch` when the model cannot hold the output (nothing is written)."""
    tensors = [i.out for i in plan.items]
    with tempfile.TemporaryDirectory(prefix="mmath-inmem-") as side:
        from mergekit_math.io.model_files import write_model_files

        write_model_files(plan, Path(side))
        extras = [(p.name, file_digest(p)) for p in extra_files(Path(side))]
        skeleton = _skeleton(Path(side), extras, dtype, eval_device)
    sink = Tee(ModelSink(skeleton.model, tensors), digest := DigestSink(tensors))
    if keep is None:
        stream_plan(plan, sink, device=device, progress=False, threads=threads)
    else:
        execute(plan, keep, device=device, force=True, progress=False, threads=threads, also=sink)
    return InMemoryModel(skeleton.model, skeleton.tokenizer, combine(digest.digests() + extras))


def _skeleton(side: Path, extras: list[tuple[str, str]], dtype: str, device: str) -> _Skeleton:
    """The cached skeleton when the output's config, generation config and tokenizer files,
    the dtype and the device are the same; else a new one (the old one freed first)."""
    global _cached
    key = (tuple(extras), dtype, device)
    if _cached is not None and _cached.key == key:
        return _cached
    _cached = None
    gc.collect()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(side)
    # what from_pretrained(dtype=...) loads: the config's dtype for "auto"
    want = (getattr(config, "dtype", None) or "float32") if dtype == "auto" else dtype
    want = want if isinstance(want, torch.dtype) else getattr(torch, str(want))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=want)
    model.eval()
    if (side / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(side)
    # as lm-eval's HFLM loads a folder's tokenizer
    tokenizer = AutoTokenizer.from_pretrained(side, use_fast=True, trust_remote_code=False)
    _cached = _Skeleton(key, model, tokenizer)
    return _cached

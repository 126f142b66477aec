"""A base model with a PEFT LoRA adapter merged in, read like a checkpoint: ``BASE+ADAPTER``.

mergekit writes ``org/base+org/adapter`` for "the base with this adapter merged", and merges it
by loading the whole model with transformers and PEFT into a cache folder. Here the merge is
per tensor, when the engine reads it: a tensor the adapter targets reads as
``W + scaling · B·A`` (PEFT's ``merge_and_unload``: ΔW in float32, added to W and rounded
once to W's dtype; a ``modules_to_save`` tensor replaces W), every other tensor is the base's,
read as stored. Nothing is written to disk.

The adapter is read by :func:`mergekit_math.patch.lora.open_lora` (the import behind
``mmath patch extract --from-lora``), so both accept and refuse the same adapters.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_math.errors import UserError
from mergekit_math.io.model_ref import parse_ref
from mergekit_math.io.reader import Checkpoint
from mergekit_math.io.resolve import find_local, resolve_model
from mergekit_math.patch.lora import open_lora

if TYPE_CHECKING:
    import torch


class LoraCheckpoint(Checkpoint):
    """``base`` (a model folder) with the adapter folder ``adapter`` merged in, lazily.

    Headers, tensor names, shapes and dtypes are the base's. A targeted tensor is merged in
    full the first time a range of it is read (ranges of one tensor come in order); the last
    :attr:`KEEP` merged tensors are kept, as the read-ahead thread may be on the next tensor
    while the current one is still being read.
    """

    KEEP = 2

    def __init__(self, base: Path, adapter: Path, ref: str, where: str, allow_pickle: bool = False):
        try:
            super().__init__(base, ref=ref, allow_pickle=allow_pickle)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        try:
            self.adapter = open_lora(adapter, self, where)
        except BaseException:
            super().close()
            raise
        self.adapter_path = adapter
        self._lock = threading.Lock()
        self._merged: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def resolved_ref(self) -> str:
        """BASE+ADAPTER with both folders absolute (the resolved recipe, --dry-run)."""
        return f"{self.path}+{self.adapter_path}"

    @property
    def held_bytes(self) -> int:
        """The kept merged tensors plus one merge's float32 temporaries (W, ΔW, W + ΔW)."""
        infos = [self.tensors[n] for n in self.adapter.modules]
        return self.KEEP * max(i.nbytes for i in infos) + 3 * 4 * max(i.numel for i in infos)

    def _merged_flat(self, stored: str) -> torch.Tensor:
        import torch

        with self._lock:
            if stored in self._merged:
                self._merged.move_to_end(stored)
                return self._merged[stored]
        m = self.adapter.modules[stored]
        info = self.tensors[stored]
        dtype = getattr(torch, info.dtype)
        weight = self.adapter.full(m)
        if weight is None:  # the base's own reader (read_range here would come back to this)
            weight = Checkpoint.read_range(self, stored, 0, info.numel).to(torch.float32)
            Checkpoint.release_range(self, stored, 0, info.numel)
        delta = self.adapter.delta(m)
        flat = weight.reshape(-1)
        merged = (flat if delta is None else flat + delta.reshape(-1)).to(dtype)
        with self._lock:
            self._merged[stored] = merged
            while len(self._merged) > self.KEEP:
                self._merged.popitem(last=False)
        return merged

    def read_range(
        self, name: str, start: int, end: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        stored = self.resolve_name(name)
        if stored is None or stored not in self.adapter.modules:
            return super().read_range(name, start, end, out)
        part = self._merged_flat(stored)[start:end]
        return part if out is None else out.view(part.dtype)[: end - start].copy_(part)

    def read(self, name: str) -> torch.Tensor:
        stored = self.resolve_name(name)
        if stored is None or stored not in self.adapter.modules:
            return super().read(name)
        return self._merged_flat(stored).clone().reshape(self.tensors[stored].shape)

    def release_range(self, name: str, start: int, end: int) -> None:
        stored = self.resolve_name(name)
        if stored is None or stored not in self.adapter.modules:
            super().release_range(name, start, end)

    def close(self) -> None:
        with self._lock:
            self._merged.clear()
        self.adapter.close()
        super().close()


def load_model_ref(
    ref: str,
    where: str,
    recipe_dir: Path | None,
    allow_pickle: bool,
    cache: dict[str, Checkpoint],
) -> Checkpoint:
    """The checkpoint a recipe's model reference names, opened once per resolved reference.

    ``PATH``, ``PATH@REVISION`` (Hub), ``BASE+ADAPTER`` (either part with its revision); a
    reference naming an existing local path as a whole is that path.
    """
    if find_local(ref, where, recipe_dir) is not None:
        model, lora = ref, None
        revision = adapter_revision = None
    else:
        try:
            parsed = parse_ref(ref, where)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        model, revision = parsed.model.path, parsed.model.revision
        lora = parsed.lora.path if parsed.lora else None
        adapter_revision = parsed.lora.revision if parsed.lora else None
    path = resolve_model(model, where, recipe_dir, revision)
    if lora is None:
        key = str(path)
        if key not in cache:
            try:
                cache[key] = Checkpoint(path, ref=ref, allow_pickle=allow_pickle)
            except UserError as exc:
                raise UserError(f"{where}: {exc}") from None
        return cache[key]
    adapter = resolve_model(lora, where, recipe_dir, adapter_revision, what="LoRA adapter folder")
    key = f"{path}+{adapter}"
    if key not in cache:
        cache[key] = LoraCheckpoint(path, adapter, ref, where, allow_pickle)
    return cache[key]

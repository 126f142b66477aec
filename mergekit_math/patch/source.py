"""A patch as an input of the merge engine: a recipe entry ``patch: PATH``.

The engine reads a patch like a checkpoint, by tensor name and flat element range, but what it
gets is the decoded delta (float32), so the delta methods use it as is: porting several
patches onto a new base with TIES or DARE is one recipe (PortLLM).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_math.errors import UserError
from mergekit_math.io.reader import Checkpoint, TensorInfo
from mergekit_math.io.resolve import find_local
from mergekit_math.patch.format import Patch

if TYPE_CHECKING:
    import torch


class PatchDeltas:
    """A patch seen through ``base``'s tensor names; tensors the patch leaves out read as zero.

    Decoding happens once per tensor (a low-rank tensor is a matrix product); the last two
    decoded tensors are kept, since the read-ahead thread may already be on the next tensor
    while the current one is still being read.
    """

    KEEP = 2

    def __init__(self, patch: Patch, base: Checkpoint, where: str):
        self.patch = patch
        self.base = base
        self.path = patch.path
        self.ref = str(patch.path)
        self.same_base = patch.check_against(base, where)
        self._lock = threading.Lock()
        self._decoded: OrderedDict[str, torch.Tensor | None] = OrderedDict()

    def info(self, name: str) -> TensorInfo:
        i = self.base.info(name)
        return TensorInfo(i.name, self.path, "float32", i.shape)

    def _flat(self, name: str) -> torch.Tensor | None:
        stored = self.base.resolve_name(name) or name
        with self._lock:
            if stored in self._decoded:
                self._decoded.move_to_end(stored)
                return self._decoded[stored]
            flat = self.patch.delta(stored).reshape(-1) if stored in self.patch.tensors else None
            self._decoded[stored] = flat
            while len(self._decoded) > self.KEEP:
                self._decoded.popitem(last=False)
            return flat

    def read_range(
        self, name: str, start: int, end: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        import torch

        flat = self._flat(name)
        part = torch.zeros(end - start) if flat is None else flat[start:end]
        return part if out is None else out.view(torch.float32)[: end - start].copy_(part)

    def release_range(self, name: str, start: int, end: int) -> None:
        pass

    def close(self) -> None:
        with self._lock:
            self._decoded.clear()
        self.patch.close()


def open_patch_source(
    ref: str, where: str, recipe_dir: Path | None, base: Checkpoint
) -> PatchDeltas:
    """Open the patch ``ref`` (relative to the working directory or the recipe's folder) and
    check it against ``base`` (architecture, every patched tensor's shape) from headers."""
    found = find_local(ref, where, recipe_dir)
    if found is None:
        raise UserError(f"{where}: patch folder does not exist: {ref}")
    try:
        patch = Patch.open(found)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return PatchDeltas(patch, base, where)

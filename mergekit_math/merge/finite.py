"""The finite check of a merge's inputs: NaN and inf values pass through every method into
the output, so each input range read is checked once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from mergekit_math.errors import UserError
from mergekit_math.merge.inputs import _input_wheres, _item_inputs
from mergekit_math.merge.types import Plan, PlanItem

if TYPE_CHECKING:
    import torch


class FiniteCheck:
    """Counts the NaN/inf values of each input of one output tensor as its ranges are read
    (they would pass through every method into the output), to warn once per tensor and
    input, or refuses them with ``strict``.

    One sum per input range is the test (NaN and inf survive a sum); only a sum that is not
    finite (or overflowed) counts the values exactly.
    """

    def __init__(
        self,
        plan: Plan,
        item: PlanItem,
        strict: bool,
        warn: Callable[[str], None] | None,
    ):
        self.inputs = [
            (f"{where} ({ckpt.ref})", name)
            for where, (_, ckpt, name) in zip(_input_wheres(plan, item), _item_inputs(plan, item))
        ]
        self.counts = [0] * len(self.inputs)
        self.strict = strict
        self.warn = warn
        self._lock = threading.Lock()

    def __call__(self, i: int, x: torch.Tensor) -> None:
        import torch

        wide = x.dtype if x.dtype == torch.float64 else torch.float32
        if bool(torch.isfinite(x.sum(dtype=wide))):
            return
        self.count(i, x.numel() - int(torch.isfinite(x).sum()))

    def count(self, i: int, bad: int) -> None:
        """Input ``i`` has ``bad`` non-finite values in a range (a fused kernel's count)."""
        if not bad:
            return
        where, name = self.inputs[i]
        if self.strict:
            raise UserError(
                f"{where}: tensor {name} has non-finite values (NaN or inf); "
                "nothing was written (--strict-finite)"
            )
        with self._lock:
            self.counts[i] += bad

    def report(self) -> None:
        for (where, name), bad in zip(self.inputs, self.counts):
            if bad and self.warn is not None:
                self.warn(f"{where}: tensor {name} has {bad} non-finite values (NaN or inf)")

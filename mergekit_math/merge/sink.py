"""Where the merge loop delivers output tensors: the plain protocol and a tee. Imports no
sibling module."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class Sink(Protocol):
    """Where :func:`stream_plan` delivers the output tensors, in plan order: the sharded
    writer, or an in-memory model (:mod:`mergekit_math.merge.in_memory`)."""

    def write_part(self, name: str, part: torch.Tensor, last: bool) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class Tee:
    """Delivers every part to several sinks, in order (a kept in-memory point: the model
    and the files)."""

    def __init__(self, *sinks: Sink):
        self.sinks = sinks

    def write_part(self, name: str, part: torch.Tensor, last: bool) -> None:
        for s in self.sinks:
            s.write_part(name, part, last)

    def close(self) -> None:
        for s in self.sinks:
            s.close()

    def abort(self) -> None:
        for s in self.sinks:
            s.abort()

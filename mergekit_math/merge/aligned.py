"""An input seen through the output vocabulary: its vocabulary tensors read as the output's
rows (its own rows gathered, missing rows from their planned sources), everything else as
stored. The engine reads it like any checkpoint, so methods never see a vocabulary."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from mergekit_math.io.reader import Checkpoint, TensorInfo
from mergekit_math.merge.vocab import Row, Vocabulary

if TYPE_CHECKING:
    import torch


def _dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


class _DefaultRows:
    """The rows that inputs lacking a token get, for one vocabulary tensor at a time (every
    input of an output tensor reads the same ones, one after the other)."""

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab
        self.lock = threading.Lock()
        self.key: tuple[str, str] | None = None
        self.rows: dict[int, torch.Tensor] = {}

    def get(self, name: str, dtype: str) -> dict[int, torch.Tensor]:
        with self.lock:
            if self.key != (name, dtype):
                self.rows = {}  # the previous tensor's rows first
                self.rows = self._compute(name, dtype)
                self.key = (name, dtype)
            return self.rows

    def _compute(self, name: str, dtype: str) -> dict[int, torch.Tensor]:
        import torch

        dt = _dtype(dtype)
        out: dict[int, torch.Tensor] = {}
        width = _width(self.vocab.rows[name].models[0], name)
        for token_id, rows in self.vocab.rows[name].defaults.items():
            if not rows:
                out[token_id] = torch.zeros(width, dtype=dt)
            elif len(rows) == 1:
                out[token_id] = _read_row(rows[0], name, dt)
            else:  # the mean, summed in the inputs' order as mergekit does
                acc = torch.zeros(width, dtype=dt)
                for row in rows:
                    acc = acc + _read_row(row, name, dt)
                out[token_id] = acc / len(rows)
        return out


def _width(ckpt: Checkpoint, name: str) -> int:
    shape = ckpt.info(name).shape
    n = 1
    for s in shape[1:]:
        n *= s
    return n


def _read_row(row: Row, name: str, dtype: torch.dtype) -> torch.Tensor:
    ckpt, index = row
    width = _width(ckpt, name)
    view = ckpt.read_range(name, index * width, (index + 1) * width)
    out = view.to(dtype).clone()
    ckpt.release_range(name, index * width, (index + 1) * width)
    return out


class AlignedCheckpoint:
    """``ckpt`` with its vocabulary tensors aligned to ``vocab``; other attributes are the
    checkpoint's own."""

    def __init__(self, ckpt: Checkpoint, vocab: Vocabulary, defaults: _DefaultRows):
        self.raw = ckpt
        self.vocab = vocab
        self.defaults = defaults
        self.tensors: dict[str, TensorInfo] = dict(ckpt.tensors)
        self.aligned: dict[str, TensorInfo] = {}  # requested name -> aligned info
        for name in sorted(vocab.names):
            stored = ckpt.resolve_name(name)
            if stored is None:
                continue
            info = ckpt.tensors[stored]
            dtype = vocab.load_dtype or _promoted(vocab, name, info.dtype)
            new = TensorInfo(info.name, info.file, dtype, (vocab.padded, *info.shape[1:]))
            self.tensors[stored] = self.aligned[name] = new

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.raw, attr)

    def resolve_name(self, name: str) -> str | None:
        return self.raw.resolve_name(name)

    def info(self, name: str) -> TensorInfo:
        if name in self.aligned:
            return self.aligned[name]
        stored = self.raw.resolve_name(name)
        if stored is None:
            raise KeyError(name)
        return self.tensors[stored]

    def info_or_error(self, name: str) -> TensorInfo:
        if self.raw.resolve_name(name) is None:
            raise KeyError(f"{self.raw.ref}: no tensor {name}")
        return self.info(name)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.aligned:
            return self.raw.read(name)
        return self._gather(name).reshape(self.aligned[name].shape)

    def read_range(
        self, name: str, start: int, end: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if name not in self.aligned:
            return self.raw.read_range(name, start, end, out)
        flat = self._gather(name).reshape(-1)[start:end]
        return flat if out is None else out.view(flat.dtype)[: end - start].copy_(flat)

    def release_range(self, name: str, start: int, end: int) -> None:
        if name not in self.aligned:
            self.raw.release_range(name, start, end)

    def _gather(self, name: str) -> torch.Tensor:
        """The output's rows of this input's tensor ``name``, in the aligned dtype."""
        import torch

        vocab, plan = self.vocab, self.vocab.rows[name]
        info = self.raw.info(name)
        dtype = _dtype(self.aligned[name].dtype)
        rows = info.shape[0]
        width = info.numel // rows if rows else 0
        src = self.raw.read_range(name, 0, info.numel).view(rows, width)
        perm = vocab.perms[self.raw]
        own = (perm >= 0) & (perm < rows)
        if plan.forced:
            own[sorted(plan.forced)] = False
        # gathered straight into the output rows (no full-size temporary): every row from
        # its own row, then the rows this input lacks cleared
        out = torch.empty(vocab.padded, width, dtype=dtype)
        index = torch.where(own, perm, 0)
        if src.dtype == dtype:
            torch.index_select(src, 0, index, out=out[: vocab.size])
        else:
            for a in range(0, vocab.size, 4096):  # cast a block of rows at a time
                b = min(a + 4096, vocab.size)
                out[a:b] = src.index_select(0, index[a:b]).to(dtype)
        out[: vocab.size][~own] = 0
        self.raw.release_range(name, 0, info.numel)
        own_list = own.tolist()
        for token_id, row in self.defaults.get(name, self.aligned[name].dtype).items():
            if not own_list[token_id]:
                out[token_id] = row
        if vocab.padded > vocab.size:
            # padding rows: the mean of the real rows (as mergekit, after Hewitt's note on
            # initialising new embeddings)
            out[vocab.size :] = torch.mean(out[: vocab.size], dim=0)
        return out


def _promoted(vocab: Vocabulary, name: str, own: str) -> str:
    """The dtype rows are gathered in without a recipe dtype: the inputs' promoted dtype."""
    import torch

    dt = _dtype(own)
    for m in vocab.rows[name].models:
        dt = torch.promote_types(dt, _dtype(m.info(name).dtype))
    return str(dt).removeprefix("torch.")


def align_inputs(vocab: Vocabulary) -> dict[Checkpoint, AlignedCheckpoint]:
    """One aligned view per input, sharing the missing rows' cache."""
    defaults = _DefaultRows(vocab)
    return {c: AlignedCheckpoint(c, vocab, defaults) for c in vocab.perms}

"""Lazy checkpoint reader: the plan comes from safetensors headers, tensors are read one at a time.

Headers are parsed without torch (``mmath inspect`` and ``--dry-run`` stay light); tensor data
is read with plain file reads at the header's offsets, one tensor at a time, when the engine asks.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_math.errors import UserError

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
CODE_BY_DTYPE = {name: code for code, (name, _) in DTYPES.items()}
ITEMSIZE = {name: size for name, size in DTYPES.values()}  # torch dtype name -> bytes
FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16"}

# Output-embedding names that transformers ties to an input embedding when absent from the files.
TIED_WEIGHTS: dict[str, tuple[str, ...]] = {
    "lm_head.weight": (
        "model.embed_tokens.weight",
        "transformer.wte.weight",
        "model.decoder.embed_tokens.weight",
        "transformer.word_embeddings.weight",
        "model.embed_in.weight",
    ),
}

# Decoder-layer tensor names: prefix, layer index, rest. Covers model.layers.{i}. (Llama, Qwen2,
# Mistral, Gemma, Phi-3), transformer.h.{i}. (GPT-2, Falcon), gpt_neox.layers.{i}., …
LAYER_NAME = re.compile(
    r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$"
)
# Config keys holding the decoder-layer count, in lookup order.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Non-layer tensors that come before the layers (the rest come after).
PRE_LAYER_MARKERS = ("embed", "wte", "wpe", "word_embeddings")

WEIGHT_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int = -1  # absolute byte offset of the data in ``file`` (-1: not a safetensors file)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


def layer_of(name: str) -> tuple[str, int, str] | None:
    """(prefix, index, rest) for a decoder-layer tensor name, else None."""
    m = LAYER_NAME.match(name)
    if not m:
        return None
    return m["prefix"], int(m["index"]), m["rest"]


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The parsed JSON header of a safetensors file and the byte offset where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise UserError(f"{path}: not a safetensors file (header size {size})")
        try:
            header = json.loads(f.read(size))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: corrupt safetensors header ({exc})") from None
    return header, 8 + size


class Checkpoint:
    """One model folder, read lazily.

    ``tensors`` maps every tensor name in the files to its :class:`TensorInfo`; nothing but
    headers is read until :meth:`read` is called.
    """

    def __init__(self, path: str | Path, ref: str | None = None, allow_pickle: bool = False):
        self.path = Path(path)
        self.ref = ref or str(path)
        self.allow_pickle = allow_pickle
        self._handles: dict[Path, int] = {}
        self._lock = threading.RLock()
        self._maps: dict[Path, mmap.mmap] = {}
        self._pickled: dict[str, Any] | None = None
        if not self.path.is_dir():
            raise UserError(f"{self.ref}: model folder does not exist")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise UserError(f"{self.ref}: no config.json in {self.path}")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.path / 'config.json'}: invalid JSON ({exc})") from None
        self.files: list[Path] = []
        self.tensors: dict[str, TensorInfo] = {}
        self._scan()

    # ------------------------------------------------------------------ discovery

    def _scan(self) -> None:
        index = self.path / WEIGHT_INDEX
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted({self.path / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise UserError(
                        f"{self.ref}: shard {f.name} listed in {WEIGHT_INDEX} is missing"
                    )
        elif (self.path / SINGLE_FILE).is_file():
            files = [self.path / SINGLE_FILE]
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if files:
            self.files = files
            for f in files:
                header, data_start = read_safetensors_header(f)
                for name, entry in header.items():
                    if name == "__metadata__":
                        continue
                    code = entry["dtype"]
                    if code not in DTYPES:
                        raise UserError(f"{f}: tensor {name} has unsupported dtype {code}")
                    info = TensorInfo(
                        name,
                        f,
                        DTYPES[code][0],
                        tuple(entry["shape"]),
                        data_start + int(entry["data_offsets"][0]),
                    )
                    end = data_start + int(entry["data_offsets"][1])
                    if end - info.offset != info.nbytes:
                        raise UserError(f"{f}: tensor {name} has inconsistent data offsets")
                    self.tensors[name] = info
            return
        pickles = sorted(self.path.glob("pytorch_model*.bin"))
        if pickles:
            if not self.allow_pickle:
                raise UserError(
                    f"{self.ref}: only pickle weights (pytorch_model*.bin); they can run code when "
                    "loaded. Convert to safetensors, or pass --allow-pickle to load them with "
                    "torch.load(weights_only=True, mmap=True)"
                )
            self._load_pickles(pickles)
            return
        raise UserError(f"{self.ref}: no weights (*.safetensors) in {self.path}")

    def _load_pickles(self, files: list[Path]) -> None:
        import torch

        self._pickled = {}
        for f in files:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            for name, tensor in state.items():
                self._pickled[name] = tensor
                dtype = str(tensor.dtype).removeprefix("torch.")
                self.tensors[name] = TensorInfo(name, f, dtype, tuple(tensor.shape))
        self.files = files

    # ------------------------------------------------------------------ properties

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return str(archs[0])

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "?"))

    @property
    def vocab_size(self) -> int | None:
        v = self.config.get("vocab_size")
        if v is None and isinstance(self.config.get("text_config"), dict):
            v = self.config["text_config"].get("vocab_size")
        return v

    @property
    def num_layers(self) -> int:
        for key in LAYER_COUNT_KEYS:
            if isinstance(self.config.get(key), int):
                return int(self.config[key])
        indices = [li[1] for n in self.tensors if (li := layer_of(n))]
        return max(indices) + 1 if indices else 0

    @property
    def layer_count_key(self) -> str | None:
        for key in LAYER_COUNT_KEYS:
            if isinstance(self.config.get(key), int):
                return key
        return None

    @property
    def tied_embeddings(self) -> bool:
        return any(
            name not in self.tensors and any(src in self.tensors for src in sources)
            for name, sources in TIED_WEIGHTS.items()
        )

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def resolve_name(self, name: str) -> str | None:
        """The stored tensor that provides ``name`` (tied output embeddings resolve to the
        input embedding, as transformers ties them), or None."""
        if name in self.tensors:
            return name
        for src in TIED_WEIGHTS.get(name, ()):
            if src in self.tensors:
                return src
        return None

    def info(self, name: str) -> TensorInfo:
        stored = self.resolve_name(name)
        if stored is None:
            raise KeyError(name)
        return self.tensors[stored]

    # ------------------------------------------------------------------ reading

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor (resolving tied names) into fresh memory; nothing else is loaded."""
        import torch

        info = self.info_or_error(name)
        if self._pickled is not None:
            return self._pickled[info.name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        return self.read_range(name, 0, info.numel, out=buf).reshape(info.shape)

    def info_or_error(self, name: str) -> TensorInfo:
        stored = self.resolve_name(name)
        if stored is None:
            raise KeyError(f"{self.ref}: no tensor {name}")
        return self.tensors[stored]

    def read_range(
        self, name: str, start: int, end: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements ``[start, end)`` of the flattened tensor, as a 1-D tensor.

        Without ``out`` the result is a zero-copy view of the file's shared mapping: the
        page cache serves it without a copy. Call :meth:`release_range` when done so the
        pages leave this process's resident set (the page cache keeps them). With ``out``
        (uint8, ``(end - start) * itemsize`` bytes, e.g. pinned memory) the bytes are read
        into it. Thread-safe.
        """
        import torch

        info = self.info_or_error(name)
        dtype = getattr(torch, info.dtype)
        if self._pickled is not None:
            flat = self._pickled[info.name].reshape(-1)[start:end]
            return flat if out is None else out.view(dtype).copy_(flat)
        itemsize = ITEMSIZE[info.dtype]
        nbytes = (end - start) * itemsize
        offset = info.offset + start * itemsize
        if out is None:
            if nbytes == 0:
                return torch.empty(0, dtype=dtype)
            mapping = self._map(info.file)
            if offset + nbytes > len(mapping):
                raise UserError(f"{info.file}: truncated data for tensor {info.name}")
            return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset).view(
                dtype
            )
        fd = self._fd(info.file)
        view = memoryview(out.numpy())
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:nbytes]], offset + done)
            if not n:
                raise UserError(f"{info.file}: truncated data for tensor {info.name}")
            done += n
        return out[:nbytes].view(dtype)

    def release_range(self, name: str, start: int, end: int) -> None:
        """Drop the mapped pages of elements ``[start, end)`` from the resident set.

        The pages stay in the page cache, so a later read of the same bytes (a neighbouring
        chunk sharing a page) faults them back in cheaply.
        """
        if self._pickled is not None or end <= start:
            return
        info = self.info_or_error(name)
        mapping = self._maps.get(info.file)
        if mapping is None:
            return
        itemsize = ITEMSIZE[info.dtype]
        first = (info.offset + start * itemsize) // mmap.PAGESIZE * mmap.PAGESIZE
        last = min(len(mapping), info.offset + end * itemsize)
        if last > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)

    def _map(self, file: Path) -> mmap.mmap:
        mapping = self._maps.get(file)
        if mapping is None:
            with self._lock:
                mapping = self._maps.get(file)
                if mapping is None:
                    fd = self._fd(file)
                    # private: a stray in-place op on a view copies the page, never the file
                    mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                    self._maps[file] = mapping
        return mapping

    def _fd(self, file: Path) -> int:
        fd = self._handles.get(file)
        if fd is None:
            with self._lock:
                fd = self._handles.get(file)
                if fd is None:
                    fd = os.open(file, os.O_RDONLY)
                    self._handles[file] = fd
        return fd

    def close(self) -> None:
        for mapping in self._maps.values():
            try:
                mapping.close()
            except BufferError:  # a tensor still views it; it closes when that is freed
                pass
        self._maps.clear()
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
        self._pickled = None

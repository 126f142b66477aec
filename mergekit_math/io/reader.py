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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_math.errors import UserError
from mergekit_math.io.input_file import DTYPES, NUMPY_VIEWS, InputFile, read_safetensors_header
from mergekit_math.io.resolve import inside

if TYPE_CHECKING:
    import torch

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

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# Files of a model folder besides the weights that mmath reads or copies; a Checkpoint checks at
# planning time that each one present is a regular file inside its folder (a symlink that
# leaves the folder is refused: copying it would put an arbitrary file into the output).
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)

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


def tensor_order(name: str) -> tuple[int, str, int, str]:
    """Sort key for listing tensors as a model runs them: embeddings, then each decoder layer in
    numeric order (layers.2 before layers.10), then the rest."""
    parsed = layer_of(name)
    if parsed is not None:
        return 1, parsed[0], parsed[1], parsed[2]
    return (0 if any(m in name for m in PRE_LAYER_MARKERS) else 2), name, 0, ""


class Checkpoint:
    """One model folder, read lazily.

    ``tensors`` maps every tensor name in the files to its :class:`TensorInfo`; nothing but
    headers is read until :meth:`read` is called.
    """

    def __init__(self, path: str | Path, ref: str | None = None, allow_pickle: bool = False):
        self.path = Path(path)
        self.ref = ref or str(path)
        self.allow_pickle = allow_pickle
        self._inputs: dict[Path, InputFile] = {}
        self._pickled: dict[str, Any] | None = None
        self._pickle_stats: dict[Path, tuple[int, int, int]] = {}
        if not self.path.is_dir():
            raise UserError(f"{self.ref}: model folder does not exist")
        self.side_files = self._side_files()
        if "config.json" not in self.side_files:
            raise UserError(f"{self.ref}: no config.json in {self.path}")
        self.config: dict[str, Any] = _read_json_object(self.side_files["config.json"])
        self.files: list[Path] = []
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._scan()
        except BaseException:
            self.close()
            raise

    def _side_files(self) -> dict[str, Path]:
        """The config, generation config and tokenizer files present in the folder, each
        checked to be inside it (a symlink out of the folder is refused, not followed)."""
        found = {}
        for name in SIDE_FILES:
            p = self.path / name
            if os.path.lexists(p):
                found[name] = inside(self.path, name, f"{self.ref}: {name}")
                if not p.is_file():
                    raise UserError(f"{self.ref}: {name} is not a regular file")
        return found

    # ------------------------------------------------------------------ discovery

    def _weight_files(self) -> list[Path]:
        index = self.path / WEIGHT_INDEX
        if os.path.lexists(index):
            inside(self.path, WEIGHT_INDEX, f"{self.ref}: {WEIGHT_INDEX}")
            data = _read_json_object(index)
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{index}: no weight_map (a map of tensor name -> shard file)")
            files: set[Path] = set()
            for tensor, shard in weight_map.items():
                f = inside(self.path, shard, f"{index}: weight_map[{tensor!r}]")
                if not f.is_file():
                    raise UserError(
                        f"{self.ref}: shard {shard} listed in {WEIGHT_INDEX} is missing"
                    )
                files.add(f)
            return sorted(files)
        if os.path.lexists(self.path / SINGLE_FILE):
            return [inside(self.path, SINGLE_FILE, f"{self.ref}: {SINGLE_FILE}")]
        names = sorted(p.name for p in self.path.glob("*.safetensors"))
        return [inside(self.path, n, f"{self.ref}: {n}") for n in names]

    def _scan(self) -> None:
        files = self._weight_files()
        if files:
            self.files = files
            for f in files:
                self._inputs[f] = handle = InputFile(f)
                header, data_start = read_safetensors_header(handle)
                for name, entry in header.items():
                    if name == "__metadata__":
                        continue
                    if name in self.tensors:
                        raise UserError(
                            f"{self.ref}: tensor {name} is stored twice "
                            f"({self.tensors[name].file.name} and {f.name})"
                        )
                    self.tensors[name] = TensorInfo(
                        name,
                        f,
                        DTYPES[entry["dtype"]][0],
                        tuple(entry["shape"]),
                        data_start + entry["data_offsets"][0],
                    )
            return
        pickles = sorted(self.path.glob("pytorch_model*.bin"))
        if pickles:
            if not self.allow_pickle:
                raise UserError(
                    f"{self.ref}: only pickle weights (pytorch_model*.bin); they can run code when "
                    "loaded. Convert to safetensors, or pass --allow-pickle to load them with "
                    "torch.load(weights_only=True, mmap=True)"
                )
            self._load_pickles(
                [inside(self.path, p.name, f"{self.ref}: {p.name}") for p in pickles]
            )
            return
        raise UserError(f"{self.ref}: no weights (*.safetensors) in {self.path}")

    def _load_pickles(self, files: list[Path]) -> None:
        self._pickled = {}
        for f in files:
            st = f.stat()
            state = _load_pickle(f)
            self._pickle_stats[f] = (st.st_size, st.st_mtime_ns, st.st_ino)
            for name, tensor in state.items():
                self._pickled[name] = tensor
                dtype = str(tensor.dtype).removeprefix("torch.")
                self.tensors[name] = TensorInfo(name, f, dtype, tuple(tensor.shape))
        self.files = files

    def _check_pickle(self, file: Path) -> None:
        """Pickled weights are mapped by torch: refuse to touch them if the file changed."""
        try:
            st = file.stat()
        except OSError:
            st = None
        if st is None or (st.st_size, st.st_mtime_ns, st.st_ino) != self._pickle_stats[file]:
            raise UserError(f"{file} changed during the merge; nothing was written")

    # ------------------------------------------------------------------ properties

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return str(archs[0])

    @property
    def held_bytes(self) -> int:
        """Memory this reader holds besides the ranges it returns (0: reads are views or
        copies into the caller's buffers)."""
        return 0

    @property
    def resolved_ref(self) -> str:
        """The reference as written into a resolved recipe: the absolute folder."""
        return str(self.path)

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
            self._check_pickle(info.file)
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
        into it. Either way the file is first checked to be the one planned on (same size,
        mtime and inode): a file truncated or replaced since stops the merge with one error.
        Thread-safe.
        """
        import torch

        info = self.info_or_error(name)
        dtype = getattr(torch, info.dtype)
        if self._pickled is not None:
            self._check_pickle(info.file)
            flat = self._pickled[info.name].reshape(-1)[start:end]
            return flat if out is None else out.view(dtype).copy_(flat)
        itemsize = ITEMSIZE[info.dtype]
        nbytes = (end - start) * itemsize
        offset = info.offset + start * itemsize
        handle = self._inputs[info.file]
        if out is None:
            if nbytes == 0:
                return torch.empty(0, dtype=dtype)
            # The header was checked against the file's size at planning time and check()
            # (inside mapping()) finds it unchanged, so the view lies inside the file.
            mapping = handle.mapping()
            return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset).view(
                dtype
            )
        handle.read_into(memoryview(out.numpy())[:nbytes], offset)
        return out[:nbytes].view(dtype)

    def read_host(self, name: str, start: int, end: int, out: Any) -> Any:
        """Elements ``[start, end)`` of the flattened tensor read (``pread``) into the numpy
        uint8 array ``out`` (at least ``(end - start) * itemsize`` bytes), returned as a flat
        numpy view in the dtype's ``NUMPY_VIEWS`` type (bfloat16 as uint16 bits). Checks the
        file as :meth:`read_range` does; not for pickled checkpoints. Thread-safe."""
        info = self.info_or_error(name)
        if self._pickled is not None:
            raise RuntimeError(f"{self.ref}: read_host() on a pickled checkpoint")
        itemsize = ITEMSIZE[info.dtype]
        nbytes = (end - start) * itemsize
        self._inputs[info.file].read_into(memoryview(out)[:nbytes], info.offset + start * itemsize)
        return out[:nbytes].view(NUMPY_VIEWS[info.dtype])

    def map_host(self, name: str, start: int, end: int) -> Any:
        """:meth:`read_host` without the copy: a view of a private mapping of the file's
        pages (:meth:`InputFile.map_view`), under the SIGBUS guard only. None where the
        range's bytes do not start on a multiple of the element size (a view there would be
        unaligned): read those."""
        info = self.info_or_error(name)
        if self._pickled is not None:
            raise RuntimeError(f"{self.ref}: map_host() on a pickled checkpoint")
        itemsize = ITEMSIZE[info.dtype]
        offset = info.offset + start * itemsize
        if end <= start or offset % itemsize:
            return None
        view = self._inputs[info.file].map_view(offset, (end - start) * itemsize)
        return view.view(NUMPY_VIEWS[info.dtype])

    def verify(self) -> None:
        """Check every file read so far (:meth:`InputFile.check`): still the planned one, with
        the planned size and mtime."""
        for handle in self._inputs.values():
            handle.check()

    @property
    def pickled(self) -> bool:
        """Whether the weights come from pickled ``.bin`` files (read whole through torch)."""
        return self._pickled is not None

    def release_range(self, name: str, start: int, end: int) -> None:
        """Drop the mapped pages of elements ``[start, end)`` from the resident set.

        The pages stay in the page cache, so a later read of the same bytes (a neighbouring
        chunk sharing a page) faults them back in cheaply.
        """
        if self._pickled is not None or end <= start:
            return
        info = self.info_or_error(name)
        handle = self._inputs.get(info.file)
        mapping = handle.mapped if handle is not None else None
        if mapping is None:
            return
        itemsize = ITEMSIZE[info.dtype]
        first = (info.offset + start * itemsize) // mmap.PAGESIZE * mmap.PAGESIZE
        last = min(len(mapping), info.offset + end * itemsize)
        if last > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        """Close the kept descriptors and mappings. A later read opens the files again, and
        only if they are still the files that were planned on."""
        for handle in self._inputs.values():
            handle.close()
        self._pickled = None


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; one error line otherwise."""
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, OSError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a JSON {type(data).__name__}, expected an object")
    return data


def _load_pickle(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of one pickle file, its refusals as one error line."""
    import pickle

    import torch

    def load(mmap: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            state = load(True)
        except RuntimeError as exc:
            if "mmap can only be used with files saved with" not in str(exc):
                raise
            state = load(False)  # the legacy (pre-zip) format cannot be mapped
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, … for junk
        reason = _torch_load_reason(exc)
        if isinstance(exc, pickle.UnpicklingError) and "global" in reason.lower():
            raise UserError(
                f"{path}: refused by torch.load(weights_only=True): {reason} (the file asks to "
                "run code when loaded; nothing of it ran)"
            ) from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"{path}: not a PyTorch state dict (a map of tensor name -> tensor)")
    if not state:
        raise UserError(f"{path}: no tensors in this checkpoint")
    return state


def _torch_load_reason(exc: BaseException) -> str:
    """The informative lines of a torch.load error, without its boilerplate."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    keep = [line for line in lines if not line.startswith(boilerplate)]
    return "; ".join(keep) or type(exc).__name__

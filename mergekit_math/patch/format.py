"""The patch format: a folder with ``patch.safetensors`` (encoded deltas) and ``patch.json``.

``patch.json`` is the manifest: format version, the architecture and fingerprint of the base
the patch was extracted against, the command that made it, and one :class:`PatchEntry` per
patched tensor (shape, encoding, storage dtype). ``patch.safetensors`` holds each entry's
parts under ``NAME`` (dense), ``NAME::B`` and ``NAME::A`` (low rank, Δ ≈ B·A) or
``NAME::values`` plus ``NAME::indices`` or ``NAME::bitmask`` (sparse).

:class:`Patch` reads a patch lazily, like :class:`~mergekit_math.io.reader.Checkpoint`:
opening it reads the manifest and the safetensors header; :meth:`Patch.delta` decodes one
tensor when asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, field_validator

from mergekit_math.errors import UserError
from mergekit_math.io.input_file import InputFile, read_tensor
from mergekit_math.io.reader import (
    CODE_BY_DTYPE,
    DTYPES,
    FLOAT_DTYPES,
    Checkpoint,
    TensorInfo,
    read_safetensors_header,
)
from mergekit_math.io.resolve import inside
from mergekit_math.patch.entry import (
    PART_SEP,
    Encoding,
    PatchEntry,
    _Strict,
)

if TYPE_CHECKING:
    import torch

FORMAT = "mmath-patch"
FORMAT_VERSION = 1
MANIFEST = "patch.json"
WEIGHTS = "patch.safetensors"
# Elements sampled per tensor for a base's fingerprint.
FINGERPRINT_SAMPLES = 4


class PatchSource(_Strict):
    """Where the patch came from."""

    kind: Literal["finetuned", "lora"]
    base: str = Field(description="The base the delta was taken against (or shape-checked on).")
    finetuned: str | None = None
    lora: str | None = None
    fingerprint: str = Field(description="fingerprint() of the base.")
    base_parameters: int = Field(ge=0)
    base_tensors: int = Field(ge=0)


class PatchManifest(_Strict):
    """The schema of ``patch.json``."""

    format: Literal["mmath-patch"] = FORMAT
    format_version: int = FORMAT_VERSION
    created_by: str
    command: str = Field(description="The command line that made the patch.")
    architecture: str
    model_type: str
    encoding: Encoding = Field(description="The requested encoding.")
    options: dict[str, Any] = Field(default_factory=dict)
    source: PatchSource
    unchanged: int = Field(0, ge=0, description="Selected tensors left out: their delta was 0.")
    tensors: dict[str, PatchEntry]

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > FORMAT_VERSION:
            raise ValueError(
                f"format version {v} is newer than this mmath understands ({FORMAT_VERSION}); "
                "upgrade mergekit-math"
            )
        if v < 1:
            raise ValueError(f"invalid format version {v}")
        return v


# =============================================================================== fingerprint


def _sample_positions(numel: int) -> list[int]:
    if numel == 0:
        return []
    k = min(FINGERPRINT_SAMPLES, numel)
    return sorted({(numel - 1) * i // max(k - 1, 1) for i in range(k)})


def fingerprint(ckpt: Checkpoint) -> str:
    """A hash of a checkpoint's tensor names, shapes, dtypes and a few sampled values.

    Only :data:`FINGERPRINT_SAMPLES` elements of each tensor are read (by seeking to them), so
    fingerprinting a large model costs a few thousand small reads, not a pass over its weights.
    Two checkpoints with the same fingerprint are, for all practical purposes, the same base.
    """
    h = hashlib.sha256()
    for name in sorted(ckpt.tensors):
        info = ckpt.tensors[name]
        h.update(f"{name}\x00{info.dtype}\x00{list(info.shape)}\x00".encode())
        h.update(_sampled_bytes(ckpt, info))
    return "sha256:" + h.hexdigest()


def _sampled_bytes(ckpt: Checkpoint, info: TensorInfo) -> bytes:
    """The stored bytes of a few elements, read through the checkpoint's kept handles."""
    import torch

    size = DTYPES[CODE_BY_DTYPE[info.dtype]][1]
    out = bytearray()
    for p in _sample_positions(info.numel):
        buf = torch.empty(size, dtype=torch.uint8)
        out += ckpt.read_range(info.name, p, p + 1, out=buf).view(torch.uint8).numpy().tobytes()
    return bytes(out)


# =============================================================================== writing


class PatchFileWriter:
    """Write ``patch.safetensors`` when part sizes are only known once each tensor is encoded.

    Parts are appended to a spill file as they are produced (memory holds one tensor's parts);
    :meth:`finish` writes the header and streams the spill file after it.
    """

    def __init__(self, path: Path):
        self.path = path
        self._spill_path = path.with_name(path.name + ".spill")
        self._spill = open(self._spill_path, "w+b")
        self._header: dict[str, Any] = {}
        self._offset = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        import torch

        if key in self._header:
            raise RuntimeError(f"patch part {key} written twice")
        dtype = str(tensor.dtype).removeprefix("torch.")
        data = tensor.detach().cpu().contiguous().reshape(-1)
        nbytes = data.numel() * data.element_size()
        if nbytes:
            self._spill.write(memoryview(data.view(torch.uint8).numpy()))
        self._header[key] = {
            "dtype": CODE_BY_DTYPE[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + nbytes],
        }
        self._offset += nbytes

    def finish(self, metadata: dict[str, str]) -> None:
        header = {"__metadata__": metadata, **self._header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._spill.flush()
        self._spill.seek(0)
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(self._spill, f, 16 * 2**20)
            f.flush()
            os.fsync(f.fileno())
        self.abort()

    def abort(self) -> None:
        if not self._spill.closed:
            self._spill.close()
        self._spill_path.unlink(missing_ok=True)


# =============================================================================== reading


def _check_parts(wpath: Path, manifest: PatchManifest, header: dict[str, Any]) -> None:
    """Every part ``patch.json`` names is stored with the dtype and shape it expects (the
    header itself, offsets and file size included, was validated by the reader)."""
    for name, entry in manifest.tensors.items():
        for key, (dtype, shape) in entry.parts(name).items():
            h = header.get(key)
            if h is None:
                raise UserError(f"{wpath}: corrupt patch: no stored part {key} for {name}")
            code = CODE_BY_DTYPE[dtype]
            if h["dtype"] != code or tuple(h["shape"]) != tuple(shape):
                raise UserError(
                    f"{wpath}: corrupt patch: part {key} is {h['dtype']}{h['shape']}, "
                    f"patch.json expects {code}{list(shape)}"
                )


class Patch:
    """A patch folder, read lazily: a source whose tensors are deltas.

    ``tensors`` maps each patched tensor name to its :class:`PatchEntry`; :meth:`delta` decodes
    one of them. :meth:`check_against` validates a checkpoint the patch is to be applied to
    without reading any weight.
    """

    def __init__(
        self,
        path: Path,
        manifest: PatchManifest,
        header: dict[str, Any],
        start: int,
        weights: InputFile,
    ):
        self.path = path
        self.manifest = manifest
        self._header = header
        self._data_start = start
        self._weights = weights  # opened once, when the patch is opened; reads check it

    @classmethod
    def open(cls, path: str | Path) -> Patch:
        """Read and validate ``patch.json`` and the header of ``patch.safetensors``."""
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{path}: patch folder does not exist")
        mpath = path / MANIFEST
        if not os.path.lexists(mpath):
            raise UserError(f"{path}: not a patch (no {MANIFEST})")
        inside(path, MANIFEST, f"{path}: {MANIFEST}")
        if not mpath.is_file():
            raise UserError(f"{mpath}: not a regular file")
        try:
            data = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{mpath}: corrupt patch manifest, not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f'{mpath}: not an mmath patch manifest (no "format": "{FORMAT}")')
        try:
            manifest = PatchManifest.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(top)"
            raise UserError(f"{mpath}: corrupt patch manifest: {where}: {err['msg']}") from None
        wpath = path / WEIGHTS
        if not os.path.lexists(wpath):
            raise UserError(f"{path}: incomplete patch (no {WEIGHTS})")
        weights = InputFile(inside(path, WEIGHTS, f"{path}: {WEIGHTS}"))
        try:
            header, start = read_safetensors_header(weights, allow_empty=True)
            _check_parts(wpath, manifest, header)
        except BaseException:
            weights.close()
            raise
        return cls(path, manifest, header, start, weights)

    # ------------------------------------------------------------------ properties

    @property
    def tensors(self) -> dict[str, PatchEntry]:
        return self.manifest.tensors

    @property
    def architecture(self) -> str:
        return self.manifest.architecture

    @property
    def model_type(self) -> str:
        return self.manifest.model_type

    @property
    def fingerprint(self) -> str:
        return self.manifest.source.fingerprint

    @property
    def num_parameters(self) -> int:
        """Parameters covered: elements of the tensors the patch changes."""
        return sum(e.numel for e in self.tensors.values())

    @property
    def stored_bytes(self) -> int:
        """Size on disk: ``patch.safetensors`` plus ``patch.json``."""
        return (self.path / WEIGHTS).stat().st_size + (self.path / MANIFEST).stat().st_size

    @property
    def dense_bytes(self) -> int:
        """Size of the same deltas stored dense in float32 (the reference for compression)."""
        return 4 * self.num_parameters

    @property
    def recorded_error(self) -> float | None:
        """Overall relative Frobenius error measured at extraction, sqrt(Σ err²)/sqrt(Σ ‖Δ‖²);
        None when some tensor's error was not measured."""
        entries = list(self.tensors.values())
        if any(e.error_norm is None for e in entries):
            return None
        num = sum(e.error_norm**2 for e in entries)  # type: ignore[operator]
        den = sum(e.delta_norm**2 for e in entries)
        return (num / den) ** 0.5 if den else 0.0

    # ------------------------------------------------------------------ checks

    def check_against(self, ckpt: Checkpoint, where: str = "--base") -> bool:
        """Check that the patch fits ``ckpt``: architecture, and each patched tensor's presence,
        dtype kind and shape. Reads headers only. Returns whether ``ckpt`` is the base the patch
        was extracted against (same fingerprint)."""
        if ckpt.architecture != self.architecture or ckpt.model_type != self.model_type:
            raise UserError(
                f"{where}: {ckpt.ref} is {ckpt.architecture} ({ckpt.model_type}) but the patch "
                f"{self.path} was made for {self.architecture} ({self.model_type})"
            )
        for name, entry in self.tensors.items():
            info = ckpt.tensors.get(name)
            if info is None:
                tied = ckpt.resolve_name(name)
                if tied is not None:
                    raise UserError(
                        f"{where}: the patch changes {name}, which {ckpt.ref} ties to {tied}; "
                        "untie it in the base or extract the patch without it (--exclude)"
                    )
                raise UserError(f"{where}: {ckpt.ref} has no tensor {name} (the patch changes it)")
            if info.shape != entry.shape:
                raise UserError(
                    f"{where}: shape mismatch for {name}: the patch has {list(entry.shape)}, "
                    f"{ckpt.ref} has {list(info.shape)}"
                )
            if info.dtype not in FLOAT_DTYPES:
                raise UserError(
                    f"{where}: {name} is {info.dtype} in {ckpt.ref}; only floating tensors "
                    "can be patched"
                )
        return fingerprint(ckpt) == self.fingerprint

    # ------------------------------------------------------------------ reading

    def read_part(self, key: str) -> torch.Tensor:
        """One stored part, read through the handle kept since :meth:`open` (a file changed
        or truncated since then is refused)."""
        return read_tensor(self._weights, self._header[key], self._data_start)

    def delta(
        self, name: str, dtype: torch.dtype | None = None, device: str = "cpu"
    ) -> torch.Tensor:
        """The decoded dense delta of ``name`` in ``dtype`` (float32 by default)."""
        import torch

        from mergekit_math.patch.encode import decode

        entry = self.tensors[name]
        parts = {
            key[len(name) + len(PART_SEP) :] if key != name else "": self.read_part(key)
            for key in entry.parts(name)
        }
        return decode(entry, parts, dtype or torch.float32, device)

    def close(self) -> None:
        self._weights.close()

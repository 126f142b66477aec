"""Model references as mergekit writes them: ``PATH[@REVISION][+ADAPTER[@REVISION]]``.

``org/base+org/adapter`` is ``org/base`` with the PEFT LoRA adapter ``org/adapter`` merged in;
``org/name@v1.0`` pins a Hub revision (branch, tag or commit). mergekit also accepts the dict
form ``{model: {path, revision}, lora: {path, revision}}`` (each part may be a string too);
:func:`ref_to_string` turns it into the string form, so the rest of mmath sees one string.

A reference that names an existing local path as a whole is that path, even if it contains
``@`` or ``+`` (mmath has always read such folders); only other references are split.
This module imports nothing of mmath (only pydantic, for :data:`RefStr`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator


@dataclass(frozen=True)
class ModelPath:
    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path


@dataclass(frozen=True)
class ModelRef:
    model: ModelPath
    lora: ModelPath | None = None

    def __str__(self) -> str:
        return f"{self.model}+{self.lora}" if self.lora else str(self.model)


def _split_path(text: str, where: str) -> ModelPath:
    if text.count("@") > 1:
        raise ValueError(f"{where}: {text!r} has more than one '@' (write PATH@REVISION)")
    path, _, revision = text.partition("@")
    if not path or ("@" in text and not revision):
        raise ValueError(f"{where}: {text!r}: empty path or revision around '@'")
    return ModelPath(path, revision or None)


def parse_ref(ref: str, where: str) -> ModelRef:
    """Split ``ref`` into model and adapter, each with its revision (ValueError if malformed:
    more than one ``+``, more than one ``@`` in a part, an empty part)."""
    parts = ref.split("+")
    if len(parts) > 2:
        raise ValueError(f"{where}: {ref!r} has more than one '+' (write MODEL+LORA_ADAPTER)")
    if any(not p for p in parts):
        raise ValueError(f"{where}: {ref!r}: empty model or adapter around '+'")
    model = _split_path(parts[0], where)
    lora = _split_path(parts[1], where) if len(parts) == 2 else None
    return ModelRef(model, lora)


def _path_string(value: Any) -> Any:
    if isinstance(value, dict) and set(value) <= {"path", "revision"} and "path" in value:
        rev = value.get("revision")
        return f"{value['path']}@{rev}" if rev else value["path"]
    return value


def ref_to_string(value: Any) -> Any:
    """Pydantic ``BeforeValidator``: mergekit's dict form of a reference as its string form
    (anything else is left for the field's own validation)."""
    if isinstance(value, dict) and "model" in value and set(value) <= {"model", "lora"}:
        model, lora = _path_string(value["model"]), _path_string(value.get("lora"))
        if isinstance(model, str) and (lora is None or isinstance(lora, str)):
            return f"{model}+{lora}" if lora else model
    return value


# A recipe field holding a model reference: a string, or mergekit's dict form turned into one.
RefStr = Annotated[str, BeforeValidator(ref_to_string)]

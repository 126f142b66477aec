"""Turn a recipe's model reference into a local folder (Hub ids are fetched, weights only)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mergekit_math.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files fetched for a Hub model: config, tokenizer, safetensors weights — no pickles.
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]


def _roots(folder: Path) -> list[Path]:
    """Where the files of ``folder`` may really live: the folder itself and, for a Hub cache
    snapshot (``models--ORG--NAME/snapshots/REV``, whose files are symlinks to
    ``../../blobs/HASH``), that repository's ``blobs`` folder."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    parent = real.parent
    if parent.name == "snapshots" and parent.parent.name.startswith(("models--", "datasets--")):
        roots.append(parent.parent / "blobs")
    return roots


def inside(folder: Path, name: object, what: str) -> Path:
    """``folder / name``, refused unless it stays inside ``folder``.

    ``name`` comes from data (an index's ``weight_map``, a manifest, a folder listing):
    an absolute path, ``..`` or a symlink whose target leaves the folder is refused with one
    error naming ``what`` (the file and entry that named it), before anything is opened.
    Symlinks that stay inside, and a Hub cache snapshot's links to its blobs, are followed.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UserError(f"{what}: {name!r} is not a file name")
    if os.path.isabs(name):
        raise UserError(
            f"{what}: {name!r} is an absolute path; it must name a file inside {folder}"
        )
    path = Path(folder) / name
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(root) for root in _roots(folder)):
        raise UserError(
            f"{what}: {name!r} resolves outside the folder {folder} (to {real}); "
            "refusing to read it"
        )
    return path


def find_local(ref: str, where: str, base_dir: Path | None = None) -> Path | None:
    """The existing local path ``ref`` names, or None.

    A relative path is looked up from the current directory (as mergekit does) and from the
    recipe's folder ``base_dir``; when both exist and differ, the reference is ambiguous and
    refused rather than silently mixing folders.
    """
    candidates = [Path(ref).expanduser()]
    if base_dir is not None and not Path(ref).is_absolute():
        candidates.append(base_dir / ref)
    found = [c.resolve() for c in candidates if c.exists()]
    if len(found) == 2 and found[0] != found[1]:
        raise UserError(
            f"{where}: {ref!r} is ambiguous: it exists relative to the current directory "
            f"({found[0]}) and to the recipe's folder ({found[1]}); write an absolute path"
        )
    return found[0] if found else None


def resolve_model(
    ref: str,
    where: str,
    base_dir: Path | None = None,
    revision: str | None = None,
    what: str = "model path",
) -> Path:
    """A local folder for ``ref``: an existing path, else a Hub id fetched with
    ``snapshot_download`` (at ``revision``: a branch, tag or commit; a local folder has none).

    Local paths are found as :func:`find_local` finds them.
    """
    found = find_local(ref, where, base_dir)
    if found is not None:
        if revision is not None:
            raise UserError(
                f"{where}: {ref}@{revision}: {ref} is a local folder, which has no revisions "
                "(a revision pins a Hub repository)"
            )
        return found
    if HUB_ID.match(ref) and not ref.startswith((".", "/")):
        # revision is passed only when given, so that _download keeps its two-argument form
        return _download(ref, where) if revision is None else _download(ref, where, revision)
    raise UserError(f"{where}: {what} does not exist: {ref}")


def _download(repo_id: str, where: str, revision: str | None = None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            f"{where}: {repo_id!r} is not a local folder and huggingface_hub is not installed "
            "(pip install 'mergekit-math[hub]')"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # huggingface_hub raises many types for "not reachable"
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        at = f"@{revision}" if revision else ""
        raise UserError(
            f"{where}: {repo_id + at!r} is not a local folder and could not be fetched from "
            f"the Hub{hint}: {first}"
        ) from None
    return Path(path)

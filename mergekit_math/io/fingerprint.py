"""A content hash of a model folder: what an evaluation result or a sweep row is about.

Unlike the patch format's sampled fingerprint (a quick identity check of a base), this one
reads every byte of the weights, config and tokenizer files, so two folders share it only when
they would load as the same model. Hashing runs at disk speed (about 1 GB/s); the result is
remembered per file by (size, mtime, inode) in the cache folder, so asking again is instant.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mergekit_math.errors import UserError
from mergekit_math.io.reader import TOKENIZER_FILES
from mergekit_math.io.resolve import inside

# Files that change what the model computes or how its text is tokenised.
_EXTRA_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_BLOCK = 8 << 20


def cache_dir() -> Path:
    """Where mmath keeps evaluation results and fingerprints: ``$MMATH_CACHE_DIR`` or
    ``~/.cache/mergekit_math``."""
    env = os.environ.get("MMATH_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mergekit_math"


def model_files(folder: Path) -> list[Path]:
    """The files a model folder's fingerprint covers, in a stable order."""
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not weights:
        raise UserError(f"{folder}: no weights (*.safetensors or *.bin) in this folder")
    extra = extra_files(folder)
    for p in weights + extra:  # a symlink out of the folder is refused, as the reader does
        inside(folder, p.name, f"{folder}: {p.name}")
    return weights + extra


def model_fingerprint(folder: Path | str, memo: bool = True) -> str:
    """``blake2b:<hex>`` over every fingerprinted file's name and bytes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a model folder")
    memo_path = cache_dir() / "fingerprints.json"
    known: dict[str, str] = {}
    if memo:
        try:
            known = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            known = {}
    changed = False
    digests: list[tuple[str, str]] = []
    for path in model_files(folder):
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        digest = known.get(key)
        if digest is None:
            digest = file_digest(path)
            known[key] = digest
            changed = True
        digests.append((path.name, digest))
    if memo and changed:
        _save_memo(memo_path, known)
    return combine(digests)


def combine(digests: list[tuple[str, str]]) -> str:
    """The fingerprint of a model from its files' ``(name, digest)`` pairs in
    :func:`model_files` order; an in-memory merge hashes the bytes it would have written and
    gets the same fingerprint as the folder."""
    h = hashlib.blake2b(digest_size=20)
    for name, digest in digests:
        h.update(f"{name}\x00{digest}\x00".encode())
    return "blake2b:" + h.hexdigest()


def new_digest() -> hashlib._Hash:
    """The hash of one file's bytes (:func:`file_digest` fed incrementally)."""
    return hashlib.blake2b(digest_size=20)


def extra_files(folder: Path) -> list[Path]:
    """The config, generation config and tokenizer files of a folder that a fingerprint
    covers, in order."""
    return [folder / n for n in _EXTRA_FILES if (folder / n).is_file()]


def file_digest(path: Path) -> str:
    h = new_digest()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


def _save_memo(path: Path, known: dict[str, str]) -> None:
    # Keep the memo small: entries of files that no longer exist are dropped.
    alive = {k: v for k, v in known.items() if Path(k.split("|", 1)[0]).exists()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(alive, indent=0))
        os.replace(tmp, path)
    except OSError:
        pass  # the memo is only a shortcut

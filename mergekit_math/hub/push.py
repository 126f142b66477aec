"""Upload a model folder to the Hugging Face Hub as one commit.

The folder is read, never changed: the publishing card (see :mod:`mergekit_math.hub.card`)
replaces ``README.md`` in the commit only. The token is handed to ``huggingface_hub`` and
nothing else: it is not printed, logged or written, and errors are reworded without it.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from mergekit_math.errors import UserError
from mergekit_math.io.resolve import HUB_ID

DEFAULT_COMMIT_MESSAGE = "Upload merged model with mergekit-math"

# Never uploaded: version control, caches, and the writer's staging folders / temp files.
JUNK = (".git", ".cache", "__pycache__", ".mmath-*", "*.tmp")


@dataclass(frozen=True)
class PushResult:
    url: str
    """The repository's page, e.g. ``https://huggingface.co/me/qwen-math-ties``."""
    commit_id: str
    commit_url: str
    pr_url: str | None = None
    """The pull request's page when ``create_pr`` was asked for."""


def files_to_upload(model_dir: Path) -> list[tuple[str, Path]]:
    """``(path in repo, local file)`` for every file of ``model_dir``, junk left out, sorted.

    Only what is inside the folder is uploaded. A symlink to a regular file inside the folder
    is uploaded as that file's content (the Hub has no symlinks); a symlink whose target is
    outside the folder, a symlink to a folder, a dangling symlink and anything that is not a
    regular file (FIFO, socket, device) is refused with a :class:`UserError` naming it, before
    any request is made.
    """
    if not model_dir.is_dir():
        raise UserError(f"model folder does not exist: {model_dir}")
    root_dir = model_dir.resolve()
    out: list[tuple[str, Path]] = []
    for root, dirs, names in os.walk(model_dir):
        dirs[:] = sorted(d for d in dirs if not _is_junk(d))
        for d in dirs:  # os.walk lists a symlinked folder here and never descends into it
            if (Path(root) / d).is_symlink():
                _refuse_link(Path(root) / d, root_dir)
        for name in sorted(names):
            if not _is_junk(name):
                local = Path(root) / name
                out.append((local.relative_to(model_dir).as_posix(), _regular(local, root_dir)))
    if not out:
        raise UserError(f"{model_dir}: no files to upload")
    return out


def _regular(local: Path, root_dir: Path) -> Path:
    """The file to read for ``local``: itself, or the target of a symlink that stays inside
    ``root_dir`` and names a regular file."""
    if local.is_symlink():
        target = local.resolve()
        if not target.is_relative_to(root_dir) or not target.is_file():
            _refuse_link(local, root_dir)
        return target
    if not stat.S_ISREG(local.lstat().st_mode):
        raise UserError(
            f"{local} is not a regular file (FIFO, socket or device); nothing was pushed"
        )
    return local


def _refuse_link(local: Path, root_dir: Path) -> None:
    target = local.resolve()
    if not target.is_relative_to(root_dir):
        why = f"is a symlink to {target} outside the model folder"
    elif not target.exists():
        why = f"is a symlink to {target}, which does not exist"
    else:
        why = (
            f"is a symlink to {'the folder' if target.is_dir() else 'a non-regular file'} {target}"
        )
    raise UserError(f"{local} {why}; nothing was pushed")


def _is_junk(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in JUNK)


def push_model(
    model_dir: Path,
    repo_id: str,
    *,
    token: str | None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    card_text: str | None = None,
) -> PushResult:
    """Create ``repo_id`` if needed and upload ``model_dir`` to it in one commit.

    ``token=None`` lets ``huggingface_hub`` find one (``HF_TOKEN``, then the saved login).
    ``private`` applies when the repository is created. A ``revision`` other than ``main`` is
    created as a branch from ``main`` when missing. ``create_pr`` opens a pull request instead
    of committing to the branch. ``card_text`` is uploaded as ``README.md`` in place of the
    folder's own.
    """
    if not HUB_ID.match(repo_id):
        raise UserError(
            f"repo id {repo_id!r}: expected NAMESPACE/NAME, e.g. my-name/qwen-math-ties"
        )
    files = files_to_upload(Path(model_dir))

    from huggingface_hub import CommitOperationAdd, HfApi

    from mergekit_math import __version__

    operations = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=local)
        for path, local in files
        if not (card_text is not None and path == "README.md")
    ]
    if card_text is not None:
        operations.append(CommitOperationAdd("README.md", card_text.encode("utf-8")))

    api = HfApi(token=token, library_name="mergekit-math", library_version=__version__)
    try:
        # Visibility is only sent when asked for: otherwise the namespace's default applies.
        repo_url = api.create_repo(
            repo_id, repo_type="model", exist_ok=True, **({"private": True} if private else {})
        )
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
        )
    except _hub_errors() as exc:
        raise UserError(f"push to {repo_id} failed: {_describe(exc, repo_id, token)}") from None
    return PushResult(
        url=str(repo_url),
        commit_id=info.oid,
        commit_url=info.commit_url,
        pr_url=info.pr_url,
    )


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a failed upload raises: the Hub's HTTP errors, the HTTP client's connection errors
    and the client's own checks (bad README metadata, LFS upload errors)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [
        HfHubHTTPError,
        OfflineModeIsEnabled,
        OSError,
        ValueError,
        RuntimeError,
    ]
    for module in ("httpx2", "httpx"):  # whichever the installed client uses (requests: OSError)
        try:
            errors.append(__import__(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


_HINTS = {
    401: "the Hub refused the token (or none was found): set HF_TOKEN or run `hf auth login`",
    403: "the token may not write to {namespace}: it needs write access to that namespace",
    404: "repository or branch not found (or not visible with this token)",
}


def _describe(exc: BaseException, repo_id: str, token: str | None) -> str:
    """One line saying what went wrong, without the token."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        text = "HF_HUB_OFFLINE is set; unset it to push"
    else:
        http = exc if isinstance(exc, HfHubHTTPError) else exc.__cause__
        status = getattr(getattr(http, "response", None), "status_code", None)
        if isinstance(http, HfHubHTTPError) and status is not None:
            hint = _HINTS.get(status, "").format(namespace=repo_id.split("/")[0])
            server = (getattr(http, "server_message", None) or "").strip()
            text = (
                f"HTTP {status}"
                + (f": {hint}" if hint else "")
                + (f" ({server})" if server else "")
            )
        else:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
            cause = str(exc.__cause__ or "").strip()
            if cause and cause.splitlines()[0] not in text:
                text += f" ({cause.splitlines()[0]})"
    return _redact(" ".join(text.split()), token)


def _redact(text: str, token: str | None) -> str:
    """Remove the token from ``text``: the one given, the one huggingface_hub would use, and
    anything shaped like an access token."""
    secrets = [token] if token else []
    try:
        from huggingface_hub import get_token

        found = get_token()
        if found:
            secrets.append(found)
    except Exception:  # no token to find is fine here
        pass
    for secret in secrets:
        text = text.replace(secret, "hf_***")
    return re.sub(r"\bhf_[A-Za-z0-9]{8,}\b", "hf_***", text)

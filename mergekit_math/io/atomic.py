"""Atomic outputs: a model folder appears at its path only once complete.

Every command that writes a model or a patch writes into a temporary sibling folder
(``.NAME.mmath-partial-PID``) and renames it into place at the end, holding a lock on the
output (``.NAME.mmath-lock``) for the whole run so that two runs never write one output.
An ``OSError`` on the way (disk full, permission denied, a file where a folder should be) is
reported as one :class:`UserError` naming the output path, and nothing is left behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mergekit_math.errors import UserError

PARTIAL_MARK = ".mmath-partial-"
OLD_MARK = ".mmath-old-"
LOCK_MARK = ".mmath-lock"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host; one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(out_dir: Path, locked: bool = False) -> None:
    """Remove temporaries left by killed runs for this output. ``locked``: the caller holds
    the output's lock, so no other run can be writing one and every temporary but this
    process's is stale (a pid check alone is fooled when the killed run's pid is reused,
    which the 32768 pids of a busy machine make likely); else only those whose pid is gone."""
    prefix = f".{out_dir.name}{PARTIAL_MARK}"
    if not out_dir.parent.is_dir():
        return
    for p in out_dir.parent.glob(prefix + "*"):
        try:
            pid = int(p.name[len(prefix) :])
        except ValueError:
            continue
        if (locked and pid != os.getpid()) or not pid_alive(pid):
            _remove(p)


def _remove(path: Path) -> None:
    """Remove a folder, file or symlink (never following a symlink into its target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def lock_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}{LOCK_MARK}"


@contextmanager
def output_lock(out_dir: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``out_dir`` (non-blocking): a second run writing the same
    output fails at once with a :class:`UserError` naming the first one's pid. Yields
    whether the lock is really held (False where the filesystem has no ``flock``).

    The lock is ``flock`` on the hidden sibling ``.NAME.mmath-lock`` (empty but for the
    holder's pid), removed when the run ends. A file left by a killed run holds no lock (the
    kernel drops it with the process) and is reused.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: the recheck before the final rename still holds
        yield False
        return
    path = lock_path(out_dir)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise UserError(
                f"{out_dir} is being written by another mmath run (pid {holder}); wait for it "
                "to finish or choose another output folder"
            ) from None
        except OSError:  # no flock here (some network filesystems): go on without it
            os.close(fd)
            yield False
            return
        # A run that just finished unlinks its lock file before unlocking it: if we locked
        # that unlinked file, try again on the one now at the path.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def os_error_message(exc: OSError, out_dir: Path, tmp: Path | None = None) -> str:
    """One line for an ``OSError`` met while writing ``out_dir``: what happened and to which
    path (a path inside the temporary folder is named as it will be in ``out_dir``)."""
    reason = (exc.strerror or str(exc)).strip()
    reason = reason[:1].lower() + reason[1:]
    name = exc.filename
    path = Path(os.fsdecode(name)) if name is not None else out_dir
    if tmp is not None and (path == tmp or tmp in path.parents):
        path = out_dir / path.relative_to(tmp)
    elif path == lock_path(out_dir):
        path = out_dir
    return f"{reason} writing {path}"


def _make_parent(out_dir: Path) -> None:
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in [parent, *parent.parents] if p.exists() and not p.is_dir())
        raise UserError(f"cannot write {out_dir}: {blocker} is a file, not a folder") from None


@contextmanager
def atomic_output(out_dir: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``out_dir`` only on success.

    On any exception (Ctrl-C and SIGTERM included) the temporary folder is removed. A run
    killed with SIGKILL leaves ``.NAME.mmath-partial-PID``, which the next run removes. An
    ``OSError`` (disk full, no permission) becomes one :class:`UserError` naming the path.
    """
    out_dir = out_dir.absolute()
    tmp: Path | None = None
    try:
        _make_parent(out_dir)
        with output_lock(out_dir) as locked:
            if os.path.lexists(out_dir) and not force:
                raise UserError(f"{out_dir} already exists; pass --force to replace it")
            clean_stale_partials(out_dir, locked)
            tmp = out_dir.parent / f".{out_dir.name}{PARTIAL_MARK}{os.getpid()}"
            _remove(tmp)
            tmp.mkdir()
            with sigterm_raises():
                try:
                    yield tmp
                    _fsync_dir(tmp)
                    _replace(tmp, out_dir, force)
                    _fsync_dir(out_dir.parent)
                except BaseException:
                    _remove(tmp)
                    raise
    except OSError as exc:
        raise UserError(os_error_message(exc, out_dir, tmp)) from None


def _replace(tmp: Path, out_dir: Path, force: bool) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` (file, folder or symlink) is
    replaced only with ``force``."""
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        return
    if not force:  # appeared while we wrote (not an mmath run: those hold the lock)
        raise UserError(
            f"{out_dir} appeared while this run was writing it; nothing was replaced "
            "(pass --force to replace it)"
        )
    old = out_dir.parent / f".{out_dir.name}{OLD_MARK}{os.getpid()}"
    _remove(old)
    os.replace(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.replace(old, out_dir)  # put the previous output back
        raise
    _remove(old)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so ``finally`` blocks clean up (the
    temporary folder of an output, the workers of a sweep)."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT):
            raise
    finally:
        os.close(fd)

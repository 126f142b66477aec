"""Progress bars that behave in logs.

On a terminal a bar is tqdm's, redrawn in place with carriage returns. When the stream is not
a terminal (a pipe, a file, CI logs) the same bar prints a plain line at the start, at most
once every :data:`LINE_INTERVAL` seconds while it moves, and at the end: no ``\\r``, no
cursor movement.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

LINE_INTERVAL = 10.0
"""Seconds between two progress lines when the stream is not a terminal."""

_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Without a terminal there is no bar to draw: a line says where it is, how fast, how long.
_LINE_FORMAT = (
    "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class LineStream:
    """A file for tqdm that turns its redraws into whole lines, at most one per ``interval``.

    tqdm writes ``"\\r" + status + padding`` on each redraw and ``"\\n"`` when a bar that stays
    is closed: the status is kept, written as a line when ``interval`` has passed since the
    last line, and the last one is written when the bar is closed.
    """

    def __init__(self, stream: IO[str], interval: float = LINE_INTERVAL):
        self.stream = stream
        self.interval = interval
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        self._pending = ""
        self._last = ""
        self._when = -float("inf")
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            for piece in re.split(r"(\r|\n)", _ESCAPES.sub("", text)):
                if piece == "\n":
                    self._emit()
                elif piece != "\r":
                    status = piece.strip()
                    if status:
                        self._pending = status
                        if time.monotonic() - self._when >= self.interval:
                            self._emit()
        return len(text)

    def _emit(self) -> None:
        # the same count again (tqdm redraws the final state on close) is not a new line
        key = self._pending.split(" [", 1)[0]
        if self._pending and key != self._last:
            self.stream.write(self._pending + "\n")
            self.stream.flush()
            self._last = key
            self._when = time.monotonic()
        self._pending = ""

    def flush(self) -> None:
        self.stream.flush()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    file: IO[str] | None = None,
    interval: float = LINE_INTERVAL,
    **kwargs: Any,
) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on ``file`` (default: stderr), in lines when ``file`` is
    not a terminal. Takes tqdm's arguments (``total``, ``desc``, ``unit``, ``disable``...)."""
    from tqdm import tqdm

    stream = file if file is not None else sys.stderr
    if not _is_tty(stream) and not kwargs.get("disable"):
        stream = LineStream(stream, interval)  # type: ignore[assignment]
        kwargs.pop("dynamic_ncols", None)
        kwargs["leave"] = True  # a line that is printed stays printed
        if kwargs.get("total") is not None or hasattr(iterable, "__len__"):
            kwargs.setdefault("bar_format", _LINE_FORMAT)
    return tqdm(iterable, file=stream, **kwargs)


def byte_progress(
    total: int, desc: str, enabled: bool = True, interval: float = LINE_INTERVAL
) -> tqdm:
    """The progress bar of long commands: bytes, on stderr, off with ``-q``."""
    return progress(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=not enabled,
        interval=interval,
    )

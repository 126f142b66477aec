"""One way to fail in the CLI: the error handler every command runs under, and one printer
each for warnings and errors.

Every command group (``mmath`` itself, ``patch``, ``valve``, ``ul2r``, ``sweep``, ``data``) is a
:class:`HandledGroup`, so every command runs inside :meth:`HandledGroup.invoke` — also when a
group is invoked on its own, as tests do — and commands carry no try/except of their own:

- :class:`~mergekit_math.errors.UserError` -> ``error: MESSAGE``, exit 2;
- an ImportError raised while a compiled kernel's module loads (numba installed but not
  importing) -> ``error:`` naming ``MMATH_FUSED=0``, exit 2;
- ``OSError`` (unwritable folder, a file where a folder should be, disk full …) -> one line
  naming the file and the system's reason, exit 2;
- Ctrl-C -> ``error: interrupted; NOTE``, exit 130, where NOTE is what the command said with
  :func:`on_interrupt` (what was kept, how to resume);
- anything else is a bug and keeps its traceback.

Only typer and click are imported here.
"""

from __future__ import annotations

import errno
from contextvars import ContextVar
from typing import Any, NoReturn

import typer
from typer.core import TyperArgument, TyperGroup

from mergekit_math.errors import UserError

# What Ctrl-C should tell the user, set by the running command (see on_interrupt).
_NOTE: ContextVar[str | None] = ContextVar("mmath_interrupt_note", default=None)


def error(message: str) -> None:
    """Print the one ``error:`` line."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def warn(message: str) -> None:
    """Print one ``warning:`` line."""
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: MESSAGE`` and exit with ``code`` (for codes other than UserError's 2)."""
    error(message)
    raise typer.Exit(code)


def on_interrupt(note: str) -> None:
    """What Ctrl-C from here on should tell the user (e.g. that nothing was written)."""
    _NOTE.set(note)


def warn_token(flag: str = "--token") -> None:
    """The token was given on the command line, where the process list shows it."""
    warn(
        f"{flag} on the command line is visible to other users in the process list while "
        "mmath runs; set HF_TOKEN in the environment (or `huggingface-cli login`) instead"
    )


def describe_os_error(exc: OSError) -> str:
    """One line naming the file and the reason: ``out/x: Permission denied``."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return reason
    where = str(exc.filename)
    if exc.filename2 is not None:
        where += f" -> {exc.filename2}"
    return f"{where}: {reason}"


class HandledGroup(TyperGroup):
    """The root group: runs the chosen command under the one error handler."""

    def invoke(self, ctx: typer.Context) -> Any:
        reset = _NOTE.set(None)
        try:
            return super().invoke(ctx)
        except UserError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            note = _NOTE.get()
            fail(f"interrupted; {note}" if note else "interrupted", code=130)
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # stdout closed (`mmath methods | head`): click's job
                raise
            fail(describe_os_error(exc))
        except ImportError as exc:
            if not _kernel_import(exc):
                raise
            fail(f"the compiled kernels do not load ({exc}); MMATH_FUSED=0 runs without them")
        finally:
            _NOTE.reset(reset)


def _kernel_import(exc: ImportError) -> bool:
    """Whether ``exc`` came from importing one of the compiled kernels' modules: numba
    installed as its metadata declares (``kernels._numba_ok``), but failing to import."""
    import traceback
    from pathlib import Path

    kernels = Path(__file__).resolve().parent.parent / "kernels"
    return any(
        Path(frame.filename).resolve().parent == kernels
        for frame in traceback.extract_tb(exc.__traceback__)
    )


def _usage_name(self: TyperArgument) -> str:
    """``RECIPE`` for a required argument, ``[NAME]`` for an optional one: click's usage
    convention (typer 0.2x writes required ones as ``{RECIPE}``)."""
    name = self.display_name_raw
    if not self.required:
        name = f"[{name}]"
    return name + ("..." if self.nargs != 1 else "")


if hasattr(TyperArgument, "_usage_display_name"):  # tests/test_faults_cli.py checks the result
    TyperArgument._usage_display_name = _usage_name  # type: ignore[method-assign]

"""What the libraries print during an evaluation, kept out of mmath's output unless --verbose.

lm-eval, datasets and transformers each print their own progress bars ("Generating test split",
"Loading weights", lm-eval's context building), log lines (lm-eval's INFO and WARNING records)
and Python warnings. None of it is mmath's output: without ``verbose`` it is switched off for the
duration of the evaluation and restored afterwards, so a push or a merge that follows prints as
before. With ``verbose`` lm-eval's log records are shown on stderr, and nothing is hidden.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any
from unittest import mock

# Loggers that speak during an evaluation; quiet means ERROR and above only.
LOGGERS = ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate", "huggingface_hub")
# Modules of lm-eval whose own tqdm bars are not mmath's progress (building contexts, cache).
LM_EVAL_BARS = ("lm_eval.api.task", "lm_eval.api.model")


@contextlib.contextmanager
def library_output(verbose: bool) -> Iterator[None]:
    """Quiet the libraries (``verbose`` False) or show lm-eval's log on stderr (True)."""
    with contextlib.ExitStack() as stack:
        if verbose:
            stack.enter_context(_lm_eval_log_shown())
        else:
            stack.enter_context(_loggers_quiet())
            stack.enter_context(_library_bars_off())
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _loggers_quiet() -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in LOGGERS}
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _lm_eval_log_shown() -> Iterator[None]:
    """lm-eval's INFO records on the current stderr. lm-eval attaches a handler only from its
    own CLI; one of ours, removed afterwards, does not outlive the stream it writes to."""
    logger = logging.getLogger("lm_eval")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s [%(name)s] %(message)s"))
    saved = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@contextlib.contextmanager
def _library_bars_off() -> Iterator[None]:
    """datasets' and transformers' bars and verbosity, and lm-eval's module-level tqdm."""
    import datasets
    import transformers.utils.logging as hf_logging
    from tqdm import tqdm

    datasets_bars = not datasets.are_progress_bars_disabled()
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_level = hf_logging.get_verbosity()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.ExitStack() as stack:
            for module in LM_EVAL_BARS:
                if module in sys.modules or _importable(module):
                    stack.enter_context(mock.patch(f"{module}.tqdm", _silent(tqdm)))
            yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        if hf_bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(hf_level)


def _silent(tqdm: Any) -> Any:
    return functools.partial(tqdm, disable=True)


def _importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True

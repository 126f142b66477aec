"""Progress of an evaluation: what runs, on how many samples, and a bar that moves per sample.

lm-eval's own bar moves once per batch, and on a CPU one batch of chain-of-thought generation
takes minutes, so it sits at 0% with nothing said. Here each request method of the model
(``generate_until``, ``loglikelihood``, ``loglikelihood_rolling``) first prints one line,
``evaluating gsm8k_cot_local: 250 samples, batch 8, on cpu``, then advances a bar (with an ETA)
for every finished request; while a batch generates, the bar's postfix counts its tokens.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from mergekit_math.io.progress import progress

REQUEST_TYPES = ("generate_until", "loglikelihood", "loglikelihood_rolling")
POSTFIX_INTERVAL = 0.5
"""Seconds between two updates of the token count in the bar's postfix."""


def _samples(requests: list[Any]) -> dict[str, set]:
    """The documents each task's requests are about (a task may ask several per document)."""
    tasks: dict[str, set] = {}
    for r in requests:
        name = str(getattr(r, "task_name", None) or "?")
        tasks.setdefault(name, set()).add(getattr(r, "doc_id", None))
    return tasks


def describe(requests: list[Any], kind: str, batch: int | str, device: str) -> str:
    """``evaluating TASKS: N samples[ (M KIND requests)], batch B, on DEVICE``."""
    tasks = _samples(requests)
    samples = sum(len(docs) for docs in tasks.values())
    extra = "" if samples == len(requests) else f" ({len(requests)} {kind} requests)"
    names = ", ".join(tasks) or "nothing"
    return f"evaluating {names}: {samples} samples{extra}, batch {batch}, on {device}"


class _Bar:
    """One request method's bar: a tick per finished request, tokens of the current batch."""

    def __init__(self, kind: str, total: int, unit: str):
        self.kind = kind
        self.bar = progress(total=total, desc=kind, unit=unit, dynamic_ncols=True)
        self.batch_rows = 0
        self.max_new = 0
        self.tokens = 0
        self._shown = 0.0

    def finished(self, attr: str, *_: Any) -> None:
        if attr == self.kind:
            self.bar.update(1)

    def batch(self, rows: int, max_new: int) -> None:
        self.batch_rows, self.max_new, self.tokens = rows, max_new, 0

    def step(self, *_: Any) -> None:
        """A forward pass of the model: one more token for each row of a generating batch."""
        if not self.batch_rows:
            return
        self.tokens += 1
        now = time.monotonic()
        if now - self._shown >= POSTFIX_INTERVAL:
            self._shown = now
            self.bar.set_postfix_str(
                f"batch of {self.batch_rows}: token {min(self.tokens, self.max_new)}/{self.max_new}"
            )

    def close(self) -> None:
        self.bar.set_postfix_str("", refresh=False)
        self.bar.close()


@contextlib.contextmanager
def request_progress(lm: Any, batch: int | str, device: str) -> Iterator[None]:
    """For the duration, ``lm``'s request methods report their progress on stderr (and run
    with lm-eval's own per-batch bar off)."""
    for kind in REQUEST_TYPES:
        if hasattr(lm, kind):
            setattr(lm, kind, _reporting(lm, kind, getattr(lm, kind), batch, device))
    try:
        yield
    finally:
        for kind in REQUEST_TYPES:
            lm.__dict__.pop(kind, None)


def _reporting(lm: Any, kind: str, method: Callable, batch: int | str, device: str) -> Callable:
    def run(requests: list[Any], disable_tqdm: bool = False) -> Any:
        sys.stderr.write(describe(requests, kind, batch, device) + "\n")
        sys.stderr.flush()
        per_sample = sum(len(d) for d in _samples(requests).values()) == len(requests)
        unit = "sample" if per_sample else "request"
        bar = _Bar(kind, len(requests), unit)
        with _hooked(lm, bar):
            try:
                return method(requests, disable_tqdm=True)
            finally:
                bar.close()

    return run


@contextlib.contextmanager
def _hooked(lm: Any, bar: _Bar) -> Iterator[None]:
    """The bar hears of each finished request (lm-eval hands every result to its cache hook),
    of each generation batch (its rows and new tokens) and of each forward pass."""
    hook = getattr(lm, "cache_hook", None)
    model = getattr(lm, "model", None)
    handle = None
    if hook is not None:
        original_add = hook.add_partial

        def add_partial(attr: str, req: Any, res: Any) -> None:
            original_add(attr, req, res)
            bar.finished(attr)

        hook.add_partial = add_partial
    if _hf_generate(lm):
        generate = lm._model_generate

        def model_generate(context: Any, max_length: int, stop: list[str], **kwargs: Any) -> Any:
            bar.batch(int(context.shape[0]), int(max_length) - int(context.shape[1]))
            try:
                return generate(context, max_length, stop, **kwargs)
            finally:
                bar.batch(0, 0)

        lm._model_generate = model_generate
    if hasattr(lm, "_loglikelihood_tokens"):
        tokens = lm._loglikelihood_tokens

        def loglikelihood_tokens(requests: Any, disable_tqdm: bool = False, **kw: Any) -> Any:
            return tokens(requests, disable_tqdm=True, **kw)

        lm._loglikelihood_tokens = loglikelihood_tokens
    if model is not None and hasattr(model, "register_forward_pre_hook"):
        handle = model.register_forward_pre_hook(lambda *_: bar.step())
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for name in ("_model_generate", "_loglikelihood_tokens"):
            lm.__dict__.pop(name, None)
        if hook is not None:
            hook.__dict__.pop("add_partial", None)


def _hf_generate(lm: Any) -> bool:
    """Whether ``lm._model_generate`` is HFLM's (a batch of token ids, a length and stop
    strings); vLLM's takes a list of prompts and SamplingParams and is left alone."""
    method = getattr(lm, "_model_generate", None)
    if method is None:
        return False
    try:
        names = list(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return False
    return names[:3] == ["context", "max_length", "stop"]

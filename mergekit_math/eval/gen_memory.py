"""Memory of long generations: the KV cache of a generating batch, kept under a budget.

lm-eval's HF model sorts generation requests longest prompt first and cuts them into batches
of ``--batch-size`` rows; ``model.generate`` then holds, for every row, keys and values of
each layer for the prompt and every generated token until the last row of the batch stops:
``rows x (prompt + max_gen_toks) x kv_bytes_per_token`` (a row that stops early keeps its
cache). With 32k-token budgets that product outgrows the device long before the weights do
(Qwen2.5-7B in bf16: 56 KiB per token, so 8 rows x 33,792 tokens = 14.4 GiB). ``batch_guard``
lowers the batch of a ``generate_until`` call so the worst batch's cache fits in
``KV_FRACTION`` of the memory free when the call starts, and says so.

``--batch-size auto`` is left to lm-eval: it tries a forward pass over the model's whole
context with full-vocabulary log-softmax per row, which costs more per token than the cache.
A ``max_gen_toks`` that leaves no room for the prompt in the model's context is refused
before anything runs (lm-eval would stop on an assert).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from mergekit_math.errors import UserError

KV_FRACTION = 0.5
"""Share of the free memory a generating batch's KV cache may take; the rest is left for
activations, logits and the allocator's slack. Measured on CPU (4-layer Llama, 8 KV heads of
32, fp32, 100-token prompt, 2000 sampled tokens): the cache held by ``generate`` was 16.4 MiB
at 1 row and 131.2 MiB at 8, as ``kv_bytes_per_token`` predicts, and peak RSS grew by 37 and
165 MiB."""


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Bytes of keys and values cached per token per sequence: 2 x layers x kv heads x head
    dim x bytes per element (grouped-query attention counted by its kv heads)."""
    text = getattr(config, "text_config", None) or config
    layers = int(text.num_hidden_layers)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
    return 2 * layers * kv_heads * int(head_dim) * dtype_bytes


def free_bytes(device: str) -> int:
    """Memory free for the cache on ``device`` now (CUDA: free device memory; CPU: available
    system memory)."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_context(tasks: dict[str, Any], gen_kwargs: dict[str, Any], max_length: int) -> None:
    """Refuse a generative task whose ``max_gen_toks`` leaves no room for a prompt in the
    model's ``max_length`` tokens."""
    for name, task in tasks.items():
        if task.get_config("output_type") != "generate_until":
            continue
        settings = {**(task.get_config("generation_kwargs") or {}), **gen_kwargs}
        wanted = int(settings.get("max_gen_toks", 256))
        if wanted >= max_length:
            raise UserError(
                f"task {name!r}: max_gen_toks={wanted} leaves no room for the prompt in the "
                f"model's context of {max_length} tokens; lower --gen-kwargs max_gen_toks"
            )


def batch_cap(rows_tokens: int, per_token: int, budget: int) -> int:
    """The most rows of ``rows_tokens`` tokens each whose cache fits in ``budget`` (at least
    one: a single row that does not fit is the model's limit, not the batch's)."""
    return max(1, budget // max(1, rows_tokens * per_token))


def _longest_row(lm: Any, requests: list[Any]) -> int:
    """Tokens of the longest prompt plus its max_gen_toks, as lm-eval truncates them."""
    longest = 0
    for req in requests:
        context, settings = req.args[0], req.args[1]
        gen = int((settings or {}).get("max_gen_toks", lm.max_gen_toks))
        prompt = min(len(lm.tok_encode(context)), max(1, lm.max_length - gen))
        longest = max(longest, prompt + gen)
    return longest


@contextlib.contextmanager
def batch_guard(lm: Any, device: str) -> Iterator[None]:
    """For the duration, ``lm.generate_until`` runs with its fixed batch size lowered to
    what the KV-cache budget allows (a line on stderr says when)."""
    batch = getattr(lm, "batch_size_per_gpu", None)
    if not isinstance(batch, int) or not hasattr(lm, "generate_until"):
        yield
        return
    method = lm.generate_until
    per_token = kv_bytes_per_token(lm.model.config, lm.model.dtype.itemsize)

    def guarded(requests: list[Any], disable_tqdm: bool = False) -> Any:
        longest = _longest_row(lm, requests) if requests else 0
        cap = batch_cap(longest, per_token, int(free_bytes(device) * KV_FRACTION))
        if cap >= batch:
            return method(requests, disable_tqdm=disable_tqdm)
        sys.stderr.write(
            f"batch {batch} lowered to {cap}: {batch} rows of up to {longest} tokens need "
            f"{batch * longest * per_token / 2**30:.1f} GiB of KV cache, more than "
            f"{KV_FRACTION:.0%} of the free memory\n"
        )
        lm.batch_size_per_gpu = cap
        try:
            return method(requests, disable_tqdm=disable_tqdm)
        finally:
            lm.batch_size_per_gpu = batch

    lm.generate_until = guarded
    try:
        yield
    finally:
        lm.__dict__.pop("generate_until", None)

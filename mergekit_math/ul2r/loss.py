"""The UL2R loss: cross-entropy of the target tokens, without the full-vocabulary logits.

A causal LM's forward returns logits for every position of the batch: ``B × T × V`` floats
(8 × 512 × 49 152 for SmolLM2 is 805 MB in float32), which cross-entropy copies, log-softmaxes
and keeps for the backward pass, several gigabytes in all. Only target tokens get a loss, so
:func:`token_losses` runs the model's body for the hidden states, picks the positions whose
next token is a target, and takes the output layer and the cross-entropy over chunks of
:data:`CHUNK_ELEMENTS` logits, each recomputed in the backward pass (activation checkpointing)
instead of stored: at most one chunk of logits exists at a time.

That needs ``logits == lm_head(body(x))``; :func:`probe_chunked_loss` checks it on the model
(some architectures scale or soft-cap their logits) and where it does not hold the plain loss
over the model's own logits is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mergekit_math.ul2r.batch import Batch

CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk (64 MB in float32): ``CHUNK_ELEMENTS // vocabulary`` target tokens."""


def plain_token_losses(model: Any, batch: Batch, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of every next-token prediction from the model's own logits, zero where
    the token is not a target: shape ``(B, T-1)``."""
    import torch.nn.functional as F

    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels = batch.input_ids[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return ce.view(labels.shape) * batch.loss_mask[:, 1:]


def token_losses(
    model: Any, batch: Batch, inputs: dict[str, torch.Tensor], chunked: bool = True
) -> torch.Tensor:
    """:func:`plain_token_losses`, computed in chunks of target tokens when ``chunked``."""
    if not chunked:
        return plain_token_losses(model, batch, inputs)
    import torch

    hidden = _body(model)(**inputs, use_cache=False).last_hidden_state[:, :-1]
    targets = batch.loss_mask[:, 1:]
    labels = batch.input_ids[:, 1:][targets]
    picked = hidden[targets]  # (N, H): only the positions that predict a target
    head = model.get_output_embeddings()
    step = max(1, CHUNK_ELEMENTS // int(head.weight.shape[0]))
    pieces = []
    for start in range(0, picked.shape[0], step):
        h, y = picked[start : start + step], labels[start : start + step]
        if torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            pieces.append(checkpoint(_chunk_ce, h, y, head, use_reentrant=False))
        else:
            pieces.append(_chunk_ce(h, y, head))
    out = hidden.new_zeros(targets.shape, dtype=torch.float32)
    if pieces:
        out = out.masked_scatter(targets, torch.cat(pieces))
    return out


def _chunk_ce(hidden: torch.Tensor, labels: torch.Tensor, head: Any) -> torch.Tensor:
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), labels, reduction="none")


def _body(model: Any) -> Any:
    """The model without its output layer (``LlamaModel`` of a ``LlamaForCausalLM``)."""
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise ValueError(f"{type(model).__name__} has no separate body")
    return body


def probe_chunked_loss(model: Any) -> tuple[bool, str]:
    """Whether the model's logits are its output layer applied to its body's last hidden
    state, by behaviour on a short input; ``(ok, reason)``."""
    import torch

    try:
        body, head = _body(model), model.get_output_embeddings()
    except (ValueError, AttributeError, NotImplementedError) as exc:
        return False, str(exc)
    if head is None or not hasattr(head, "weight"):
        return False, f"{type(model).__name__} has no output layer"
    device = head.weight.device
    vocab = int(head.weight.shape[0])
    ids = (torch.arange(8, device=device).view(1, 8) * 13 + 5) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = model(input_ids=ids, use_cache=False).logits.float()
            mine = head(body(input_ids=ids, use_cache=False).last_hidden_state).float()
    except Exception as exc:  # architectures differ in what their body accepts
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        model.train(was_training)
    scale = reference.abs().max().clamp(min=1e-6)
    if reference.shape != mine.shape or ((mine - reference).abs().max() / scale).item() > 1e-5:
        return False, "its logits are not the output layer of its last hidden state"
    return True, "chunked"


# --------------------------------------------------------------------------- per denoiser


def per_denoiser(
    losses: torch.Tensor, batch: Batch, sums: dict[int, float], counts: dict[int, int]
) -> None:
    row_sum = losses.detach().sum(dim=1).tolist()
    row_count = batch.loss_mask[:, 1:].sum(dim=1).tolist()
    for d, s, c in zip(batch.denoisers, row_sum, row_count):
        sums[d] = sums.get(d, 0.0) + s
        counts[d] = counts.get(d, 0) + int(c)


def evaluate(model, batches, config, style, device, autocast, chunked=False) -> dict[str, Any]:
    """Target-token loss on the fixed held-out batches: the mean per denoiser, and their
    mixture-weighted average as ``eval_loss``."""
    import torch

    from mergekit_math.ul2r.batch import model_inputs

    attention = "prefix_lm" if style is not None else "causal"
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    model.eval()
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(device)
            with autocast():
                losses = token_losses(
                    model, batch, model_inputs(batch, attention, style, torch.float32), chunked
                )
            per_denoiser(losses, batch, sums, counts)
    model.train()
    means = {d: sums[d] / counts[d] for d in sorted(sums) if counts[d]}
    weights = {d: config.denoisers[d].weight for d in means}
    return {
        "eval_loss": sum(weights[d] * means[d] for d in means) / max(sum(weights.values()), 1e-12),
        "eval_denoisers": {config.denoisers[d].label: m for d, m in means.items()},
    }

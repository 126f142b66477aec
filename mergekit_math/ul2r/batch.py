"""Examples to tensors: padded token rows, loss masks and 4-D prefix-LM attention masks.

Under ``attention: prefix_lm`` position ``i`` of a row may attend to position ``j`` when ``j``
is not padding and either ``j <= i`` (causal) or ``j`` lies in the row's prefix (mode token and
inputs), so the prefix is bidirectional and the targets are causal. Padding queries attend to
themselves only (no row of the mask is empty, which would give NaN in SDPA).

Models get the mask as ``attention_mask`` of shape ``(batch, 1, T, T)``: boolean (True =
attend) where the attention takes one (SDPA), additive float otherwise (eager). Whether a model
honours it is checked by :func:`probe_prefix_attention` rather than assumed; where it does not,
training falls back to causal attention with a warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from mergekit_math.ul2r.denoise import Example

if TYPE_CHECKING:
    import torch

MaskStyle = Literal["bool", "additive"]


@dataclass
class Batch:
    """Model inputs and the loss mask of some examples."""

    input_ids: torch.Tensor  # (B, T) long
    valid: torch.Tensor  # (B, T) bool: not padding
    loss_mask: torch.Tensor  # (B, T) bool: target tokens
    prefix_lengths: torch.Tensor  # (B,) long
    position_ids: torch.Tensor  # (B, T) long
    denoisers: list[int]

    @property
    def target_tokens(self) -> int:
        """Target tokens that get a loss (the first position has no prediction)."""
        return int(self.loss_mask[:, 1:].sum())

    def to(self, device: Any) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.valid.to(device),
            self.loss_mask.to(device),
            self.prefix_lengths.to(device),
            self.position_ids.to(device),
            self.denoisers,
        )


def collate(examples: Sequence[Example], length: int, pad_id: int) -> Batch:
    """Rows of ``length`` tokens, padded on the right with ``pad_id``."""
    import torch

    n = len(examples)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    valid = torch.zeros((n, length), dtype=torch.bool)
    loss = torch.zeros((n, length), dtype=torch.bool)
    prefix = torch.zeros(n, dtype=torch.long)
    for b, ex in enumerate(examples):
        tokens = ex.tokens
        if len(tokens) > length:
            raise ValueError(f"example of {len(tokens)} tokens does not fit {length}")
        ids[b, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        valid[b, : len(tokens)] = True
        loss[b, ex.prefix_length : len(tokens)] = True
        prefix[b] = ex.prefix_length
    positions = torch.arange(length, dtype=torch.long).expand(n, length).clone()
    return Batch(ids, valid, loss, prefix, positions, [ex.denoiser for ex in examples])


def prefix_lm_mask(valid: torch.Tensor, prefix_lengths: torch.Tensor) -> torch.Tensor:
    """``(B, 1, T, T)`` boolean mask: True where query ``i`` may attend to key ``j``."""
    import torch

    _, t = valid.shape
    device = valid.device
    i = torch.arange(t, device=device).view(1, t, 1)
    j = torch.arange(t, device=device).view(1, 1, t)
    causal = j <= i
    in_prefix = j < prefix_lengths.view(-1, 1, 1)
    allowed = (causal | in_prefix) & valid.unsqueeze(1) & valid.unsqueeze(2)
    allowed = allowed | (i == j)
    return allowed.unsqueeze(1)


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """``(B, 1, T, T)`` boolean causal mask with padding keys removed."""
    import torch

    return prefix_lm_mask(valid, torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device))


def model_mask(mask: torch.Tensor, style: MaskStyle, dtype: torch.dtype) -> torch.Tensor:
    """``mask`` as the model takes it: boolean, or 0 / most-negative additive in ``dtype``."""
    import torch

    if style == "bool":
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def model_inputs(
    batch: Batch, attention: str, style: MaskStyle | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Keyword arguments for the model's forward: a 4-D prefix-LM mask when ``attention`` is
    ``prefix_lm`` and the model honours one (``style``), else the 2-D padding mask."""
    kwargs: dict[str, torch.Tensor] = {
        "input_ids": batch.input_ids,
        "position_ids": batch.position_ids,
    }
    if attention == "prefix_lm" and style is not None:
        kwargs["attention_mask"] = model_mask(
            prefix_lm_mask(batch.valid, batch.prefix_lengths), style, dtype
        )
    else:
        kwargs["attention_mask"] = batch.valid.long()
    return kwargs


def probe_prefix_attention(model: Any, dtype: torch.dtype) -> tuple[MaskStyle | None, str]:
    """Which mask style ``model`` honours, by behaviour: a 4-D causal mask must reproduce the
    model's own causal output, and a prefix mask must change the first position's output
    (it then sees later prefix tokens). Returns ``(style or None, reason)``."""
    import torch

    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(6, device=device).view(1, 6) * 7 + 3) % vocab
    valid = torch.ones((1, 6), dtype=torch.bool, device=device)
    positions = torch.arange(6, device=device).view(1, 6)
    reasons = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = model(input_ids=ids, position_ids=positions).logits.float()
            for style in ("bool", "additive"):
                try:
                    causal = model(
                        input_ids=ids,
                        position_ids=positions,
                        attention_mask=model_mask(causal_mask(valid), style, dtype),
                    ).logits.float()
                    prefix = model(
                        input_ids=ids,
                        position_ids=positions,
                        attention_mask=model_mask(
                            prefix_lm_mask(valid, torch.tensor([4], device=device)), style, dtype
                        ),
                    ).logits.float()
                except Exception as exc:  # architectures reject 4-D masks in many ways
                    reasons.append(f"{style} mask: {type(exc).__name__}: {exc}".splitlines()[0])
                    continue
                scale = reference.abs().max().clamp(min=1e-6)
                same_causal = ((causal - reference).abs().max() / scale).item() < 1e-3
                changed = ((prefix[0, 0] - reference[0, 0]).abs().max() / scale).item() > 1e-6
                if same_causal and changed:
                    return style, f"{style} 4-D mask"
                reasons.append(
                    f"{style} mask: "
                    + ("ignored" if same_causal else "does not reproduce causal attention")
                )
    finally:
        model.train(was_training)
    return None, "; ".join(reasons)

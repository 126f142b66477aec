"""Sentinel and mode tokens: found in the vocabulary, mapped onto reserved tokens, or added.

For each token a config needs (sentinels ``<extra_id_0>``…, then mode tokens ``[S2S]``…):

1. a token already in the vocabulary is used as it is (T5-style tokenizers have the
   sentinels; the checkpoint of an earlier run has all of them);
2. else, with ``tokens.reuse_reserved``, the next reserved token by id (Llama 3's
   ``<|reserved_special_token_k|>``, Gemma's ``<unusedk>``…) stands for it: no new embedding
   row, and the vocabulary keeps its size, so the model still merges with its siblings;
3. else it is added to the tokenizer as a special token, and the embedding (and an untied
   output layer) grow when the new id has no row yet.

The rows of added and reused tokens are set to the mean of the original tokens' rows (reserved
rows were never trained). The mapping is written as ``ul2r_tokens.json`` next to every
checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mergekit_math.ul2r.config import UL2RConfig

if TYPE_CHECKING:
    import torch

TOKENS_FILE = "ul2r_tokens.json"


@dataclass
class SpecialTokens:
    """Ids of the sentinels and mode tokens, and how each was obtained."""

    sentinels: list[int]
    modes: dict[str, int]
    original_vocab: int
    added: list[str] = field(default_factory=list)
    reused: dict[str, str] = field(default_factory=dict)
    reused_ids: list[int] = field(default_factory=list)

    def spelling(self, name: str) -> str:
        """The token string the model sees for ``name`` (the reserved token when reused)."""
        return self.reused.get(name, name)

    def initialised_ids(self) -> list[int]:
        """Ids whose embedding rows get the mean embedding: added and reused tokens."""
        ids = set(self.sentinels) | set(self.modes.values())
        return sorted(i for i in ids if i >= self.original_vocab or i in self.reused_ids)

    def to_json(self, sentinel_names: list[str]) -> dict[str, Any]:
        """What ``ul2r_tokens.json`` holds."""
        return {
            "sentinels": dict(zip(sentinel_names, self.sentinels)),
            "mode_tokens": dict(self.modes),
            "reused_reserved": dict(self.reused),
            "added": list(self.added),
            "original_vocabulary_size": self.original_vocab,
        }


def required_tokens(config: UL2RConfig) -> tuple[list[str], list[str]]:
    """``(sentinel strings, mode token strings)`` a config needs."""
    sentinels = [config.tokens.sentinel(k) for k in range(config.tokens.num_sentinels)]
    return sentinels, config.mode_tokens()


def resolve_tokens(tokenizer: Any, config: UL2RConfig) -> SpecialTokens:
    """Give every sentinel and mode token an id, adding tokens to ``tokenizer`` as needed.

    Deterministic: on the checkpoint of an earlier run it returns the same ids and leaves the
    tokenizer as it is (added tokens exist; reserved tokens are taken in the same order).
    """
    from tokenizers import AddedToken

    sentinels, modes = required_tokens(config)
    wanted = sentinels + [m for m in modes if m not in sentinels]
    vocab: dict[str, int] = tokenizer.get_vocab()
    result = SpecialTokens([], {}, original_vocab=len(tokenizer))
    pattern = re.compile(config.tokens.reserved_pattern)
    reserved = iter(
        sorted(
            (i, s)
            for s, i in vocab.items()
            if config.tokens.reuse_reserved and pattern.fullmatch(s) and s not in wanted
        )
    )
    ids: dict[str, int] = {}
    to_add: list[str] = []
    for name in wanted:
        if name in vocab:
            ids[name] = vocab[name]
            continue
        spare = next(reserved, None)
        if spare is not None:
            ids[name] = spare[0]
            result.reused[name] = spare[1]
            result.reused_ids.append(spare[0])
            continue
        to_add.append(name)
    if to_add:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in to_add], special_tokens=True
        )
        for name in to_add:
            ids[name] = tokenizer.convert_tokens_to_ids(name)
        result.added = to_add
    result.sentinels = [ids[s] for s in sentinels]
    result.modes = {m: ids[m] for m in modes}
    return result


def _embedding_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    mats = [inp]
    if out is not None and out.weight.data_ptr() != inp.data_ptr():
        mats.append(out.weight)
    return mats


def init_embeddings(model: torch.nn.Module, tokens: SpecialTokens, vocab_size: int) -> int:
    """Grow the embeddings to ``vocab_size`` rows if they have fewer, and set the rows of the
    added and reused tokens to the mean of the original tokens' rows. Returns the number of
    rows before growing."""
    import torch

    rows = model.get_input_embeddings().weight.shape[0]
    if rows < vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    ids = tokens.initialised_ids()
    if ids:
        index = torch.tensor(ids, dtype=torch.long)
        with torch.no_grad():
            for w in _embedding_matrices(model):
                w[index] = w[: tokens.original_vocab].float().mean(dim=0).to(w.dtype)
    return rows

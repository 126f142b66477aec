"""Tiny character-level Llamas that tests train in seconds on CPU to answer generated math
problems in the gsm8k_local format (``Question: q\\nAnswer:`` at zero shots), so evaluation
results are known in advance. ``extra_chars`` adds characters to the vocabulary (``\\{}`` for
``\\boxed{}`` answers) after the default ones, whose ids never change."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!+-*/=#:$%'<>\n")


def vocabulary(extra_chars: str = "", chars: Sequence[str] = CHARS) -> dict[str, int]:
    """Token ids: four special tokens, then ``chars``, then ``extra_chars`` not among them."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for c in [*chars, *extra_chars]:
        vocab.setdefault(c, len(vocab))
    return vocab


def build_tokenizer(folder: Path, extra_chars: str = "", chars: Sequence[str] = CHARS) -> None:
    """One token per character; decoding joins them back without spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary(extra_chars, chars)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    ).save_pretrained(folder)


def new_model(folder: Path, seed: int = 0, extra_chars: str = ""):
    """An untrained model (not saved) with its tokenizer saved into ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocabulary(extra_chars)),
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    build_tokenizer(folder, extra_chars)
    return model


def bare_answer(problem) -> str:
    return f" #### {problem.final}"


def gsm8k_prompt(problem) -> str:
    return f"Question: {problem.question}\nAnswer:"


def train(
    folder: Path,
    problems: Sequence,
    answer: Callable = bare_answer,
    *,
    prompt: Callable = gsm8k_prompt,
    start: Path | None = None,
    steps: int = 300,
    lr: float = 3e-3,
    seed: int = 0,
    extra_chars: str = "",
) -> Path:
    """Teach ``<prompt(p)><answer(p)></s>`` (loss on the answer only; the prompt defaults to
    ``Question: q\\nAnswer:``) from a fresh model, or from the model in ``start``; saves into
    ``folder``. ``extra_chars`` as for :func:`new_model` (a ``start`` model must have them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if start is None:
        model = new_model(folder, seed, extra_chars)
    else:
        model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
        build_tokenizer(folder, extra_chars)
    tok = AutoTokenizer.from_pretrained(folder)
    rows, masks = [], []
    for p in problems:
        head = tok(prompt(p), add_special_tokens=False).input_ids
        target = tok(answer(p), add_special_tokens=False).input_ids + [2]
        rows.append(head + target)
        masks.append([0] * len(head) + [1] * len(target))
    width = max(map(len, rows))
    ids = torch.tensor([r + [3] * (width - len(r)) for r in rows])
    labels = ids.clone()
    labels[torch.tensor([m + [0] * (width - len(m)) for m in masks]) == 0] = -100
    lengths = torch.tensor([len(r) for r in rows])
    attention = (torch.arange(width)[None] < lengths[:, None]).long()
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    # One thread: these tensors are too small for two, and the result does not depend on the
    # machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < 1e-3:
                break
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(folder)
    return folder

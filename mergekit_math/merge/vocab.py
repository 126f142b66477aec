"""Vocabulary alignment, planned from the tokenizers before any tensor is read.

With ``tokenizer_source`` or a ``tokenizer:`` section the output vocabulary is built from the
inputs' tokenizers (``transformers``), and every input's embedding and ``lm_head`` rows are
gathered into it before the method runs, with mergekit 0.1.5's semantics:

- ``base``: the base model's tokenizer (tokens past its embedding rows dropped);
  ``union``: the base's, then every other input's tokens it lacks, added in input order;
  a model: that model's tokenizer. Tokens named under ``tokenizer.tokens`` are added too.
- An input that has a token keeps its own row (unless the token is ``force``d). For an input
  that lacks it the row comes from the token's configured source, else from the only input
  that has it, else from the base when the base has it, else the average over the inputs that
  have it; a token no input has gets zeros. Padding rows (``pad_to_multiple_of``) are each
  input's mean row.

What is planned here: the output tokenizer, one row index per output token per input (-1:
absent), and per vocabulary tensor where each missing row comes from. :mod:`.aligned` does
the gathers when the engine reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mergekit_math.errors import UserError
from mergekit_math.io.reader import PRE_LAYER_MARKERS, Checkpoint, layer_of
from mergekit_math.recipe import Recipe
from mergekit_math.recipe_vocab import ModelTokenSource, TokenEmbedding, ZeroSource

if TYPE_CHECKING:
    import torch

# Tensor names indexed by token id along dim 0 (input and output embeddings of the
# architectures mmath reads; position embeddings such as ``wpe`` are not).
VOCAB_MARKERS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out")


class Loader(Protocol):
    """The plan's checkpoint loader: one Checkpoint per resolved path."""

    by_path: dict[str, Checkpoint]

    def __call__(self, ref: str, where: str) -> Checkpoint: ...


# Where one missing row comes from: zeros, one row of one model, or the mean of several.
Zero = tuple[()]
Row = tuple[Checkpoint, int]


@dataclass
class RowPlan:
    """For one vocabulary tensor: the inputs (mergekit's order, for averaging), and per output
    token id that some input lacks (or that is forced) the rows it is made of."""

    models: list[Checkpoint]
    defaults: dict[int, list[Row]]  # token id -> rows averaged (one row: copied; none: zero)
    forced: set[int]


@dataclass
class Vocabulary:
    """The planned output vocabulary and the row gather of every input."""

    tokenizer: Any  # a transformers tokenizer, saved with the output
    size: int  # tokens in the output vocabulary
    padded: int  # embedding rows of the output (size, padded up to pad_to_multiple_of)
    perms: dict[Checkpoint, torch.Tensor]  # per input: its row for each output token, or -1
    names: set[str]  # the vocabulary tensors (names in the reference)
    rows: dict[str, RowPlan] = field(default_factory=dict)
    load_dtype: str | None = None  # recipe dtype: rows are gathered in it, as mergekit does
    copy_from: Checkpoint | None = None  # output tokenizer = this input's files, unchanged
    identity: bool = False  # every input already has exactly the output rows: no gather

    def describe(self) -> str:
        """One line for ``mmath merge --dry-run``."""
        rows = f" ({self.padded} rows)" if self.padded != self.size else ""
        if self.identity:
            how = "every input already has these rows"
        else:
            missing = max((len(p.defaults) for p in self.rows.values()), default=0)
            how = f"rows gathered per input, {missing} token(s) filled in for inputs lacking them"
        return f"{self.size} tokens{rows}; {how}"


# --------------------------------------------------------------------------- tokenizers


def _load_tokenizer(ckpt: Checkpoint) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt.path), use_fast=True)


def _rows(ckpt: Checkpoint, vocab_len: int) -> int:
    """How many token ids the model's embeddings cover (config ``vocab_size``, as mergekit)."""
    return ckpt.vocab_size or vocab_len


def _stripped(tok: Any, rows: int, where: str) -> Any:
    """The tokenizer without the tokens whose ids are past the model's embedding rows."""
    import json

    unused = {t for t, i in tok.get_vocab().items() if i >= rows}
    if not unused:
        return tok
    if not tok.is_fast:
        raise UserError(
            f"{where}: its tokenizer has {len(unused)} token(s) past the {rows} embedding rows "
            "and is not a fast tokenizer, so they cannot be dropped for vocabulary alignment"
        )
    from tokenizers import Tokenizer

    data = json.loads(tok.backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < rows]
    model = data["model"]
    for t in unused:
        model.get("vocab", {}).pop(t, None)
    if "merges" in model:

        def keep(m: Any) -> bool:
            parts = m.split(" ") if isinstance(m, str) else m
            return not any(p in unused for p in parts)

        model["merges"] = [m for m in model["merges"] if keep(m)]
    tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tok


def _union(base_tok: Any, toks: list[tuple[Checkpoint, Any]], warnings: list[str]) -> Any:
    """The base's tokenizer plus every input's tokens it lacks: plain tokens first, then
    added (special) tokens with the first input's settings."""
    import tempfile

    from transformers import AutoTokenizer

    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for ckpt, tok in toks:
        vocab = tok.get_vocab()
        rows = _rows(ckpt, len(vocab))
        decoder = tok.added_tokens_decoder
        for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
            if idx < rows:
                plain.setdefault(token, None)
        for idx, info in sorted(decoder.items()):
            if idx >= rows:
                continue
            if info.content in added and added[info.content] != info:
                warnings.append(
                    f"token {info.content!r} is added with different settings by "
                    f"{ckpt.ref}; the first input's are kept"
                )
            added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as tmp:  # a copy: the base's tokenizer stays as it is
        base_tok.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def _input_tokenizers(
    ckpts: list[Checkpoint], base: Checkpoint, warnings: list[str]
) -> dict[Checkpoint, Any]:
    """Every input's tokenizer; an input without one is taken to share the base's."""
    toks: dict[Checkpoint, Any] = {}
    for c in ckpts:
        try:
            toks[c] = _load_tokenizer(c)
        except Exception as exc:  # transformers raises many kinds for a missing tokenizer
            if c is base:
                raise UserError(
                    f"{c.ref}: its tokenizer does not load ({type(exc).__name__}: {exc}); "
                    "vocabulary alignment starts from the base model's tokenizer"
                ) from None
            warnings.append(f"{c.ref}: no tokenizer loads; taking its vocabulary as {base.ref}'s")
    return toks


# --------------------------------------------------------------------------- planning


def vocab_tensor_names(ckpt: Checkpoint) -> set[str]:
    """The reference's tensors indexed by token id (embeddings and ``lm_head``)."""
    names = set()
    for name, info in ckpt.tensors.items():
        if layer_of(name) is not None or not info.shape:
            continue
        if any(m in name for m in VOCAB_MARKERS):
            if ckpt.vocab_size is None or info.shape[0] == ckpt.vocab_size:
                names.add(name)
    if "lm_head.weight" not in ckpt.tensors and ckpt.resolve_name("lm_head.weight"):
        names.discard("lm_head.weight")  # tied: only the input embedding is stored
    return names


def _permutation(vocab_out: dict[str, int], size: int, vocab: dict[str, int], rows: int):
    import torch

    perm = torch.full((size,), -1, dtype=torch.long)
    for token, new in vocab_out.items():
        old = vocab.get(token)
        if old is not None and old < rows:
            perm[new] = old
    return perm


def _output_tokenizer(
    recipe: Recipe,
    load: Loader,
    base: Checkpoint,
    toks: dict[Checkpoint, Any],
    union_inputs: list[Checkpoint],
    warnings: list[str],
) -> tuple[Any, Checkpoint | None]:
    """(output tokenizer, the input whose tokenizer files it is unchanged, if any)."""
    source = recipe.vocabulary_source
    where = "tokenizer.source" if recipe.tokenizer is not None else "tokenizer_source"
    base_vocab = toks[base].get_vocab()
    stripped = _stripped(toks[base], _rows(base, len(base_vocab)), base.ref)
    copy_from: Checkpoint | None = None
    if source == "base":
        out = stripped
        copy_from = base if len(stripped.get_vocab()) == len(base_vocab) else None
    elif source == "union":
        others = [(c, toks[c]) for c in union_inputs if c is not base and c in toks]
        out = _union(stripped, [(base, stripped), *others], warnings)
    else:
        assert source is not None
        ckpt = load(source, where)
        try:
            out = _load_tokenizer(ckpt)
        except Exception as exc:
            raise UserError(f"{where}: {ckpt.ref}: its tokenizer does not load ({exc})") from None
        copy_from = ckpt
    tokens = (recipe.tokenizer.tokens or {}) if recipe.tokenizer is not None else {}
    existing = set(out.get_vocab())
    for token in tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
            copy_from = None
    return out, copy_from


def _input_order(
    recipe: Recipe, gi: int, load: Loader, base: Checkpoint | None
) -> tuple[list[Checkpoint], Checkpoint | None]:
    """The inputs of group ``gi`` in mergekit's order (the order rows are averaged in) and
    the base it prefers for missing rows."""
    if recipe.models:
        refs = [(f"models[{i}].model", m.model) for i, m in enumerate(recipe.models) if m.model]
        group_base = base
    else:
        assert recipe.slices is not None
        s = recipe.slices[gi]
        refs = [(f"slices[{gi}].sources[{j}].model", x.model) for j, x in enumerate(s.sources)]
        group_base = load(s.base_model, f"slices[{gi}].base_model") if s.base_model else base
    order: list[Checkpoint] = []
    for where, ref in refs:
        c = load(ref, where)
        if c not in order:
            order.append(c)
    if recipe.models and base is not None and base not in order:
        order.append(base)
    return order, group_base


def _token_row(
    vocab: Vocabulary, token: str, cfg: TokenEmbedding, load: Loader, toks: dict
) -> list[Row]:
    """The rows of a token's configured source."""
    where = f"tokenizer.tokens[{token!r}].source"
    src = cfg.source
    if isinstance(src, ZeroSource):
        return []
    if isinstance(src, ModelTokenSource):
        ckpt = load(src.model, f"{where}.model")
        if src.token_id is not None:
            rows = _rows(ckpt, src.token_id + 1)
            if src.token_id >= rows:
                raise UserError(
                    f"{where}.token_id: {src.token_id} is past {ckpt.ref}'s {rows} embedding rows"
                )
            return [(ckpt, src.token_id)]
        own = (toks.get(ckpt) or next(iter(toks.values()))).get_vocab()
        if src.token not in own:
            raise UserError(f"{where}.token: {src.token!r} is not in {ckpt.ref}'s vocabulary")
        return [(ckpt, own[src.token])]
    assert isinstance(src, str)
    ckpt = load(src, where)
    token_id = vocab.tokenizer.get_vocab()[token]
    row = int(vocab.perms[ckpt][token_id]) if ckpt in vocab.perms else -1
    if row < 0:
        raise UserError(f"{where}: {ckpt.ref} has no token {token!r} to take its row from")
    return [(ckpt, row)]


def _row_plan(
    vocab: Vocabulary,
    models: list[Checkpoint],
    group_base: Checkpoint | None,
    configured: dict[str, TokenEmbedding],
    explicit: dict[str, list[Row]],
    warnings: list[str],
) -> RowPlan:
    """Where each missing (or forced) row of one vocabulary tensor comes from."""
    import torch

    id_to_token = {i: t for t, i in vocab.tokenizer.get_vocab().items()}
    present = torch.stack([vocab.perms[m] >= 0 for m in models])
    forced = {vocab.tokenizer.get_vocab()[t] for t, cfg in configured.items() if cfg.force}
    needed = (~present.all(dim=0)).nonzero().flatten().tolist()
    defaults: dict[int, list[Row]] = {}
    absent: list[str] = []
    for token_id in sorted(set(needed) | forced):
        token = id_to_token[token_id]
        if token in explicit:
            defaults[token_id] = explicit[token]
            continue
        have = [m for m, p in zip(models, present[:, token_id].tolist()) if p]
        rows = [(m, int(vocab.perms[m][token_id])) for m in have]
        if len(have) == 0:
            absent.append(token)
            rows = []
        elif len(have) > 1 and group_base is not None and group_base in have:
            rows = [(group_base, int(vocab.perms[group_base][token_id]))]
        defaults[token_id] = rows
    if absent:
        warnings.append(
            f"{len(absent)} output token(s) are in no input's vocabulary (e.g. {absent[0]!r}); "
            "their embedding rows are zero"
        )
    return RowPlan(models, defaults, forced)


def plan_vocabulary(
    recipe: Recipe,
    load: Loader,
    base: Checkpoint | None,
    reference: Checkpoint,
    num_groups: int,
    warnings: list[str],
) -> Vocabulary | None:
    """The output vocabulary and every input's row gather, or None without a tokenizer
    setting. Loads the tokenizers; reads no tensor."""
    if recipe.vocabulary_source is None:
        return None
    for i, m in enumerate(recipe.models or []):
        if m.patch is not None:
            raise UserError(
                f"models[{i}].patch: a patch's embedding rows follow its base's vocabulary; "
                "it cannot be combined with tokenizer_source / tokenizer"
            )
    inputs = list(load.by_path.values())  # base, sources and origins: what the engine reads
    groups = [0] if num_groups == 1 else [0, num_groups - 1]
    orders = [_input_order(recipe, gi, load, base) for gi in groups]
    ref_base = base or reference
    union_inputs = list(dict.fromkeys([ref_base, *[c for order, _ in orders for c in order]]))
    if recipe.tokenizer is not None:
        for where, ref in recipe.tokenizer.model_refs():
            if where != "tokenizer.source":
                load(ref, where)
    ckpts = list(dict.fromkeys([ref_base, *union_inputs, *load.by_path.values()]))
    toks = _input_tokenizers(ckpts, ref_base, warnings)
    tokenizer, copy_from = _output_tokenizer(recipe, load, ref_base, toks, union_inputs, warnings)
    vocab_out = tokenizer.get_vocab()
    size = len(vocab_out)
    if sorted(vocab_out.values()) != list(range(size)):
        raise UserError("tokenizer: the output vocabulary's token ids are not 0..N-1")
    pad = recipe.tokenizer.pad_to_multiple_of if recipe.tokenizer is not None else None
    padded = -(-size // pad) * pad if pad else size
    perms = {}
    for c in ckpts:
        own = (toks.get(c) or toks[ref_base]).get_vocab()
        perms[c] = _permutation(vocab_out, size, own, _rows(c, len(own)))
    vocab = Vocabulary(
        tokenizer=tokenizer,
        size=size,
        padded=padded,
        perms=perms,
        names=vocab_tensor_names(reference),
        load_dtype=recipe.dtype,
        copy_from=copy_from,
    )
    _plan_rows(vocab, recipe, load, orders, toks, warnings)
    vocab.identity = (
        vocab.padded == vocab.size
        and all(not rp.defaults and not rp.forced for rp in vocab.rows.values())
        and all(_is_identity(vocab, c) for c in inputs)
    )
    return vocab


def _plan_rows(
    vocab: Vocabulary,
    recipe: Recipe,
    load: Loader,
    orders: list[tuple[list[Checkpoint], Checkpoint | None]],
    toks: dict,
    warnings: list[str],
) -> None:
    configured = dict((recipe.tokenizer.tokens or {}) if recipe.tokenizer else {})
    explicit = {
        t: _token_row(vocab, t, cfg, load, toks)
        for t, cfg in configured.items()
        if cfg.source is not None
    }
    first, last = orders[0], orders[-1]
    for name in sorted(vocab.names):
        models, group_base = first if any(m in name for m in PRE_LAYER_MARKERS) else last
        vocab.rows[name] = _row_plan(vocab, models, group_base, configured, explicit, warnings)


def _is_identity(vocab: Vocabulary, ckpt: Checkpoint) -> bool:
    """Whether the input's vocabulary tensors already are the output's rows, in order."""
    import torch

    for name in vocab.names:
        stored = ckpt.resolve_name(name)
        if stored is not None and ckpt.tensors[stored].shape[0] != vocab.size:
            return False
    return bool(torch.equal(vocab.perms[ckpt], torch.arange(vocab.size)))

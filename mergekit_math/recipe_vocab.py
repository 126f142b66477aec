"""The recipe's ``tokenizer:`` section (mergekit 0.1.5's format): where the output vocabulary
comes from and which embedding row each token gets when an input lacks it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelTokenSource(_Strict):
    """The row of one token of one model: ``{kind: model_token, model: M, token: "<s>"}`` or
    ``token_id: 1`` (an id in that model's own vocabulary)."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = Field(None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id and token")
        return self


class ZeroSource(_Strict):
    """An all-zero row: ``{kind: zero}``."""

    kind: Literal["zero"]


# ``kind`` picks the form, so an error names the form the user meant.
SourceForm = Annotated[ModelTokenSource | ZeroSource, Field(discriminator="kind")]


class TokenEmbedding(_Strict):
    """Where one output token's row comes from for the inputs that lack it (or, with
    ``force``, for every input)."""

    source: SourceForm | str | None = Field(
        None,
        description="A model (its row for this token), {kind: zero}, or {kind: model_token, "
        "model, token | token_id}; unset: chosen as for any token (one donor, else the base, "
        "else the average of the inputs that have it).",
    )
    force: bool = Field(False, description="Use the source's row for every input.")


class TokenizerSettings(_Strict):
    """``tokenizer:``: the output vocabulary and per-token embedding sources."""

    source: str = Field(
        "union",
        description="'union' (every input's tokens), 'base' (the base model's) or a model.",
    )
    tokens: dict[str, TokenEmbedding] | None = Field(
        None, description="Tokens added to the vocabulary (if absent) and their rows."
    )
    pad_to_multiple_of: int | None = Field(
        None, gt=0, description="Pad the embedding rows to a multiple (rows: the mean row)."
    )

    def model_refs(self) -> list[tuple[str, str]]:
        """(YAML path, reference) of every model the section names."""
        refs: list[tuple[str, str]] = []
        if self.source not in ("union", "base"):
            refs.append(("tokenizer.source", self.source))
        for token, cfg in (self.tokens or {}).items():
            where = f"tokenizer.tokens[{token!r}].source"
            if isinstance(cfg.source, str):
                refs.append((where, cfg.source))
            elif isinstance(cfg.source, ModelTokenSource):
                refs.append((f"{where}.model", cfg.source.model))
        return refs

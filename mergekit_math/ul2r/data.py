"""Training text: file resolution, a byte-offset document index, token streams and examples.

Files are JSONL (one document per line, in the ``text`` field or ``data.text_field``) or plain
text (documents separated by blank lines). Indexing reads each file once, validates every JSONL
line and keeps only byte offsets, so memory does not grow with the corpus; documents are read
and tokenized when the stream reaches them.

A :class:`TokenStream` walks its documents in a seeded order (reshuffled each epoch), each
followed by a separator token. With packing, an example takes the next ``n`` tokens across
document boundaries (T5/UL2 pack before corrupting); without, it takes at most ``n`` tokens
of the current document and is padded later. The stream's position is three integers, saved
with every checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mergekit_math.errors import UserError
from mergekit_math.io.resolve import find_local
from mergekit_math.ul2r.config import UL2RConfig
from mergekit_math.ul2r.denoise import DenoiserRuntime, Example
from mergekit_math.ul2r.mixture import (
    EVAL_STREAM,
    TRAIN_STREAM,
    MixtureSampler,
    SourceSchedule,
    example_rng,
)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass(frozen=True)
class Source:
    """A named set of files with its mixture weights (one source without upsampling)."""

    name: str
    paths: tuple[Path, ...]
    weight: float = 1.0
    final_weight: float | None = None


def _find(ref: str, where: str, base_dir: Path | None) -> Path:
    found = find_local(ref, where, base_dir)
    if found is None or not found.is_file():
        kind = "not a file" if found is not None else "file not found"
        raise UserError(f"{where}: {kind}: {ref}")
    return found


def _split_data_arg(data: Sequence[str]) -> list[str]:
    return [p.strip() for item in data for p in item.split(",") if p.strip()]


def resolve_sources(
    config: UL2RConfig, config_dir: Path | None, data: Sequence[str] | None = None
) -> list[Source]:
    """The data sources of a run, every file checked to exist.

    ``data`` (the ``--data`` option, comma-separated, relative to the current directory)
    replaces ``data.paths``; with ``domain_upsampling`` it gives ``NAME=FILE`` entries that
    replace the paths of the named sources.
    """
    entries = _split_data_arg(data or [])
    up = config.domain_upsampling
    if up is None:
        if entries:
            if any("=" in e for e in entries):
                raise UserError(
                    "--data: NAME=FILE entries need a domain_upsampling block in the config"
                )
            paths = tuple(_find(e, "--data", None) for e in entries)
        else:
            paths = tuple(
                _find(p, f"data.paths[{i}]", config_dir) for i, p in enumerate(config.data.paths)
            )
        if not paths:
            raise UserError("no training data: pass --data FILE[,FILE...] or set data.paths")
        return [Source("data", paths)]
    override: dict[str, list[Path]] = {}
    names = [s.name for s in up.sources]
    for e in entries:
        name, sep, ref = e.partition("=")
        if not sep:
            raise UserError(
                f"--data: this config mixes sources ({', '.join(names)}); "
                f"write NAME=FILE, got {e!r}"
            )
        if name not in names:
            raise UserError(f"--data: unknown source {name!r} (sources: {', '.join(names)})")
        override.setdefault(name, []).append(_find(ref, f"--data {name}", None))
    sources = []
    for i, s in enumerate(up.sources):
        if s.name in override:
            paths = tuple(override[s.name])
        else:
            paths = tuple(
                _find(p, f"domain_upsampling.sources[{i}].paths[{j}]", config_dir)
                for j, p in enumerate(s.paths)
            )
        sources.append(Source(s.name, paths, s.weight, s.final_weight))
    return sources


# --------------------------------------------------------------------------- document index


def _is_jsonl(path: Path, fmt: str) -> bool:
    if fmt == "auto":
        return path.suffix.lower() in JSONL_SUFFIXES
    return fmt == "jsonl"


class DocumentIndex:
    """Byte ranges of the documents of some files; :meth:`text` reads one document."""

    def __init__(
        self,
        paths: Sequence[Path],
        fmt: str = "auto",
        text_field: str = "text",
        template: str | None = None,
    ):
        self.paths = list(paths)
        self.jsonl = [_is_jsonl(p, fmt) for p in self.paths]
        self.text_field = text_field
        self.template = template
        files: list[int] = []
        starts: list[int] = []
        ends: list[int] = []
        for fid, path in enumerate(self.paths):
            before = len(files)
            ranges = self._jsonl_ranges(path) if self.jsonl[fid] else self._text_ranges(path)
            for start, end in ranges:
                files.append(fid)
                starts.append(start)
                ends.append(end)
            if len(files) == before:
                raise UserError(f"{path}: no documents (empty file or only blank text)")
        self.file = np.asarray(files, dtype=np.int32)
        self.start = np.asarray(starts, dtype=np.int64)
        self.end = np.asarray(ends, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.file)

    def _jsonl_ranges(self, path: Path):
        offset = 0
        with path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                size = len(line)
                if line.strip():
                    try:
                        record = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        raise UserError(f"{path}:{lineno}: not valid JSON: {exc}") from None
                    if self._record_text(record, f"{path}:{lineno}").strip():
                        yield offset, offset + size
                offset += size

    def _record_text(self, record: Any, where: str) -> str:
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if self.template is not None:
            try:
                return self.template.format_map(record)
            except KeyError as exc:
                raise UserError(
                    f"{where}: no {exc.args[0]!r} field for data.text_template"
                ) from None
        if self.text_field not in record:
            raise UserError(
                f"{where}: no {self.text_field!r} field (set data.text_field or data.text_template)"
            )
        text = record[self.text_field]
        if not isinstance(text, str):
            raise UserError(f"{where}: {self.text_field!r} is a {type(text).__name__}, not text")
        return text

    @staticmethod
    def _text_ranges(path: Path):
        offset = 0
        start: int | None = None
        with path.open("rb") as f:
            for line in f:
                if line.strip():
                    if start is None:
                        start = offset
                elif start is not None:
                    yield start, offset
                    start = None
                offset += len(line)
        if start is not None:
            yield start, offset

    def text(self, doc: int) -> str:
        """The text of document ``doc``."""
        fid = int(self.file[doc])
        with self.paths[fid].open("rb") as f:
            f.seek(int(self.start[doc]))
            raw = f.read(int(self.end[doc] - self.start[doc]))
        if self.jsonl[fid]:
            return self._record_text(json.loads(raw), str(self.paths[fid]))
        return raw.decode("utf-8", errors="replace").rstrip("\n")


def split_holdout(n_docs: int, holdout: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out document ids: the last ``holdout`` documents are held out."""
    if holdout and n_docs <= holdout:
        raise UserError(
            f"eval.holdout_documents: {where} has {n_docs} documents, so holding out {holdout} "
            "leaves none for training; lower it or set eval.interval to 0"
        )
    ids = np.arange(n_docs, dtype=np.int64)
    return ids[: n_docs - holdout], ids[n_docs - holdout :]


# --------------------------------------------------------------------------- token streams


class TokenStream:
    """The tokens of some documents in a seeded order per epoch, each followed by
    ``separator``."""

    def __init__(
        self,
        index: DocumentIndex,
        docs: np.ndarray,
        tokenize: Callable[[str], list[int]],
        separator: int,
        *,
        seed: int,
        source: int,
        shuffle: bool,
        packing: bool,
    ):
        if len(docs) == 0:
            raise ValueError("a token stream needs at least one document")
        self.index = index
        self.docs = docs
        self.tokenize = tokenize
        self.separator = separator
        self.seed = seed
        self.source = source
        self.shuffle = shuffle
        self.packing = packing
        self.epoch = 0
        self.position = 0
        self.offset = 0
        self._order: tuple[int, np.ndarray] | None = None
        self._cache: tuple[int, list[int]] | None = None

    def _doc_at(self, epoch: int, position: int) -> int:
        if self._order is None or self._order[0] != epoch:
            order = self.docs
            if self.shuffle:
                order = np.random.default_rng([self.seed, 2, self.source, epoch]).permutation(
                    self.docs
                )
            self._order = (epoch, order)
        return int(self._order[1][position])

    def _tokens(self) -> list[int]:
        doc = self._doc_at(self.epoch, self.position)
        if self._cache is None or self._cache[0] != doc:
            self._cache = (doc, [*self.tokenize(self.index.text(doc)), self.separator])
        return self._cache[1]

    def _advance(self) -> None:
        self.offset = 0
        self.position += 1
        if self.position == len(self.docs):
            self.position = 0
            self.epoch += 1

    def take(self, n: int) -> list[int]:
        """The next ``n`` tokens (packing), or at most ``n`` of the current document."""
        out: list[int] = []
        while len(out) < n:
            tokens = self._tokens()
            chunk = tokens[self.offset : self.offset + n - len(out)]
            out.extend(chunk)
            self.offset += len(chunk)
            if self.offset >= len(tokens):
                self._advance()
            if not self.packing:
                break
        return out

    def state_dict(self) -> dict[str, int]:
        """Where the stream is: epoch, position in the epoch's order, token offset."""
        return {"epoch": self.epoch, "position": self.position, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.offset = int(state["offset"])


class ExampleFactory:
    """Example ``i`` of a run: a denoiser and a source drawn with ``example_rng(seed, stream,
    i)``, text taken from that source's stream, the denoiser applied."""

    def __init__(
        self,
        denoisers: Sequence[DenoiserRuntime],
        streams: Sequence[TokenStream],
        schedule: SourceSchedule,
        *,
        seed: int,
        stream: int,
    ):
        self.denoisers = list(denoisers)
        self.streams = list(streams)
        self.schedule = schedule
        self.seed = seed
        self.stream = stream
        self.sampler = MixtureSampler([d.config.weight for d in self.denoisers])

    def make(self, index: int, step: int, denoiser: int | None = None) -> tuple[Example, int]:
        """``(example, source)`` for example ``index`` at ``step`` (``denoiser`` forces one)."""
        rng = example_rng(self.seed, self.stream, index)
        drawn = self.sampler.draw(rng)
        d = self.denoisers[drawn if denoiser is None else denoiser]
        source = self.schedule.sampler(step).draw(rng)
        stream = self.streams[source]
        tokens = stream.take(d.raw_length)
        tries = 0
        while len(tokens) < 2:
            tries += 1
            if tries > len(stream.docs) + 1:
                raise UserError(f"source {source}: no document gives the 2 tokens an example needs")
            tokens = stream.take(d.raw_length)
        return d.apply(tokens, rng), source

    def state_dict(self) -> list[dict[str, int]]:
        return [s.state_dict() for s in self.streams]

    def load_state_dict(self, state: Sequence[dict[str, Any]]) -> None:
        if len(state) != len(self.streams):
            raise UserError(
                f"the checkpoint has {len(state)} data sources, the config {len(self.streams)}"
            )
        for s, st in zip(self.streams, state):
            s.load_state_dict(st)


# --------------------------------------------------------------------------- a run


def _token_id(tokenizer: Any, text: str | None, where: str) -> int:
    if text is None:
        tid = tokenizer.eos_token_id
        if tid is None:
            raise UserError(f"{where}: the tokenizer has no EOS token; set data.separator")
        return int(tid)
    vocab = tokenizer.get_vocab()
    if text not in vocab:
        raise UserError(f"{where}: {text!r} is not a token of the tokenizer")
    return int(vocab[text])


@dataclass
class RunData:
    """The training examples, the fixed held-out batches and the padding id of a run."""

    factory: ExampleFactory
    eval_batches: list[Any]
    pad_id: int


def build_run_data(
    config: UL2RConfig, tokenizer: Any, tokens: Any, sources: Sequence[Source]
) -> RunData:
    """Index the sources, split off the held-out documents and build the example factory
    and the evaluation batches (the same ones at every evaluation; the denoisers in turn)."""
    from mergekit_math.ul2r.batch import collate

    seq = config.training.sequence_length
    runtimes = [
        DenoiserRuntime.build(
            i, d, seq, tokens.modes.get(d.mode_token) if d.mode_token else None, tokens.sentinels
        )
        for i, d in enumerate(config.denoisers)
    ]
    separator = _token_id(tokenizer, config.data.separator, "data.separator")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else separator

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    holdout = config.eval.holdout_documents if config.eval.interval > 0 else 0
    train_streams, eval_streams = [], []
    for i, src in enumerate(sources):
        index = DocumentIndex(
            src.paths, config.data.format, config.data.text_field, config.data.text_template
        )
        train_ids, eval_ids = split_holdout(len(index), holdout, f"source {src.name!r}")
        common = dict(seed=config.training.seed, source=i, packing=config.data.packing)
        train_streams.append(
            TokenStream(
                index, train_ids, tokenize, separator, shuffle=config.data.shuffle, **common
            )
        )
        if holdout:
            eval_streams.append(
                TokenStream(index, eval_ids, tokenize, separator, shuffle=False, **common)
            )
    up = config.domain_upsampling
    schedule = SourceSchedule(
        [s.weight for s in sources],
        [s.final_weight for s in sources] if up else None,
        config.training.steps,
        up.final_fraction if up else None,
    )
    seed = config.training.seed
    train = ExampleFactory(runtimes, train_streams, schedule, seed=seed, stream=TRAIN_STREAM)
    eval_batches = []
    if holdout:
        factory = ExampleFactory(
            runtimes,
            eval_streams,
            SourceSchedule([s.weight for s in sources]),
            seed=seed,
            stream=EVAL_STREAM,
        )
        # The denoisers in turn, so that each one's loss is measured.
        b = config.training.batch_size
        for k in range(config.eval.batches):
            ids = range(k * b, (k + 1) * b)
            examples = [factory.make(i, 0, denoiser=i % len(runtimes))[0] for i in ids]
            eval_batches.append(collate(examples, seq, pad_id))
    return RunData(train, eval_batches, pad_id)

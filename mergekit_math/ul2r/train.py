"""The UL2R continued-training loop (transformers + torch; CPU-capable for small models).

One optimizer step draws ``batch_size × gradient_accumulation_steps`` examples (example ``i``
from its own seeded generator, see :mod:`mergekit_math.ul2r.mixture`), runs the model with
prefix-LM or causal attention, and takes the mean cross-entropy over the target tokens only.

Output folder::

    OUT/checkpoint-000200/   float32 weights (HF layout, safetensors) + tokenizer + optimizer,
                             scheduler, RNG and data position: what --resume continues from
    OUT/final/               the finished model in save.dtype, HF layout: what mmath merge,
                             patch extract and eval take
    OUT/log.jsonl            one line per step (loss, per-denoiser loss, lr, tokens/s) and
                             per evaluation

Every folder is written under a temporary name and renamed when complete. Each holds the
fully resolved config (``ul2r.yaml``), the token mapping (``ul2r_tokens.json``) and
``trainer_state.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mergekit_math.errors import UserError
from mergekit_math.io.resolve import find_local, resolve_model
from mergekit_math.ul2r.config import UL2RConfig, dump_config, parse_config
from mergekit_math.ul2r.data import Source, build_run_data, resolve_sources
from mergekit_math.ul2r.loss import evaluate, per_denoiser, probe_chunked_loss, token_losses

if TYPE_CHECKING:
    import torch

    from mergekit_math.ul2r.batch import Batch

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
FINAL = "final"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "ul2r.yaml"
LOG_FILE = "log.jsonl"
# What a run keeps about its base model (in trainer_state.json) for the final save.
META_KEYS = ("base_model", "base_dtype", "original_rows", "original_vocab", "added")


@dataclass
class TrainResult:
    """What a call to :func:`train` did."""

    out_dir: Path
    step: int
    final: Path | None
    checkpoints: list[Path] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    attention: str = "causal"
    warnings: list[str] = field(default_factory=list)


@dataclass
class LearningRateSchedule:
    """Multiplier of the peak learning rate at a step: linear warmup, then cosine, linear or
    constant down to ``floor``."""

    warmup: int
    steps: int
    kind: str
    floor: float

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.floor + (1.0 - self.floor) * shape


# --------------------------------------------------------------------------- setup


def resolved_config(
    config: UL2RConfig, config_dir: Path | None, sources: Sequence[Source]
) -> UL2RConfig:
    """``config`` with the model as an absolute path (when local) and the data files as
    resolved: what is saved with every checkpoint and can be replayed alone."""
    data = config.model_dump(mode="json")
    local = find_local(config.model, "model", config_dir)
    if local is not None:
        data["model"] = str(local)
    if config.domain_upsampling is None:
        data["data"]["paths"] = [str(p) for p in sources[0].paths]
    else:
        for s, src in zip(data["domain_upsampling"]["sources"], sources):
            s["paths"] = [str(p) for p in src.paths]
    return parse_config(data, source="resolved config")


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The complete checkpoint with the most steps (``final`` when the run finished)."""
    if (out_dir / FINAL / STATE_FILE).is_file():
        return out_dir / FINAL
    found = [
        (int(m.group(1)), p)
        for p in out_dir.glob("checkpoint-*")
        if (m := CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return max(found)[1] if found else None


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix or "<config>"]


def _check_resumable(config: UL2RConfig, checkpoint: Path, sources: Sequence[Source]) -> dict:
    state = json.loads((checkpoint / STATE_FILE).read_text())
    saved = parse_config(yaml.safe_load((checkpoint / CONFIG_FILE).read_text()), str(checkpoint))
    changed = _diff_keys(saved.training_view(), config.training_view())
    if changed:
        raise UserError(
            f"--resume: the config differs from the one {checkpoint} was trained with "
            f"({', '.join(changed)}); use the same config, or start over with --force"
        )
    paths = [[str(p) for p in s.paths] for s in sources]
    if state["sources"] != paths:
        raise UserError(
            f"--resume: the data files differ from the ones {checkpoint} was trained with "
            f"({state['sources']}); pass the same --data"
        )
    return state


def _base_dtype(model_dir: Path) -> str:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def _load(model_dir: Path, where: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where}: cannot load {model_dir} with transformers: {first}") from None
    return model, tokenizer


def _device(device: str) -> torch.device:
    import torch

    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        raise UserError(f"--device: expected cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device(device)


def _checkpoint_activations(model: Any) -> None:
    """Recompute each layer in the backward pass (transformers 5 names it activation
    checkpointing; 4.x gradient checkpointing)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _autocast(config: UL2RConfig, device: torch.device):
    import torch

    precision = config.training.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


# --------------------------------------------------------------------------- data


def step_batches(config: UL2RConfig, factory: Any, step: int, pad_id: int) -> list[Batch]:
    """The micro-batches of optimizer step ``step`` (0-based)."""
    from mergekit_math.ul2r.batch import collate

    b = config.training.batch_size
    accum = config.training.gradient_accumulation_steps
    out = []
    for micro in range(accum):
        first = (step * accum + micro) * b
        examples = [factory.make(first + j, step)[0] for j in range(b)]
        out.append(collate(examples, config.training.sequence_length, pad_id))
    return out


# --------------------------------------------------------------------------- saving


def _write_folder(
    target: Path,
    write: Callable[[Path], None],
) -> Path:
    """Run ``write`` into a temporary sibling of ``target`` and rename it into place."""
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _save_common(folder: Path, config_text: str, tokens_json: dict | None, state: dict) -> None:
    (folder / CONFIG_FILE).write_text(config_text)
    if tokens_json is not None:
        from mergekit_math.ul2r.tokens import TOKENS_FILE

        (folder / TOKENS_FILE).write_text(json.dumps(tokens_json, indent=2) + "\n")
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def _prune(out_dir: Path, keep: int) -> None:
    found = sorted(
        (int(m.group(1)), p)
        for p in out_dir.glob("checkpoint-*")
        if (m := CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file()
    )
    for _, p in found[:-keep]:
        shutil.rmtree(p)


def _read_log(out_dir: Path, upto: int) -> list[dict[str, Any]]:
    path = out_dir / LOG_FILE
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("step", 0) <= upto]


# --------------------------------------------------------------------------- train


def train(
    config: UL2RConfig,
    out_dir: Path,
    *,
    config_dir: Path | None = None,
    data: Sequence[str] | None = None,
    device: str = "cpu",
    resume: bool = False,
    force: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = lambda m: print(f"warning: {m}", file=sys.stderr),
) -> TrainResult:
    """Continue training ``config.model`` with the config's mixture of denoisers.

    ``data`` replaces the config's data files (the ``--data`` option). With ``resume``, training
    continues from the latest checkpoint in ``out_dir`` (a finished run returns at once);
    ``stop_after`` saves a checkpoint and returns after that many steps in total. Every problem
    with the config, files or output folder raises :class:`UserError` before training starts.
    """
    out_dir = Path(out_dir)
    if resume and force:
        raise UserError("--resume and --force exclude each other")
    if stop_after is not None and not 1 <= stop_after <= config.training.steps:
        raise UserError(f"--stop-after: expected 1..{config.training.steps}, got {stop_after}")
    sources = resolve_sources(config, config_dir, data)
    config = resolved_config(config, config_dir, sources)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder")
    checkpoint = None
    clear = False
    if out_dir.exists() and any(out_dir.iterdir()):
        if force:
            clear = True  # once the model has loaded
        elif not resume:
            raise UserError(
                f"{out_dir} already exists; pass --resume to continue it or --force to start over"
            )
        else:
            checkpoint = latest_checkpoint(out_dir)
    state = _check_resumable(config, checkpoint, sources) if checkpoint is not None else None
    if state is not None and state.get("finished"):
        echo(f"{out_dir} already finished at step {state['step']}: {checkpoint}")
        return TrainResult(out_dir, state["step"], checkpoint, history=_read_log(out_dir, 10**12))
    if resume and checkpoint is None:
        echo(f"no checkpoint in {out_dir}; starting from step 0")
    torch_device = _device(device)
    return _Trainer(config, out_dir, sources, checkpoint, state, torch_device, echo, warn).run(
        stop_after, progress, clear
    )


class _Trainer:
    """State of one training run; :meth:`run` is the loop."""

    def __init__(self, config, out_dir, sources, checkpoint, state, device, echo, warn):
        import torch

        self.config = config
        self.out_dir = out_dir
        self.sources = sources
        self.device = device
        self.echo = echo
        self.warn = warn
        self.warnings: list[str] = []
        self.config_text = dump_config(config)
        t = config.training
        torch.manual_seed(t.seed)
        if checkpoint is None:
            base_dir = resolve_model(config.model, "model")
            self.model, self.tokenizer = _load(base_dir, "model")
            self.meta = {
                "base_model": str(base_dir),
                "base_dtype": _base_dtype(base_dir),
                "original_rows": int(self.model.get_input_embeddings().weight.shape[0]),
            }
        else:
            self.model, self.tokenizer = _load(checkpoint, "--resume")
            self.meta = {k: state[k] for k in META_KEYS}
        self._setup_tokens(fresh=checkpoint is None)
        self.data = build_run_data(config, self.tokenizer, self.tokens, sources)
        self.model.to(device)
        self.model.train()
        if t.gradient_checkpointing:
            _checkpoint_activations(self.model)
        self.autocast = _autocast(config, device)
        self.style = None
        self.attention = "causal"
        if config.attention == "prefix_lm":
            from mergekit_math.ul2r.batch import probe_prefix_attention

            self.style, reason = probe_prefix_attention(self.model, torch.float32)
            if self.style is None:
                self._warn(
                    f"{type(self.model).__name__} does not accept a 4-D attention mask "
                    f"({reason}); training with causal attention instead of prefix_lm "
                    "(the loss is still on the targets only)"
                )
            else:
                self.attention = "prefix_lm"
        self.chunked, _ = probe_chunked_loss(self.model)
        self._setup_optimizer()
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []
        if checkpoint is not None:
            self._restore(checkpoint, state)

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        self.warn(message)

    def _setup_tokens(self, fresh: bool) -> None:
        from mergekit_math.ul2r.tokens import init_embeddings, resolve_tokens

        self.tokens = resolve_tokens(self.tokenizer, self.config)
        if fresh:
            self.meta["original_vocab"] = self.tokens.original_vocab
            self.meta["added"] = list(self.tokens.added)
            init_embeddings(self.model, self.tokens, len(self.tokenizer))
            if self.tokens.reused:
                pairs = ", ".join(f"{k} -> {v}" for k, v in list(self.tokens.reused.items())[:4])
                more = len(self.tokens.reused) - 4
                self.echo(
                    f"reusing {len(self.tokens.reused)} reserved tokens ({pairs}"
                    + (f", … {more} more" if more > 0 else "")
                    + ")"
                )
            if self.tokens.added:
                self.echo(
                    f"added {len(self.tokens.added)} tokens to the tokenizer; embedding rows: "
                    f"{self.meta['original_rows']} -> "
                    f"{self.model.get_input_embeddings().weight.shape[0]} (new rows = mean)"
                )
        else:
            self.tokens.original_vocab = self.meta["original_vocab"]
            self.tokens.added = list(self.meta["added"])

    def _setup_optimizer(self) -> None:
        import torch

        t = self.config.training
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": t.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_epsilon,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            LearningRateSchedule(t.warmup_steps, t.steps, t.schedule, t.min_learning_rate_ratio),
        )

    def _restore(self, checkpoint: Path, state: dict) -> None:
        import torch

        extra = torch.load(checkpoint / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["cpu_rng"].cpu())
        if "cuda_rng" in extra and self.device.type == "cuda":
            torch.cuda.set_rng_state(extra["cuda_rng"].cpu(), self.device)
        self.data.factory.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.history = _read_log(self.out_dir, self.step)
        (self.out_dir / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in self.history))
        self.echo(f"resuming from {checkpoint} at step {self.step}")

    # ----------------------------------------------------------------- loop

    def run(self, stop_after: int | None, progress: bool, clear: bool = False) -> TrainResult:
        """Train up to ``stop_after`` (default: all) steps; ``clear`` empties the output
        folder first (``--force``)."""
        from mergekit_math.io.progress import progress as tqdm

        t = self.config.training
        if clear:
            shutil.rmtree(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.out_dir.glob(".tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        if self.step == 0:
            (self.out_dir / LOG_FILE).unlink(missing_ok=True)
        checkpoints: list[Path] = []
        stop = stop_after if stop_after is not None else t.steps
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            disable=not progress,
            desc="ul2r",
            unit="step",
            dynamic_ncols=True,
        )
        try:
            if self.step == 0 and self.config.eval.interval > 0 and self.data.eval_batches:
                self._log({"step": 0, **self._evaluate()})
            while self.step < stop:
                row = {"step": self.step + 1, **self._train_step()}
                self.step += 1
                if self._due(self.config.eval.interval) and self.data.eval_batches:
                    row.update(self._evaluate())
                self._log(row)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}",
                    tok_s=f"{row['tokens_per_s']:.0f}",
                    lr=f"{row['lr']:.2e}",
                    refresh=False,
                )
                if self.step < t.steps and (
                    self._due(self.config.save.interval) or self.step == stop
                ):
                    checkpoints.append(self._save_checkpoint())
        finally:
            bar.close()
        final = self._save_final() if self.step == t.steps else None
        return TrainResult(
            self.out_dir,
            self.step,
            final,
            checkpoints,
            self.history,
            self.attention,
            self.warnings,
        )

    def _due(self, interval: int) -> bool:
        return interval > 0 and self.step % interval == 0

    def _train_step(self) -> dict[str, Any]:
        import torch

        from mergekit_math.ul2r.batch import model_inputs

        start = time.perf_counter()
        batches = step_batches(self.config, self.data.factory, self.step, self.data.pad_id)
        targets = sum(b.target_tokens for b in batches)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[int, float] = {}
        counts: dict[int, int] = {}
        tokens = 0
        for batch in batches:
            batch = batch.to(self.device)
            with self.autocast():
                losses = token_losses(
                    self.model,
                    batch,
                    model_inputs(batch, self.attention, self.style, torch.float32),
                    self.chunked,
                )
            (losses.sum() / max(targets, 1)).backward()
            per_denoiser(losses, batch, sums, counts)
            tokens += int(batch.valid.sum())
            del losses, batch  # the next micro-batch's graph is built without this one's
        max_norm = self.config.training.max_grad_norm
        grad_norm = None
        if max_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.tokens_seen += tokens
        elapsed = time.perf_counter() - start
        names = [d.label for d in self.config.denoisers]
        row: dict[str, Any] = {
            "loss": sum(sums.values()) / max(targets, 1),
            "denoisers": {names[d]: sums[d] / counts[d] for d in sorted(sums) if counts[d]},
            "lr": lr,
            "tokens": tokens,
            "target_tokens": targets,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "seconds": elapsed,
        }
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        return row

    def _evaluate(self) -> dict[str, Any]:
        return evaluate(
            self.model,
            self.data.eval_batches,
            self.config,
            self.style,
            self.device,
            self.autocast,
            self.chunked,
        )

    def _log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        with (self.out_dir / LOG_FILE).open("a") as f:
            f.write(json.dumps(row) + "\n")

    def _state(self, finished: bool) -> dict[str, Any]:
        return {
            "step": self.step,
            "steps": self.config.training.steps,
            "finished": finished,
            "tokens_seen": self.tokens_seen,
            "attention": self.attention,
            "data": self.data.factory.state_dict(),
            "sources": [[str(p) for p in s.paths] for s in self.sources],
            **self.meta,
        }

    def _tokens_json(self) -> dict[str, Any]:
        from mergekit_math.ul2r.tokens import required_tokens

        return self.tokens.to_json(required_tokens(self.config)[0])

    def _save_checkpoint(self) -> Path:
        import torch

        from mergekit_math.io.writer import parse_size

        shard = parse_size(self.config.save.max_shard_size)

        def write(folder: Path) -> None:
            self.model.save_pretrained(folder, max_shard_size=shard)
            self.tokenizer.save_pretrained(folder)
            extra = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "cpu_rng": torch.get_rng_state(),
            }
            if self.device.type == "cuda":
                extra["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            torch.save(extra, folder / OPTIMIZER_FILE)
            _save_common(folder, self.config_text, self._tokens_json(), self._state(False))

        path = _write_folder(self.out_dir / f"checkpoint-{self.step:06d}", write)
        _prune(self.out_dir, self.config.save.keep)
        return path

    def _save_final(self) -> Path:
        import torch

        from mergekit_math.io.writer import parse_size

        save = self.config.save
        dtype = self.meta["base_dtype"] if save.dtype == "auto" else save.dtype
        model = self.model.to(getattr(torch, dtype))
        tokenizer = self.tokenizer
        tokens_json: dict | None = self._tokens_json()
        if save.vocabulary == "original" and self.tokens.added:
            from transformers import AutoTokenizer

            model.resize_token_embeddings(self.meta["original_rows"], mean_resizing=False)
            tokenizer = AutoTokenizer.from_pretrained(self.meta["base_model"])
            tokens_json = None
        shard = parse_size(save.max_shard_size)

        def write(folder: Path) -> None:
            model.save_pretrained(folder, max_shard_size=shard)
            tokenizer.save_pretrained(folder)
            _save_common(folder, self.config_text, tokens_json, self._state(True))

        path = _write_folder(self.out_dir / FINAL, write)
        self.echo(f"final model ({dtype}) written to {path}")
        rows = model.get_input_embeddings().weight.shape[0]
        if rows != self.meta["original_rows"]:
            self.echo(
                f"note: {rows - self.meta['original_rows']} embedding rows were added; mmath "
                "merge accepts it with models of the same vocabulary, or set save.vocabulary: "
                "original to merge with models on the base vocabulary"
            )
        return path

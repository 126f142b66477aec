"""`mmath eval`: lm-eval's ``simple_evaluate`` over one model loaded once, with a result cache,
chain-of-thought length statistics and offline-by-default datasets."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from pydantic import BaseModel, ConfigDict, Field

from mergekit_math import __version__
from mergekit_math.errors import UserError
from mergekit_math.eval import cache
from mergekit_math.eval.backend import Backend, VllmSettings, check_backend, make_lm, model_config
from mergekit_math.eval.gen_memory import batch_guard, check_context
from mergekit_math.eval.noise import library_output
from mergekit_math.eval.progress import request_progress
from mergekit_math.eval.sample_scores import (
    format_breakdown,
    record_tasks,
    sampling_gen_kwargs,
    summarize,
)
from mergekit_math.eval.tasks import LOCAL_TASKS, TaskSelection, select_tasks
from mergekit_math.io.fingerprint import model_fingerprint

# lm-eval's result dictionaries that are keyed by task name.
PER_TASK = ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


class EvalOptions(BaseModel):
    """How to evaluate; the same options drive `mmath eval`, the push gate and sweeps."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(description="Task names, task YAML files or folders of them.")
    data: Path | None = Field(
        None, description="JSONL for the shipped tasks (GSM8K, MATH or AIME format)."
    )
    device: str = "cpu"
    dtype: str = Field("auto", description="auto, float32, bfloat16 or float16.")
    batch_size: int | str = 8
    limit: int | float | None = Field(None, description="First N problems (or a fraction <1).")
    num_fewshot: int | None = None
    apply_chat_template: bool = False
    gen_kwargs: dict[str, Any] = Field(default_factory=dict)
    samples: int = Field(1, ge=1, description="Generations per problem (avg@K, pass@k, maj@K).")
    seed: int | None = None
    online: bool = False
    use_cache: bool = True
    verbose: bool = Field(False, description="Show the libraries' own messages and bars.")
    backend: Backend = Field("hf", description="hf (transformers) or vllm (a CUDA GPU).")
    vllm: VllmSettings = Field(default_factory=VllmSettings, description="vLLM's settings.")


@dataclass
class EvalReport:
    model: Path
    fingerprint: str
    tasks: list[str]
    data: dict[str, dict] = field(default_factory=lambda: {k: {} for k in PER_TASK})
    group_subtasks: dict[str, list[str]] = field(default_factory=dict)
    lengths: dict[str, dict] = field(default_factory=dict)
    breakdown: dict[str, dict] = field(default_factory=dict)
    samples: dict[str, list] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def results(self) -> dict[str, dict]:
        return self.data["results"]


def parse_gen_kwargs(text: str | None) -> dict[str, Any]:
    """``k=v,k=v`` with ints, floats and true/false converted (lm-eval's syntax)."""
    out: dict[str, Any] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--gen-kwargs: expected key=value, got {part.strip()!r}")
        out[key.strip()] = _scalar(value.strip())
    return out


def _scalar(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_limit(text: str | None) -> int | float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--limit: expected a number, got {text!r}") from None
    if value <= 0:
        raise UserError("--limit: must be positive")
    return int(value) if value >= 1 and value == int(value) else value


@contextlib.contextmanager
def offline(online: bool) -> Iterator[None]:
    """The Hub and datasets offline for the duration (unless ``online``), also when they are
    already imported; restored afterwards, so a push after an evaluation can reach the Hub."""
    if online:
        yield
        return
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    patched: list[tuple[Any, str, Any]] = []
    os.environ.update({k: "1" for k in env})
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hub_constants

        patched.append((hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE))
    if "datasets" in sys.modules:
        import datasets.config

        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(datasets.config, name):
                patched.append((datasets.config, name, getattr(datasets.config, name)))
    for module, name, _ in patched:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in patched:
            setattr(module, name, value)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def evaluate(
    model_dir: Path | str, options: EvalOptions, verbose: bool = False, *, in_memory: Any = None
) -> EvalReport:
    """Evaluate ``model_dir`` on ``options.tasks``; cached tasks are not run again. The
    libraries' own output is kept out unless ``verbose`` (or ``options.verbose``); progress
    (what runs, how many samples, a bar per sample) goes to stderr.

    ``in_memory`` (a :class:`~mergekit_math.merge.in_memory.InMemoryModel`: model, tokenizer
    and fingerprint) is evaluated instead of loading ``model_dir``, which then only names it
    and may not exist."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    gen_kwargs = sampling_gen_kwargs(options.samples, options.gen_kwargs)
    options = options.model_copy(update={"gen_kwargs": gen_kwargs})
    if in_memory is None and not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a model folder (no config.json)")
    check_backend(options.backend)
    if options.device.startswith("cuda") and options.backend == "hf":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here")
    fingerprint = in_memory.fingerprint if in_memory else model_fingerprint(model_dir)
    report = EvalReport(model_dir.absolute(), fingerprint, [])
    with (
        library_output(verbose or options.verbose),
        offline(options.online),
        tempfile.TemporaryDirectory(prefix="mmath-eval-") as work,
    ):
        sel = select_tasks(options.tasks, options.data, Path(work))
        report.tasks = sel.names
        manager = _task_manager(sel)
        loaded = record_tasks(manager, options.samples)
        keys = {name: _key(name, manager, sel, options, fingerprint) for name in sel.names}
        entries: dict[str, dict] = {}
        for name, key in keys.items():
            entry = cache.load(key) if options.use_cache else None
            if entry is not None:
                entries[name] = entry
                report.cached[name] = True
        todo = [n for n in sel.names if n not in entries]
        if todo:
            fresh = _run(model_dir, todo, manager, options, loaded, in_memory)
            for name in todo:
                entries[name] = fresh[name]
                report.cached[name] = False
                cache.store(keys[name], fresh[name])
    for name in sel.names:
        _merge(report, entries[name])
    report.meta.setdefault("mmath_version", __version__)
    if sel.data is not None:
        report.meta["data"] = str(sel.data)
    report.seconds = time.perf_counter() - started
    return report


def _task_manager(sel: TaskSelection) -> Any:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=sel.include or None, include_defaults=bool(sel.builtin))
    known = set(manager.all_tasks)
    for name in sel.names:
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, sorted(known | set(LOCAL_TASKS)), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"--tasks: unknown task {name!r}{hint}")
    return manager


def _key(name: str, manager: Any, sel: TaskSelection, options: EvalOptions, fp: str) -> str:
    try:
        leaves = manager.load([name])["tasks"]
    except Exception as e:  # datasets raises many kinds; the message says which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if name in sel.builtin and not options.online:
            raise UserError(
                f"task {name!r} could not load its dataset offline ({first}). Built-in lm-eval "
                "tasks read their data from the Hugging Face Hub: add --online, or use "
                "gsm8k_local / gsm8k_cot_local with --data FILE"
            ) from None
        raise UserError(f"task {name!r} failed to load: {first}") from None
    configs = [_stable_config(leaves[n].dump_config()) for n in sorted(leaves)]
    return cache.entry_key(
        {
            "model": fp,
            "task": name,
            "config": cache.config_hash(configs),
            "limit": options.limit,
            "num_fewshot": options.num_fewshot,
            "gen_kwargs": options.gen_kwargs,
            "chat_template": options.apply_chat_template,
            "seed": options.seed,
            "dtype": options.dtype,
            **({"samples": options.samples} if options.samples != 1 else {}),
            **_backend_key(options),
        }
    )


def _backend_key(options: EvalOptions) -> dict[str, Any]:
    """The backend in the cache key (absent for hf, so earlier entries stay valid). vLLM's
    context length changes what is truncated; its other settings only where it runs."""
    if options.backend == "hf":
        return {}
    return {"backend": options.backend, "max_model_len": options.vllm.max_model_len}


def _stable_config(config: dict) -> dict:
    """The config without where its YAML happened to be read from."""
    config = dict(config)
    meta = config.get("metadata")
    if isinstance(meta, dict):
        config["metadata"] = {k: v for k, v in meta.items() if k != "config_source"}
    return config


def _run(
    model_dir: Path,
    names: list[str],
    manager: Any,
    options: EvalOptions,
    loaded: dict[str, Any],
    in_memory: Any = None,
) -> dict[str, dict]:
    import lm_eval

    lm = make_lm(model_dir, options, in_memory)
    check_context(loaded, options.gen_kwargs, lm.max_length)
    seeds = {}
    if options.seed is not None:
        seeds = {
            k: options.seed
            for k in (
                "random_seed",
                "numpy_random_seed",
                "torch_random_seed",
                "fewshot_random_seed",
            )
        }
    # lm-eval records the git commit of the current directory, whatever repo that is, and
    # prints git's complaint when it is none; a merged model has no commit to record.
    with (
        mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None),
        batch_guard(lm, options.device),
        request_progress(lm, options.batch_size, options.device),
    ):
        out = _simple_evaluate(lm_eval, lm, names, manager, options, seeds)
    if out is None:
        raise UserError("lm-eval returned no results")
    meta = {
        "lm_eval_version": out.get("lm_eval_version"),
        "transformers_version": out.get("transformers_version"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": options.device,
        "batch_size": options.batch_size,
        "backend": options.backend,
    }
    groups = out.get("group_subtasks", {})
    entries = {}
    for name in names:
        members = _members(name, groups)
        entry: dict[str, Any] = {k: {} for k in PER_TASK}
        for k in PER_TASK:
            for m in members:
                if m in out.get(k, {}):
                    entry[k][m] = out[k][m]
        entry["group_subtasks"] = {m: groups[m] for m in members if m in groups}
        entry["samples"] = {m: out["samples"][m] for m in members if m in out.get("samples", {})}
        entry["lengths"], entry["breakdown"] = {}, {}
        for m, rows in entry["samples"].items():
            if entry["configs"].get(m, {}).get("output_type") == "generate_until":
                entry["lengths"][m] = count_generated_tokens(rows, lm.tokenizer)
                more, entry["breakdown"][m] = summarize(rows, loaded.get(m), options.samples)
                entry["results"].setdefault(m, {}).update(more)
        entry["meta"] = meta
        entries[name] = json.loads(json.dumps(entry, default=cache.to_json))
    return entries


def _simple_evaluate(
    lm_eval: Any, lm: Any, names: list[str], manager: Any, options: EvalOptions, seeds: dict
) -> Any:
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        task_manager=manager,
        num_fewshot=options.num_fewshot,
        limit=options.limit,
        gen_kwargs=options.gen_kwargs or None,
        apply_chat_template=options.apply_chat_template,
        log_samples=True,
        **seeds,
    )


def _members(name: str, groups: dict[str, list[str]]) -> list[str]:
    out = [name]
    for sub in groups.get(name, []):
        for m in _members(sub, groups):
            if m not in out:
                out.append(m)
    return out


def count_generated_tokens(samples: list[dict], tokenizer: Any) -> dict[str, float]:
    """Tokens generated per sample, by re-tokenising each stored response with the model's
    tokenizer (no special tokens). lm-eval stores the text cut at the first stop string, so
    the stop string and anything after it are not counted. Each sample gets ``gen_tokens``;
    returns n/mean/median/p90/max over the problems."""
    per_doc: dict[Any, list[int]] = {}
    for s in samples:
        doc = s.get("doc_id")
        if doc not in per_doc:
            texts = [
                t for req in s.get("resps", []) for t in (req if isinstance(req, list) else [req])
            ]
            per_doc[doc] = [
                len(tokenizer(t, add_special_tokens=False)["input_ids"])
                for t in texts
                if isinstance(t, str)
            ]
        counts = per_doc[doc]
        s["gen_tokens"] = counts[0] if len(counts) == 1 else counts
    values = [c for counts in per_doc.values() for c in counts]
    return length_stats(values)


def length_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "p90": p90,
        "max": ordered[-1],
    }


def _merge(report: EvalReport, entry: dict) -> None:
    for k in PER_TASK:
        report.data[k].update(entry.get(k, {}))
    report.group_subtasks.update(entry.get("group_subtasks", {}))
    report.lengths.update(entry.get("lengths", {}))
    report.breakdown.update({k: v for k, v in entry.get("breakdown", {}).items() if v})
    report.samples.update(entry.get("samples", {}))
    for k, v in entry.get("meta", {}).items():
        report.meta.setdefault(k, v)


# ----------------------------------------------------------------------------- output


def _ordered_tasks(report: EvalReport) -> list[str]:
    out: list[str] = []
    for name in report.tasks:
        for m in _members(name, report.group_subtasks):
            if m not in out:
                out.append(m)
    return out


def format_table(report: EvalReport) -> str:
    header = ["task", "filter", "n-shot", "metric", "value", "± stderr", "tokens mean/median/p90"]
    from mergekit_math.hub.card import rows_from_lm_eval

    rows = [
        row
        for task in _ordered_tasks(report)
        for row in rows_from_lm_eval({task: report.results.get(task, {})}, report.data["n-shot"])
    ]
    lines = []
    shown: set[str] = set()
    for row in rows:
        task = row["task"]
        lengths = ""
        if task not in shown and task in report.lengths and report.lengths[task].get("n"):
            s = report.lengths[task]
            lengths = f"{s['mean']:.1f} / {s['median']:g} / {s['p90']:g}"
        value = row["value"]
        lines.append(
            [
                task if task not in shown else "",
                row["filter"] or "none",
                "" if row["num_fewshot"] is None else str(row["num_fewshot"]),
                row["metric"],
                f"{value:.4f}",
                "" if row["stderr"] is None else f"{row['stderr']:.4f}",
                lengths,
            ]
        )
        shown.add(task)
    widths = [
        max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(header)
    ]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
    return "\n".join(out) + format_breakdown(report.breakdown)


def results_document(report: EvalReport, options: EvalOptions) -> dict[str, Any]:
    """``results.json``: lm-eval's dictionaries plus what mmath knows about the run."""
    doc: dict[str, Any] = {k: report.data[k] for k in PER_TASK}
    doc["group_subtasks"] = report.group_subtasks
    model, model_args = model_config(report.model, options)
    doc["config"] = {
        "model": model,
        "model_args": model_args,
        "device": options.device,
        "dtype": options.dtype,
        "batch_size": options.batch_size,
        "limit": options.limit,
        "num_fewshot": options.num_fewshot,
        "gen_kwargs": options.gen_kwargs,
        "samples": options.samples,
        "apply_chat_template": options.apply_chat_template,
        "seed": options.seed,
    }
    for k in ("lm_eval_version", "transformers_version", "date"):
        if k in report.meta:
            doc[k] = report.meta[k]
    doc["mmath"] = {
        "version": __version__,
        "model": str(report.model),
        "fingerprint": report.fingerprint,
        "tasks": report.tasks,
        "data": report.meta.get("data"),
        "cot_lengths": report.lengths,
        "cot_length_method": "generated text re-tokenised with the model's tokenizer, "
        "without special tokens; text after the first stop string is not counted",
        "breakdown": report.breakdown,
        "cached": report.cached,
        "seconds": round(report.seconds, 2),
    }
    return doc


def write_output(report: EvalReport, options: EvalOptions, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = results_document(report, options)
    _write_atomic(out_dir / "results.json", json.dumps(doc, indent=2, default=cache.to_json) + "\n")
    for task, rows in report.samples.items():
        text = "".join(json.dumps(r, default=cache.to_json) + "\n" for r in rows)
        _write_atomic(out_dir / cache.samples_file(task), text)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

"""Evaluation output and UL2R training memory (issue 13).

- The libraries' own output during an evaluation (datasets' "Generating test split" bars,
  transformers' "Loading weights" bar, lm-eval's log records and warnings) is not mmath's: it
  is kept out unless --verbose.
- An evaluation says what it runs, on how many samples, and moves a bar per sample.
- UL2R training computes its loss in chunks of the sequence, equal to the plain loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import mmath
from tiny_math import new_model

from mergekit_math.data.gsm_symbolic import generate, write_jsonl

# What the libraries print when they are let through (checked with --verbose below).
NOISE = ("Generating test split", "Loading weights", "INFO [lm_eval", "generation_kwargs")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval-noise") / "model"
    new_model(folder, seed=1).save_pretrained(folder)
    return folder


@pytest.fixture
def fresh_datasets(tmp_path, monkeypatch):
    """datasets' cache in tmp_path, so the data file is prepared (and its bars drawn) anew."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setenv("MMATH_CACHE_DIR", str(tmp_path / "cache"))


def _eval(model: Path, tmp_path: Path, capfd, *extra: str) -> tuple[int, str]:
    data = tmp_path / "problems.jsonl"
    write_jsonl(generate(3, seed=5), data)
    result = mmath(
        "eval",
        model,
        "--tasks",
        "gsm8k_cot_local",
        "--data",
        data,
        "--num-fewshot",
        "0",
        "--gen-kwargs",
        "max_gen_toks=4",
        "--batch-size",
        "2",
        *extra,
    )
    captured = capfd.readouterr()
    return result.exit_code, result.output + captured.out + captured.err


def test_eval_keeps_library_output_out(tmp_path, tiny_model, fresh_datasets, capfd):
    code, text = _eval(tiny_model, tmp_path, capfd)
    assert code == 0, text
    for noise in NOISE:
        assert noise not in text, f"{noise!r} printed without --verbose:\n{text}"
    assert "exact_match" in text  # the table is still there


def test_eval_verbose_shows_library_output(tmp_path, tiny_model, fresh_datasets, capfd):
    code, text = _eval(tiny_model, tmp_path, capfd, "--verbose")
    assert code == 0, text
    for noise in NOISE:
        assert noise in text, f"{noise!r} not printed with --verbose:\n{text}"


def test_eval_says_what_runs_and_counts_samples(tmp_path, tiny_model, fresh_datasets, capfd):
    code, text = _eval(tiny_model, tmp_path, capfd)
    assert code == 0, text
    assert "evaluating gsm8k_cot_local: 3 samples, batch 2, on cpu" in text
    # Not a terminal: the bar prints plain lines, the last one at 3 of 3 samples.
    assert "generate_until: 100% 3/3" in text
    assert "sample/s" in text
    assert "\r" not in text


def test_request_progress_ticks_per_request_and_tokens(monkeypatch):
    """The bar advances once per finished request, and a generating batch counts its tokens
    (one forward pass = one token)."""
    import io

    from mergekit_math.eval import progress as eval_progress

    class Request:
        def __init__(self, doc: int):
            self.task_name, self.doc_id = "t", doc

    class Hook:
        def add_partial(self, attr, req, res):
            pass

    class FakeLM:
        def __init__(self):
            import torch

            self.cache_hook = Hook()
            self.model = torch.nn.Linear(1, 1)

        def _model_generate(self, context, max_length, stop, **kwargs):
            import torch

            for _ in range(max_length - context.shape[1]):
                self.model(torch.zeros(1, 1))
            return context

        def generate_until(self, requests, disable_tqdm=False):
            import torch

            assert disable_tqdm  # lm-eval's own per-batch bar is off
            out = []
            for start in range(0, len(requests), 2):
                chunk = requests[start : start + 2]
                self._model_generate(torch.zeros(len(chunk), 3), 3 + 5, [])
                for r in chunk:
                    self.cache_hook.add_partial("generate_until", r, "x")
                    out.append("x")
            return out

    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    monkeypatch.setattr(eval_progress, "POSTFIX_INTERVAL", 0.0)
    lm = FakeLM()
    steps: list[str] = []
    original_step = eval_progress._Bar.step

    def step(self, *args):
        original_step(self, *args)
        steps.append(f"{self.tokens}/{self.max_new}")

    monkeypatch.setattr(eval_progress._Bar, "step", step)
    with eval_progress.request_progress(lm, 2, "cpu"):
        assert lm.generate_until([Request(i) for i in range(5)]) == ["x"] * 5
    assert "generate_until" not in lm.__dict__  # the wrapper is gone afterwards
    text = stderr.getvalue()
    assert text.splitlines()[0] == "evaluating t: 5 samples, batch 2, on cpu"
    assert "5/5" in text
    assert steps[:5] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    assert len(steps) == 15  # 3 batches of 5 new tokens


def test_describe_names_requests_when_several_per_sample():
    from mergekit_math.eval.progress import describe

    class Request:
        def __init__(self, task: str, doc: int):
            self.task_name, self.doc_id = task, doc

    reqs = [Request("arc", d) for d in range(4) for _ in range(4)] + [Request("piqa", 0)]
    assert describe(reqs, "loglikelihood", "auto", "cuda") == (
        "evaluating arc, piqa: 5 samples (17 loglikelihood requests), batch auto, on cuda"
    )


# ----------------------------------------------------------------------------- UL2R memory


@pytest.fixture(scope="module")
def ul2r_corpus(tmp_path_factory) -> Path:
    import json

    path = tmp_path_factory.mktemp("ul2r-data") / "problems.jsonl"
    lines = [json.dumps({"text": f"{p.question}\n{p.answer}"}) for p in generate(60, seed=0)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def ul2r_base(tmp_path_factory) -> Path:
    from conftest import make_model

    return make_model(tmp_path_factory.mktemp("ul2r-model") / "base", layers=2, seed=0)


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ul2r_config(model: Path, corpus: Path, **overrides):
    from mergekit_math.ul2r.presets import build_config

    values = {
        "training.sequence_length": 64,
        "training.batch_size": 4,
        "training.steps": 4,
        "training.learning_rate": 3e-3,
        "training.warmup_steps": 1,
        "eval.interval": 2,
        "eval.batches": 1,
        "eval.holdout_documents": 8,
        "save.interval": 0,
    }
    values.update(overrides)
    return build_config(str(model), "ul2r", data=[str(corpus)], overrides=values)


def _batch(seed: int = 0):
    """Four rows of random tokens: prefixes of several lengths, targets, padding."""
    import random

    from mergekit_math.ul2r.batch import collate
    from mergekit_math.ul2r.denoise import Example

    rng = random.Random(seed)
    examples = []
    for prefix, target in ((5, 9), (1, 30), (12, 4), (7, 20)):
        examples.append(
            Example(
                [rng.randrange(4, 96) for _ in range(prefix)],
                [rng.randrange(4, 96) for _ in range(target)],
                denoiser=0,
            )
        )
    return collate(examples, 40, pad_id=0)


@pytest.mark.parametrize("attention", ["prefix_lm", "causal"])
def test_chunked_loss_equals_the_plain_loss(ul2r_base, monkeypatch, attention, one_thread):
    """Loss and gradients from chunks of target tokens are those of the full logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergekit_math.ul2r import loss
    from mergekit_math.ul2r.batch import model_inputs

    model = AutoModelForCausalLM.from_pretrained(ul2r_base, dtype=torch.float32)
    assert loss.probe_chunked_loss(model) == (True, "chunked")
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 96 * 7)  # 7 tokens per chunk: many chunks
    batch = _batch()
    inputs = model_inputs(batch, attention, "bool", torch.float32)
    results = {}
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        losses = loss.token_losses(model, batch, inputs, chunked=chunked)
        (losses.sum() / batch.target_tokens).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[chunked] = (losses.detach(), grads)
    plain, chunked = results[False], results[True]
    assert plain[0].shape == chunked[0].shape == (4, 39)
    assert torch.equal(plain[0] == 0, chunked[0] == 0)  # zero exactly where no target
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-6, atol=1e-6)
    for name, grad in plain[1].items():
        torch.testing.assert_close(chunked[1][name], grad, rtol=1e-5, atol=1e-7)


def test_probe_refuses_models_whose_logits_are_not_the_output_layer(ul2r_base):
    import types

    import torch
    from transformers import AutoModelForCausalLM

    from mergekit_math.ul2r.loss import probe_chunked_loss

    model = AutoModelForCausalLM.from_pretrained(ul2r_base, dtype=torch.float32)
    forward = model.forward
    # Soft-capped logits (as Gemma 2 has): lm_head(hidden) is not what the model returns.
    model.forward = lambda **kw: types.SimpleNamespace(
        logits=30 * torch.tanh(forward(**kw).logits / 30)
    )
    ok, reason = probe_chunked_loss(model)
    assert not ok and "not the output layer" in reason


def test_training_never_makes_the_full_vocabulary_logits(
    tmp_path, ul2r_base, ul2r_corpus, monkeypatch, one_thread
):
    """Training and its evaluations run the output layer on one chunk of target positions at
    a time, never the model's full forward over all B × T positions of a micro-batch (which
    is what made SmolLM2-135M training take gigabytes)."""
    from transformers import LlamaForCausalLM

    from mergekit_math.ul2r import loss
    from mergekit_math.ul2r.train import train

    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 96 * 16)  # 16 target tokens per chunk
    rows: list[int] = []
    chunk_ce = loss._chunk_ce
    monkeypatch.setattr(
        loss, "_chunk_ce", lambda h, y, head: rows.append(h.shape[0]) or chunk_ce(h, y, head)
    )
    probe = loss.probe_chunked_loss
    probed: list[bool] = []

    def no_full_forward(self, *args, **kwargs):
        raise AssertionError("the model's full forward (all logits) ran during training")

    def probe_then_forbid(model):
        """The probes run the full forward; after them, nothing may."""
        ok, reason = probe(model)
        probed.append(ok)
        monkeypatch.setattr(LlamaForCausalLM, "forward", no_full_forward)
        return ok, reason

    monkeypatch.setattr("mergekit_math.ul2r.train.probe_chunked_loss", probe_then_forbid)
    result = train(
        _ul2r_config(ul2r_base, ul2r_corpus), tmp_path / "out", progress=False, echo=print
    )
    assert probed == [True] and result.step == 4 and result.attention == "prefix_lm"
    assert [r for r in result.history if "eval_loss" in r]  # evaluations ran too
    assert rows and max(rows) <= 16


def test_gradient_checkpointing_gives_the_same_weights_and_may_change_on_resume(
    tmp_path, ul2r_base, ul2r_corpus, one_thread
):
    """training.gradient_checkpointing trades compute for memory only: same weights, and a
    run may be resumed with it switched (e.g. after running out of memory)."""
    import torch
    from conftest import load_dir

    from mergekit_math.ul2r.train import train

    plain = _ul2r_config(ul2r_base, ul2r_corpus)
    saving = _ul2r_config(ul2r_base, ul2r_corpus, **{"training.gradient_checkpointing": True})
    a = train(plain, tmp_path / "a", progress=False, echo=lambda m: None)
    train(plain, tmp_path / "b", stop_after=2, progress=False, echo=lambda m: None)
    b = train(saving, tmp_path / "b", resume=True, progress=False, echo=lambda m: None)
    c = train(saving, tmp_path / "c", progress=False, echo=lambda m: None)
    wa, wb, wc = load_dir(a.final), load_dir(b.final), load_dir(c.final)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
        assert torch.equal(wa[name], wc[name]), name
    assert [r.get("loss") for r in a.history] == [r.get("loss") for r in c.history]


def test_train_help_states_the_expected_memory():
    from typer.testing import CliRunner

    from mergekit_math.cli.ul2r import ul2r_app

    text = " ".join(CliRunner().invoke(ul2r_app, ["train", "--help"]).output.split())
    assert "16 bytes per parameter" in text
    assert "training.gradient_checkpointing: true" in text


# ----------------------------------------------------------------------------- --verbose


EVAL_COMMANDS = (["eval"], ["push"], ["merge"], ["valve", "sweep"], ["sweep", "run"])


@pytest.mark.parametrize("command", EVAL_COMMANDS, ids=lambda c: " ".join(c))
def test_every_evaluating_command_has_verbose(command):
    result = mmath(*command, "--help")
    assert result.exit_code == 0 and "--verbose" in result.output


@pytest.fixture
def verbose_seen(monkeypatch) -> list[bool]:
    """What each evaluation was asked for; the evaluation then stops with a UserError."""
    import contextlib

    from mergekit_math.errors import UserError

    seen: list[bool] = []

    @contextlib.contextmanager
    def recorder(verbose: bool):
        seen.append(verbose)
        raise UserError("stopped by the test")
        yield  # pragma: no cover

    monkeypatch.setattr("mergekit_math.eval.run.library_output", recorder)
    return seen


def test_verbose_reaches_the_evaluation_of_each_command(
    tmp_path, tiny_model, verbose_seen, monkeypatch
):
    from conftest import write_recipe

    monkeypatch.setenv("MMATH_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "problems.jsonl"
    write_jsonl(generate(3, seed=5), data)
    flags = ["--tasks", "gsm8k_local", "--data", str(data)]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {tiny_model}\n"
        "    parameters: {weight: 1.0}\n",
    )
    runs = {
        "eval": ["eval", tiny_model, *flags],
        "push": ["push", tiny_model, "me/tiny", *flags, "--require", "gsm8k_local:acc>=0"],
        "merge": ["merge", recipe, tmp_path / "merged", "-q", "--force", "--eval", *flags],
    }
    for name, args in runs.items():
        for verbose in (False, True):
            verbose_seen.clear()
            result = mmath(*args, *(["--verbose"] if verbose else []))
            assert "stopped by the test" in result.output, (name, result.output)
            assert verbose_seen == [verbose], (name, verbose)


def test_verbose_travels_with_the_options_to_sweep_workers():
    from mergekit_math.eval.options import eval_options
    from mergekit_math.eval.run import EvalOptions

    options = eval_options(
        "gsm8k_local",
        None,
        "cpu",
        "auto",
        "8",
        None,
        None,
        False,
        None,
        None,
        False,
        False,
        verbose=True,
    )
    assert EvalOptions(**options.model_dump(mode="json")).verbose is True


def test_cache_entries_keep_sample_files_inside_their_folder(tmp_path, monkeypatch) -> None:
    """A task name that looks like a path (from a task YAML, or a tampered entry.json) never
    makes the cache read or write outside the entry's folder."""
    from mergekit_math.eval import cache

    monkeypatch.setenv("MMATH_CACHE_DIR", str(tmp_path / "cache"))
    outside = tmp_path / "cache" / "samples_secret.jsonl"
    outside.parent.mkdir(parents=True)
    outside.write_text('{"stolen": true}\n')
    rows = [{"doc_id": 0}]
    cache.store("k1", {"results": {}, "samples": {"../samples_secret": rows, "plain": rows}})
    entry_dir = tmp_path / "cache" / "eval" / "k1"
    assert outside.read_text() == '{"stolen": true}\n'  # not overwritten
    assert (entry_dir / "samples_plain.jsonl").is_file()
    assert all(p.parent == entry_dir for p in entry_dir.rglob("*"))
    assert cache.load("k1")["samples"] == {"../samples_secret": rows, "plain": rows}

    # tampered entry: names pointing out of the folder, or not names at all, are a miss
    entry = entry_dir / "entry.json"
    for tasks in (["../../samples_secret"], [{"a": 1}], "plain"):
        entry.write_text(json.dumps({"results": {}, "sample_tasks": tasks}))
        assert cache.load("k1") is None

"""Evaluation output and UL2R training memory (issue 13).

- The libraries' own output during an evaluation (datasets' "Generating test split" bars,
  transformers' "Loading weights" bar, lm-eval's log records and warnings) is not mmath's: it
  is kept out unless --verbose.
- An evaluation says what it runs, on how many samples, and moves a bar per sample.
- UL2R training computes its loss in chunks of the sequence, equal to the plain loss.
"""

from __future__ import annotations

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

"""`--backend vllm`: the option's checks, the arguments mmath gives lm-eval's vLLM model, and
(on a CUDA machine with vllm) a real evaluation against HF's.

Without vllm, the model behind lm-eval's "vllm" name is replaced by a recorder: an HFLM on
CPU that keeps the constructor arguments and every request's generation settings, so the
evaluation runs end to end and its scores can be compared with the HF backend's.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from typing import Any

import pytest
from conftest import mmath

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMATH_CACHE_DIR", str(tmp_path / "cache"))


def eval_args(m: dict, *extra: object) -> list:
    base = ["eval", m["trained"], "--tasks", "gsm8k_local", "--data", m["data"]]
    return [*base, "--num-fewshot", "0", *extra]


# ----------------------------------------------------------------------------- checks


@pytest.mark.skipif(HAS_VLLM, reason="checks the message where vllm is missing")
def test_vllm_missing_is_one_clear_error_before_any_work(math_models, tmp_path):
    res = mmath(*eval_args(math_models, "--backend", "vllm", "-o", tmp_path / "out"))
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --backend vllm:"), res.output
    assert "pip install 'mergekit-math[vllm]'" in lines[0]
    import torch

    if not torch.cuda.is_available():
        assert "CUDA GPU" in lines[0]
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache").exists()  # nothing evaluated, nothing cached

    # sweep takes it as --eval-backend (its --backend is local|ray): refused before planning
    res = mmath(
        "sweep",
        tmp_path / "none.yaml",
        "--set",
        "seed=1",
        "--tasks",
        "gsm8k_local",
        "--eval-backend",
        "vllm",
        "-o",
        tmp_path / "sweep",
    )
    assert res.exit_code == 2 and "--eval-backend vllm:" in res.output, res.output


def test_backend_options_are_validated(math_models):
    cases = [
        (["--backend", "tgi"], "--backend: expected hf or vllm, got 'tgi'"),
        (["--vllm-args", "max_model_len=64"], "--vllm-args: only for --backend vllm"),
    ]
    for extra, message in cases:
        res = mmath(*eval_args(math_models, *extra))
        assert res.exit_code == 2, (extra, res.output)
        assert message in res.output, (extra, res.output)


def test_vllm_args_parsed_with_the_flag_in_messages():
    from mergekit_math.errors import UserError
    from mergekit_math.eval.backend import parse_vllm_args

    s = parse_vllm_args({"max_model_len": 4096, "tensor_parallel_size": 2})
    assert (s.max_model_len, s.tensor_parallel_size, s.gpu_memory_utilization) == (4096, 2, 0.9)
    with pytest.raises(UserError, match="--vllm-args: max_len: unknown key"):
        parse_vllm_args({"max_len": 10})
    with pytest.raises(UserError, match="--vllm-args: gpu_memory_utilization: "):
        parse_vllm_args({"gpu_memory_utilization": 1.5})


# ----------------------------------------------------------------------------- fake vllm


class Recorder:
    """What the stand-in vLLM model was built with and asked for."""

    built: list[dict[str, Any]] = []
    requests: list[dict[str, Any]] = []


def stub_vllm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class StubVLLM(HFLM):
        def __init__(self, **kwargs: Any) -> None:
            Recorder.built.append(dict(kwargs))
            super().__init__(
                pretrained=kwargs["pretrained"],
                device="cpu",
                dtype=kwargs["dtype"],
                batch_size=4,
                max_length=kwargs.get("max_model_len"),
            )

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            Recorder.requests.extend(dict(r.args[1]) for r in requests)
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    return StubVLLM


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` module that find_spec sees, a CUDA device, and the recorder behind lm-eval's
    "vllm" model name."""
    import lm_eval.models  # noqa: F401  (registers the lazy model names)
    import torch
    from lm_eval.api.registry import model_registry

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(model_registry._objs, "vllm", stub_vllm_class())
    Recorder.built, Recorder.requests = [], []
    return Recorder


def test_fake_vllm_without_cuda_names_only_the_gpu(fake_vllm, monkeypatch, math_models):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = mmath(*eval_args(math_models, "--backend", "vllm"))
    assert res.exit_code == 2
    assert "no CUDA device is available here (vLLM needs a CUDA GPU)" in res.output
    assert "pip install" not in res.output
    assert fake_vllm.built == []


def test_vllm_gets_the_model_args_and_gen_kwargs(fake_vllm, math_models, tmp_path):
    m = math_models
    common = ["--gen-kwargs", "max_gen_toks=12", "--dtype", "float32", "--seed", "5"]
    res = mmath(
        *eval_args(m, *common, "--backend", "vllm", "--vllm-args", "max_model_len=256"),
        "-o",
        tmp_path / "vllm",
    )
    assert res.exit_code == 0, res.output
    assert fake_vllm.built == [
        {
            "pretrained": str(m["trained"]),
            "dtype": "float32",
            "seed": 5,
            "batch_size": "auto",
            "tensor_parallel_size": 1,
            "gpu_memory_utilization": 0.9,
            "max_model_len": 256,
            "max_gen_toks": 12,
        }
    ]
    assert len(fake_vllm.requests) == 5
    for kwargs in fake_vllm.requests:
        assert kwargs["max_gen_toks"] == 12 and kwargs["until"]
        assert kwargs.get("do_sample") is False and kwargs.get("temperature", 0.0) == 0.0
    doc = json.loads((tmp_path / "vllm" / "results.json").read_text())
    assert doc["config"]["model"] == "vllm"
    assert "max_model_len=256" in doc["config"]["model_args"]

    # the same evaluation with hf is not served from vllm's cache entry, and agrees with it
    res = mmath(*eval_args(m, *common), "-o", tmp_path / "hf")
    assert res.exit_code == 0 and "from cache" not in res.output, res.output
    hf = json.loads((tmp_path / "hf" / "results.json").read_text())
    assert doc["results"]["gsm8k_local"]["exact_match,strict-match"] == 1.0
    assert hf["results"] == doc["results"]
    # ...while vllm again is
    res = mmath(*eval_args(m, *common, "--backend", "vllm", "--vllm-args", "max_model_len=256"))
    assert res.exit_code == 0 and "from cache: gsm8k_local" in res.output, res.output
    assert len(fake_vllm.built) == 1


def test_vllm_samples_send_the_sampling_settings(fake_vllm, math_models):
    gen = "temperature=0.7,top_p=0.9,max_gen_toks=6"
    args = ["--gen-kwargs", gen, "--samples", "3", "--seed", "1", "--backend", "vllm"]
    res = mmath(*eval_args(math_models, *args))
    assert res.exit_code == 0, res.output
    assert "avg@3" in res.output
    (built,) = fake_vllm.built
    assert built["seed"] == 1 and "max_model_len" not in built
    # lm-eval's repeats: each of the 5 problems asked 3 times, each with the sampling settings
    assert len(fake_vllm.requests) == 15
    for kwargs in fake_vllm.requests:
        assert kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9
        assert kwargs["do_sample"] is True and kwargs["max_gen_toks"] == 6


def test_progress_leaves_a_vllm_style_generate_alone():
    """HFLM's _model_generate is wrapped for the progress bar; vLLM's, called with other
    arguments (prompts and SamplingParams), must keep working."""
    from mergekit_math.eval.progress import request_progress

    class Hook:
        def add_partial(self, attr: str, req: Any, res: Any) -> None:
            pass

    class VllmLike:
        cache_hook = Hook()

        def _model_generate(self, requests, generate=False, sampling_params=None):
            return [f"out {r}" for r in requests]

        def generate_until(self, requests, disable_tqdm=False):
            out = self._model_generate(requests=requests, generate=True, sampling_params=[])
            for r, o in zip(requests, out):
                self.cache_hook.add_partial("generate_until", r, o)
            return out

    lm = VllmLike()
    with request_progress(lm, "auto", "cuda"):
        assert lm.generate_until([]) == []


# ----------------------------------------------------------------------------- real vllm


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM or not _cuda(), reason="needs vllm and a CUDA GPU")
def test_real_vllm_matches_hf_on_a_greedy_task(math_models, tmp_path):
    m = math_models
    common = ["--gen-kwargs", "max_gen_toks=12", "--dtype", "float32"]
    results = {}
    for backend in ("hf", "vllm"):
        extra = ["--device", "cuda"] if backend == "hf" else ["--vllm-args", "max_model_len=512"]
        out = tmp_path / backend
        res = mmath(*eval_args(m, *common, "--backend", backend, *extra), "-o", out)
        assert res.exit_code == 0, res.output
        results[backend] = json.loads((out / "results.json").read_text())["results"]
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert results["vllm"]["gsm8k_local"][key] == results["hf"]["gsm8k_local"][key]
    assert results["vllm"]["gsm8k_local"]["exact_match,strict-match"] == 1.0

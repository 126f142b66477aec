"""The evaluation options shared by `mmath eval`, `push`, `merge --eval`, `valve sweep` and
`sweep`: one definition of each flag, and one function turning them into EvalOptions.

Only typer is imported here; the CLI modules import this at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mergekit_math.errors import UserError

if TYPE_CHECKING:
    from mergekit_math.eval.run import EvalOptions

TasksOption = Annotated[
    str | None,
    typer.Option(
        "--tasks",
        "-t",
        help="Comma-separated tasks: gsm8k_local, gsm8k_cot_local, math_local, aime_local "
        "(shipped, offline), any lm-eval task name, a task YAML file or a folder of them.",
    ),
]
DataOption = Annotated[
    Path | None,
    typer.Option(
        help="JSONL for the shipped tasks: GSM8K format for gsm8k_local/gsm8k_cot_local "
        "({question, answer} with '#### N'), MATH format for math_local ({problem, answer or "
        "solution with \\boxed{}, level, subject}), AIME for aime_local ({problem, answer "
        "0-999}); default: 200 generated gsm-symbolic / math-symbolic problems (seed 0).",
    ),
]
EvalDeviceOption = Annotated[str, typer.Option(help="cpu or cuda.")]
DtypeOption = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
BatchOption = Annotated[str, typer.Option(help="Batch size, or 'auto'.")]
LimitOption = Annotated[
    str | None, typer.Option(help="Evaluate the first N problems (or a fraction below 1).")
]
FewshotOption = Annotated[
    int | None, typer.Option(help="Few-shot examples (default: the task's own).")
]
ChatOption = Annotated[bool, typer.Option(help="Wrap prompts in the model's chat template.")]
GenKwargsOption = Annotated[
    str | None,
    typer.Option(help="Generation settings k=v,... e.g. max_gen_toks=256,temperature=0."),
]
SamplesOption = Annotated[
    int,
    typer.Option(
        "--samples",
        min=1,
        help="Generations per problem; above 1 needs --gen-kwargs temperature=T>0 and adds "
        "avg@K, pass@k (unbiased) and maj@K per task.",
    ),
]
EvalSeedOption = Annotated[int | None, typer.Option(help="Seed for sampling and few-shot.")]
OnlineOption = Annotated[
    bool,
    typer.Option(help="Allow the Hub (built-in lm-eval tasks need it); default: offline."),
]
NoCacheOption = Annotated[
    bool, typer.Option("--no-cache", help="Evaluate again even when a cached result exists.")
]
VerboseOption = Annotated[
    bool,
    typer.Option(
        "--verbose",
        help="Show what lm-eval, datasets and transformers print (their log messages, "
        "warnings and progress bars); default: mmath's own progress only.",
    ),
]

BackendOption = Annotated[
    str,
    typer.Option(
        "--backend",
        help="hf (transformers; CPU or CUDA) or vllm (vLLM on a CUDA GPU; pip install "
        "'mergekit-math[vllm]'). vllm ignores --device and --batch-size: it schedules its "
        "own batches on the GPUs in CUDA_VISIBLE_DEVICES.",
    ),
]
EvalBackendOption = Annotated[
    str, typer.Option("--eval-backend", help="Evaluation backend: hf or vllm (as --backend).")
]
VllmArgsOption = Annotated[
    str | None,
    typer.Option(
        "--vllm-args",
        help="vLLM engine settings k=v,...: tensor_parallel_size, gpu_memory_utilization "
        "(default 0.9), max_model_len (default: the model's context).",
    ),
]


def eval_options(
    tasks: str | None,
    data: Path | None,
    device: str,
    dtype: str,
    batch_size: str,
    limit: str | None,
    num_fewshot: int | None,
    apply_chat_template: bool,
    gen_kwargs: str | None,
    seed: int | None,
    online: bool,
    no_cache: bool,
    verbose: bool = False,
    samples: int = 1,
    backend: str = "hf",
    vllm_args: str | None = None,
    backend_flag: str = "--backend",
) -> EvalOptions:
    """EvalOptions from the flags' raw values (validated, UserError naming the flag). The
    backend is checked here, so ``--backend vllm`` without vLLM or a GPU stops before any
    merge or evaluation."""
    from mergekit_math.eval.backend import check_backend, parse_backend, parse_vllm_args
    from mergekit_math.eval.run import EvalOptions, parse_gen_kwargs, parse_limit
    from mergekit_math.eval.sample_scores import sampling_gen_kwargs
    from mergekit_math.eval.tasks import split_tasks

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device: expected cpu or cuda, got {device!r}")
    batch: int | str = batch_size
    if batch_size != "auto":
        try:
            batch = int(batch_size)
        except ValueError:
            raise UserError(
                f"--batch-size: expected a number or 'auto', got {batch_size!r}"
            ) from None
    chosen = parse_backend(backend, backend_flag)
    if vllm_args and chosen != "vllm":
        raise UserError(f"--vllm-args: only for {backend_flag} vllm")
    try:
        pairs = parse_gen_kwargs(vllm_args)
    except UserError as exc:
        raise UserError(str(exc).replace("--gen-kwargs", "--vllm-args", 1)) from None
    vllm = parse_vllm_args(pairs)
    check_backend(chosen, backend_flag)
    return EvalOptions(
        backend=chosen,
        vllm=vllm,
        tasks=split_tasks(tasks) if tasks else [],
        data=data,
        device=device,
        dtype=dtype,
        batch_size=batch,
        limit=parse_limit(limit),
        num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template,
        gen_kwargs=sampling_gen_kwargs(samples, parse_gen_kwargs(gen_kwargs)),
        samples=samples,
        seed=seed,
        online=online,
        use_cache=not no_cache,
        verbose=verbose,
    )


RequireOption = Annotated[
    list[str] | None,
    typer.Option(
        "--require",
        help="Bar to clear before publishing, repeatable: 'TASK:METRIC[,FILTER]>=VALUE' "
        "(>=, >, <=, <), e.g. 'gsm8k_cot_local:exact_match,flexible-extract>=0.40'.",
    ),
]

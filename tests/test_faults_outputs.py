"""Fault suite for what mmath writes and the values it takes: concurrent runs on one output,
``--force`` onto files and symlinks, unwritable or full outputs, non-finite parameters and
inputs, and progress output in logs.

Each fault ends in exit code 2 and exactly one ``error:`` line naming the path or the YAML
entry, with nothing written at OUT (not even a lock or a partial folder).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_dir, mmath, write_recipe

from mergekit_math.errors import UserError

# A merge slowed down to about 50 ms per tensor, run as a real process.
SLOW_MERGE = (
    "import time, mergekit_math.merge.execution as e\n"
    "real = e.compute_item\n"
    "def slow(*a, **k):\n    time.sleep(0.05)\n    return real(*a, **k)\n"
    "e.compute_item = slow\n"
    "from mergekit_math.cli import main\nmain()\n"
)


def assert_one_error(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not os.path.lexists(out)
    assert not list(out.parent.glob(f".{out.name}.mmath-*"))


def linear(tmp_path: Path, model: Path, weight: str = "1", name: str = "r.yaml") -> Path:
    return write_recipe(
        tmp_path / name,
        f"merge_method: linear\nmodels:\n  - model: {model}\n"
        f"    parameters: {{weight: {weight}}}\n",
    )


# =============================================================================== modules


def test_atomic_output_and_progress_live_in_io_without_the_engine():
    code = (
        "import sys\n"
        "from mergekit_math.io.atomic import atomic_output, clean_stale_partials, PARTIAL_MARK\n"
        "from mergekit_math.io.progress import byte_progress, progress\n"
        "import mergekit_math.patch.apply\n"
        "assert 'mergekit_math.merge' not in sys.modules, 'merge imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# =============================================================================== concurrent runs


def test_run_refused_while_another_holds_the_output_lock(tmp_path, zoo):
    from mergekit_math.io.atomic import output_lock

    out = tmp_path / "out"
    recipe = linear(tmp_path, zoo["a"])
    with output_lock(out.absolute()):
        res = mmath("merge", recipe, out, "-q")
        assert_one_error(res, str(out), "being written by another mmath run", f"pid {os.getpid()}")
        assert not out.exists()
        res = mmath("merge", recipe, out, "-q", "--force")  # --force does not break a lock
        assert_one_error(res, "being written by another mmath run")
    assert_nothing_written(out)
    assert mmath("merge", recipe, out, "-q").exit_code == 0  # released: the next run works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]


def test_two_real_merges_to_one_output_started_together(tmp_path, zoo):
    """The first run keeps its output; the second fails at once with one line."""
    from conftest import make_model

    slow_model = make_model(tmp_path / "m", layers=12)
    slow = linear(tmp_path, slow_model, name="slow.yaml")
    out = tmp_path / "out"
    # The second run imports everything first, then starts once the first is writing.
    second_script = (
        "import glob, sys, time, torch, mergekit_math.merge\n"
        "from mergekit_math.cli import main\n"
        "pattern = sys.argv.pop(1)\n"
        "while not glob.glob(pattern):\n    time.sleep(0.02)\n"
        "main()\n"
    )
    partial = str(tmp_path / ".out.mmath-partial-*" / "*")
    args = ["merge", str(slow), str(out), "-q"]
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    second = subprocess.run(
        [sys.executable, "-c", second_script, partial, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert first.wait(timeout=120) == 0, first.stderr.read()
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "being written by another mmath run" in lines[0], second.stderr
    assert f"pid {first.pid}" in lines[0]
    assert sorted(load_dir(out)) == sorted(load_dir(slow_model))
    assert not list(tmp_path.glob(".out.mmath-*"))  # no lock, no partial left


def test_output_that_appears_during_the_run_is_not_replaced(tmp_path, zoo):
    """Another program (not an mmath run: those take the lock) creates OUT meanwhile."""
    from mergekit_math.merge import build_plan, execute
    from mergekit_math.recipe import load_recipe

    plan = build_plan(load_recipe(linear(tmp_path, zoo["a"])), recipe_dir=tmp_path)
    out = tmp_path / "out"

    def meanwhile(item) -> None:
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("keep me")

    with pytest.raises(UserError, match="appeared while this run was writing it; nothing"):
        execute(plan, out, progress=False, on_tensor=meanwhile)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert not list(tmp_path.glob(".out.mmath-*"))


def test_lock_file_left_by_a_killed_run_is_reused_and_removed(tmp_path, zoo):
    out = tmp_path / "out"
    (tmp_path / ".out.mmath-lock").write_text("999999999\n")  # nobody holds it
    assert mmath("merge", linear(tmp_path, zoo["a"]), out, "-q").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]


# =============================================================================== --force


def test_force_onto_a_regular_file_leaves_nothing_behind(tmp_path, zoo):
    out = tmp_path / "out"
    out.write_text("not a model")
    recipe = linear(tmp_path, zoo["a"])
    assert_one_error(mmath("merge", recipe, out, "-q"), "already exists")
    assert mmath("merge", recipe, out, "-q", "--force").exit_code == 0
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]


def test_force_onto_a_symlink_replaces_the_link_not_its_target(tmp_path, zoo):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("keep")
    out = tmp_path / "out"
    out.symlink_to(target)
    assert mmath("merge", linear(tmp_path, zoo["a"]), out, "-q", "--force").exit_code == 0
    assert out.is_dir() and not out.is_symlink()
    assert (target / "precious.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out", "r.yaml"]


# =============================================================================== OSError


def test_output_parent_that_is_a_file_is_one_error(tmp_path, zoo):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub" / "out"
    res = mmath("merge", linear(tmp_path, zoo["a"]), out, "-q")
    assert_one_error(res, str(tmp_path / "file"), "is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_parent_not_writable_is_one_error(tmp_path, zoo):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        res = mmath("merge", linear(tmp_path, zoo["a"]), parent / "out", "-q")
        assert_one_error(res, "permission denied", str(parent))
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_permission_denied_creating_the_partial_names_the_output(tmp_path, zoo, monkeypatch):
    """The same fault where it can be made even as root: mkdir of the partial folder fails."""
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if ".mmath-partial-" in self.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    out = tmp_path / "out"
    res = mmath("merge", linear(tmp_path, zoo["a"]), out, "-q")
    assert_one_error(res, f"permission denied writing {out.absolute()}")
    assert_nothing_written(out)


@pytest.mark.parametrize("what", ["tensor data", "final flush"])
def test_disk_full_is_one_error_and_removes_the_partial(tmp_path, zoo, monkeypatch, what):
    from mergekit_math.io import writer

    real_write, real_finish = writer._ShardFile.write, writer._ShardFile.finish
    calls = []

    def write(self, data):
        calls.append(data.size)
        if what == "tensor data" and len(calls) == 3:  # header, one tensor, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    def finish(self):
        if what == "final flush":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_finish(self)

    monkeypatch.setattr(writer._ShardFile, "write", write)
    monkeypatch.setattr(writer._ShardFile, "finish", finish)
    out = tmp_path / "out"
    res = mmath("merge", linear(tmp_path, zoo["a"]), out, "-q")
    line = assert_one_error(res, "no space left on device writing")
    assert line.endswith(str(out.absolute() / "model.safetensors")), line
    assert "mmath-partial" not in line
    assert_nothing_written(out)


def test_disk_full_in_a_real_process_prints_no_traceback(tmp_path, zoo):
    code = (
        "import errno, os\n"
        "from mergekit_math.io import writer\n"
        "def full(self, data):\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "writer._ShardFile.write = full\n"
        "from mergekit_math.cli import main\nmain()\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", code, "merge", str(linear(tmp_path, zoo["a"])), str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no space left on device writing {out}/model.safetensors"]
    assert_nothing_written(out)


# =============================================================================== parameters


@pytest.mark.parametrize(
    "params, where",
    [
        ("{weight: .nan}", "models[0].parameters.weight"),
        ("{weight: 1.0e+400}", "models[0].parameters.weight"),
        ("{weight: -.inf}", "models[0].parameters.weight"),
        ("{weight: [0.5, .inf, 1]}", "models[0].parameters.weight[1]"),
        (
            "{weight: [{filter: mlp, value: .nan}, {value: 1}]}",
            "models[0].parameters.weight[0].value",
        ),
        ("{weight: [{filter: mlp, value: [1, .nan]}]}", "models[0].parameters.weight[0].value[1]"),
    ],
)
def test_non_finite_parameters_are_refused_with_their_yaml_path(tmp_path, zoo, params, where):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {zoo['a']}\n    parameters: {params}\n",
    )
    out = tmp_path / "out"
    assert_one_error(mmath("merge", recipe, out), f"{where}: must be a finite number")
    assert_nothing_written(out)


def test_non_finite_top_level_and_slice_parameters_are_refused(tmp_path, zoo):
    top = write_recipe(
        tmp_path / "top.yaml",
        f"""
merge_method: task_arithmetic
base_model: {zoo["base"]}
parameters: {{lambda: .nan}}
models:
  - model: {zoo["a"]}
    parameters: {{weight: 1}}
""",
    )
    assert_one_error(mmath("merge", top, tmp_path / "o"), "parameters.lambda: must be a finite")
    sliced = write_recipe(
        tmp_path / "s.yaml",
        f"""
merge_method: linear
slices:
  - sources:
      - model: {zoo["a"]}
        layer_range: [0, 3]
        parameters: {{weight: .inf}}
""",
    )
    res = mmath("merge", sliced, tmp_path / "o")
    assert_one_error(res, "slices[0].sources[0].parameters.weight: must be a finite")


@pytest.mark.parametrize(
    "params, where",
    [
        ("{weight: 1.0e+300}", "models[0].parameters.weight"),
        ("{weight: 100000}", "models[0].parameters.weight"),
        ("{weight: [1, -20000]}", "models[0].parameters.weight"),
    ],
)
def test_absurd_parameter_magnitudes_are_refused_naming_the_bound(tmp_path, zoo, params, where):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: linear\nmodels:\n  - model: {zoo['a']}\n    parameters: {params}\n",
    )
    assert_one_error(mmath("merge", recipe, tmp_path / "out"), where, "at most 10000 in magnitude")


def test_bound_leaves_ordinary_weights_alone(tmp_path, zoo):
    recipe = linear(tmp_path, zoo["a"], weight="10000")
    assert mmath("merge", recipe, tmp_path / "out", "-q").exit_code == 0


@pytest.mark.parametrize("values", ["0.5,nan", "inf", "0.1,-inf", "1e400", "NaN,1"])
def test_sweep_values_nan_and_inf_are_refused(values):
    from mergekit_math.sweep.grid import parse_set

    with pytest.raises(UserError, match=r"--set parameters.weight: .* is not a finite number"):
        parse_set(f"parameters.weight={values}")


def test_sweep_values_beyond_the_bound_are_refused(zoo):
    from mergekit_math.recipe import parse_recipe
    from mergekit_math.sweep.grid import check_axes, parse_set

    recipe = parse_recipe(
        {"merge_method": "linear", "models": [{"model": str(zoo["a"])}, {"model": str(zoo["b"])}]}
    )
    axes = [parse_set("models[0].parameters.weight=0.5,1e5")]
    with pytest.raises(UserError, match=r"models\[0\].parameters.weight: 100000.0 is out of range"):
        check_axes(axes, recipe, "r.yaml")


def test_evaluate_limit_must_be_finite():
    from mergekit_math.recipe import parse_recipe

    data = {"merge_method": "linear", "models": [{"model": "m"}]}
    data["evaluate"] = {"tasks": "gsm8k", "limit": float("inf")}
    with pytest.raises(UserError, match="evaluate.limit"):
        parse_recipe(data)


# =============================================================================== inputs


POISONED = "model.layers.1.mlp.up_proj.weight"


def poisoned_copy(src: Path, dst: Path, values=(float("nan"), float("inf"), -float("inf"))):
    """A copy of a model with non-finite values at a few places of one tensor."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    flat = tensors[POISONED].view(-1)
    for i, v in enumerate(values):
        flat[7 + 300 * i] = v
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def two_models(tmp_path: Path, a: Path, b: Path, method: str = "linear", base: Path | None = None):
    head = f"merge_method: {method}\n" + (f"base_model: {base}\n" if base else "")
    extra = {
        "ties": ", density: 0.5",
        "breadcrumbs": ", density: 0.5, gamma: 0.1",
        "della": ", density: 0.5, epsilon: 0.1",
        "della_linear": ", density: 0.5, epsilon: 0.1",
    }.get(method, "")
    return write_recipe(
        tmp_path / "r.yaml",
        head + "models:\n"
        f"  - model: {a}\n    parameters: {{weight: 0.5{extra}}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.5{extra}}}\n",
    )


def test_non_finite_input_values_warn_once_per_tensor_and_input(tmp_path, zoo):
    bad = poisoned_copy(zoo["b"], tmp_path / "bad")
    out = tmp_path / "out"
    res = mmath("merge", two_models(tmp_path, zoo["a"], bad), out, "-q")
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: models[1] ({bad}): tensor {POISONED} has 3 non-finite values (NaN or inf)"
    ]
    assert out.is_dir()  # a warning, not an error: the output is written


@pytest.mark.parametrize(
    ("method", "fused"),
    [("linear", "0"), ("ties", "0"), ("linear", "1"), ("ties", "1"), ("breadcrumbs", "1")],
)
def test_non_finite_count_is_exact_on_chunks_and_worker_threads(
    tmp_path, zoo, method, fused, monkeypatch
):
    """Chunked (and, for TIES, read twice: prepare then merge): counted once per value,
    by the torch path and by the compiled kernels (whose selections see the non-finite
    magnitudes and leave the count on)."""
    from mergekit_math.merge import build_plan, execute, item_ranges
    from mergekit_math.recipe import load_recipe

    monkeypatch.setenv("MMATH_FUSED", fused)
    bad = poisoned_copy(zoo["b"], tmp_path / "bad")
    base = zoo["base"] if method != "linear" else None
    recipe = two_models(tmp_path, zoo["a"], bad, method, base)
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    item = next(i for i in plan.items if i.out.name == POISONED)
    assert len(item_ranges(plan, item, "cpu", 256)) > 3
    got: list[str] = []
    execute(plan, tmp_path / "out", progress=False, chunk_elements=256, threads=2, warn=got.append)
    assert got == [f"models[1] ({bad}): tensor {POISONED} has 3 non-finite values (NaN or inf)"]


@pytest.mark.parametrize(
    ("method", "fused"), [("task_arithmetic", "0"), ("ties", "1"), ("breadcrumbs", "1")]
)
def test_non_finite_base_is_named_as_the_base(tmp_path, zoo, method, fused, monkeypatch):
    from mergekit_math.merge import build_plan, execute
    from mergekit_math.recipe import load_recipe

    monkeypatch.setenv("MMATH_FUSED", fused)
    bad_base = poisoned_copy(zoo["base"], tmp_path / "bad", values=(float("nan"),))
    extra = {"ties": ", density: 0.5", "breadcrumbs": ", density: 0.5, gamma: 0.1"}
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: {method}\nbase_model: {bad_base}\nmodels:\n"
        f"  - model: {zoo['a']}\n    parameters: {{weight: 1{extra.get(method, '')}}}\n",
    )
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    got: list[str] = []
    execute(plan, tmp_path / "out", progress=False, warn=got.append)
    assert got == [
        f"base_model ({bad_base}): tensor {POISONED} has 1 non-finite values (NaN or inf)"
    ]


def test_strict_finite_refuses_and_writes_nothing(tmp_path, zoo):
    bad = poisoned_copy(zoo["b"], tmp_path / "bad")
    out = tmp_path / "out"
    res = mmath("merge", two_models(tmp_path, zoo["a"], bad), out, "-q", "--strict-finite")
    assert_one_error(
        res, f"models[1] ({bad}): tensor {POISONED} has non-finite values", "--strict-finite"
    )
    assert_nothing_written(out)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "della", "della_linear"])
def test_compiled_merge_skips_the_count_only_where_selections_saw_finite_inputs(
    tmp_path, zoo, method, monkeypatch
):
    """The kernels of TIES, Breadcrumbs and DELLA get no count array where every model's
    selection histogrammed (DELLA's decisions summed) finite magnitudes (so base and models
    are finite), and get one for the tensor where a model holds NaN or inf (the count then
    warns, as above)."""
    from mergekit_math.kernels import elementwise
    from mergekit_math.merge import build_plan, execute
    from mergekit_math.recipe import load_recipe

    monkeypatch.setenv("MMATH_FUSED", "1")
    kernel = elementwise.delta_ties if method in ("ties", "della") else elementwise.delta_sum
    calls: list[tuple[bool, bool]] = []  # (some input not finite, counted)

    def finite(x: np.ndarray) -> bool:
        if x.dtype == np.uint16:  # bfloat16 bits
            return not ((x & 0x7F80) == 0x7F80).any()
        return bool(np.isfinite(x).all())

    def spy(*args):  # noqa: ANN002, ANN202
        inputs = [args[0], *args[1]]
        calls.append((not all(finite(x) for x in inputs), args[-1] is not None))
        return kernel(*args)

    monkeypatch.setattr(elementwise, kernel.__name__, spy)
    bad = poisoned_copy(zoo["b"], tmp_path / "bad")
    recipe = two_models(tmp_path, zoo["a"], bad, method, zoo["base"])
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    got: list[str] = []
    execute(plan, tmp_path / "out", progress=False, warn=got.append)
    assert got == [f"models[1] ({bad}): tensor {POISONED} has 3 non-finite values (NaN or inf)"]
    assert (True, True) in calls and (False, False) in calls  # counted there, skipped here
    assert (True, False) not in calls


_PREPARED = {  # kernel module and names, recipe body: methods whose preparation sees all inputs
    "sce": ("sce", ("merge",), "base_model: {base}\nparameters: {{select_topk: 0.5}}\n", 2),
    # the descent's result, or the start where it stopped there (the zoo's inputs: close)
    "karcher": ("karcher", ("result", "start"), "", 2),
    "arcee_fusion": ("fusion", ("fusion",), "base_model: {base}\n", 1),
}


@pytest.mark.parametrize("method", sorted(_PREPARED))
@pytest.mark.parametrize("poison", [True, False])
def test_prepared_kernels_count_non_finite_values_unless_known_finite(
    tmp_path, zoo, method, poison, monkeypatch
):
    """SCE (variances), Karcher (norms) and Arcee Fusion (importances) see every input
    before the merge: where all were finite the kernel gets no count array, where a model
    holds NaN or inf it counts them and the merge warns once, with the exact count."""
    import importlib

    from mergekit_math.merge import build_plan, execute
    from mergekit_math.methods import statistics
    from mergekit_math.recipe import load_recipe

    monkeypatch.setenv("MMATH_FUSED", "1")
    # the compiled statistics (norms, variances) from 1,000 elements: the zoo's are small
    monkeypatch.setattr(statistics, "SINGLE_THREAD_REDUCTION", 1000)
    module, names, head, models = _PREPARED[method]
    kernels = importlib.import_module(f"mergekit_math.kernels.{module}")
    counted: list[bool] = []

    def spy_on(kernel):  # noqa: ANN001, ANN202
        def spy(*args):  # noqa: ANN002, ANN202
            counted.append(args[-1] is not None)
            return kernel(*args)

        return spy

    for name in names:
        monkeypatch.setattr(kernels, name, spy_on(getattr(kernels, name)))
    other = poisoned_copy(zoo["b"], tmp_path / "bad") if poison else zoo["b"]
    sources = [other] if models == 1 else [zoo["a"], other]
    body = "".join(f"  - model: {m}\n" for m in sources)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: {method}\n" + head.format(base=zoo["base"]) + "models:\n" + body,
    )
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    got: list[str] = []
    execute(plan, tmp_path / "out", progress=False, warn=got.append)
    if poison:
        where = f"models[{len(sources) - 1}] ({other})"
        assert got == [f"{where}: tensor {POISONED} has 3 non-finite values (NaN or inf)"]
        assert True in counted
    else:
        assert got == []
    assert counted and False in counted  # the finite tensors: no count


@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
@pytest.mark.parametrize("poison", [True, False])
def test_spherical_merges_count_non_finite_values_unless_norms_were_finite(
    tmp_path, zoo, method, poison, monkeypatch
):
    """NuSLERP and Multi-SLERP take every input's norm before the merge: a tensor whose
    norms are finite is not counted again, one with NaN or inf is (one warning, the exact
    count)."""
    from mergekit_math.kernels import interp
    from mergekit_math.merge import build_plan, execute
    from mergekit_math.methods import statistics
    from mergekit_math.recipe import load_recipe

    monkeypatch.setenv("MMATH_FUSED", "1")
    monkeypatch.setattr(statistics, "SINGLE_THREAD_REDUCTION", 1000)  # as above
    counted: list[int] = []
    count_bad = interp.count_bad

    def spy(array, bad, j):  # noqa: ANN001, ANN202
        counted.append(array.shape[0])
        return count_bad(array, bad, j)

    monkeypatch.setattr(interp, "count_bad", spy)
    other = poisoned_copy(zoo["b"], tmp_path / "bad") if poison else zoo["b"]
    weights = "{weight: 0.4}", "{weight: 0.6}"
    body = "".join(
        f"  - model: {m}\n    parameters: {w}\n" for m, w in zip([zoo["a"], other], weights)
    )
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: {method}\nbase_model: {zoo['base']}\nmodels:\n" + body,
    )
    plan = build_plan(load_recipe(recipe), recipe_dir=tmp_path)
    got: list[str] = []
    execute(plan, tmp_path / "out", progress=False, warn=got.append)
    long = [i.out.numel for i in plan.items if not i.copy_only and i.out.numel > 1000]
    poisoned = next(i.out.numel for i in plan.items if i.out.name == POISONED)
    if poison:
        assert got == [
            f"models[1] ({other}): tensor {POISONED} has 3 non-finite values (NaN or inf)"
        ]
        assert counted.count(poisoned) >= 3  # base and both models, on that tensor's chunks
    else:
        assert got == []
        assert not set(counted) & set(long)  # every long tensor's norms were finite
    assert long and all(n <= 1000 for n in counted if n != poisoned)


def test_finite_inputs_give_no_warning(tmp_path, zoo):
    res = mmath("merge", two_models(tmp_path, zoo["a"], zoo["b"]), tmp_path / "out", "-q")
    assert res.exit_code == 0
    assert "warning" not in res.stderr


# =============================================================================== progress


def test_progress_in_a_pipe_is_lines_without_carriage_returns(tmp_path, zoo):
    out = tmp_path / "out"
    proc = subprocess.run(  # bytes: text mode would turn "\r" into "\n"
        [sys.executable, "-m", "mergekit_math", "merge", str(linear(tmp_path, zoo["a"])), str(out)],
        capture_output=True,
    )
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert "\r" not in stderr and "\x1b[" not in stderr, repr(stderr)
    lines = [line for line in stderr.split("\n") if line.startswith("merge linear:")]
    assert lines and lines[-1].startswith("merge linear: 100%"), stderr


def test_line_stream_prints_start_end_and_at_most_one_line_per_interval():
    import io

    from mergekit_math.io.progress import progress

    stream = io.StringIO()
    bar = progress(total=1000, desc="steps", file=stream, interval=3600, mininterval=0)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 2, lines  # the start, then the end (the interval never passed)
    assert lines[0].startswith("steps:   0% 0/1000") and lines[1].startswith(
        "steps: 100% 1000/1000"
    )

    stream = io.StringIO()
    bar = progress(total=5, desc="points", file=stream, interval=0, mininterval=0)
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert len(stream.getvalue().splitlines()) == 6  # with no interval: a line per step


def test_progress_on_a_terminal_is_tqdm_unchanged():
    import io

    from mergekit_math.io.progress import progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    bar = progress(total=3, desc="x", file=stream, mininterval=0)
    bar.update(3)
    bar.close()
    assert "\r" in stream.getvalue()


def test_partial_of_a_reused_pid_is_removed_under_the_lock(tmp_path, zoo):
    """A killed run's ``.out.mmath-partial-PID`` whose pid now belongs to another live
    process (pid 1 here) is still stale: the next run holds the output's lock, so no one
    else can be writing it."""
    from mergekit_math.io.atomic import PARTIAL_MARK

    out = tmp_path / "out"
    stale = tmp_path / f".out{PARTIAL_MARK}1"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    res = mmath("merge", linear(tmp_path, zoo["a"]), out, "-q")
    assert res.exit_code == 0, res.output
    assert not stale.exists() and out.is_dir()

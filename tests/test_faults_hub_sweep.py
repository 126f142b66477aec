"""Faults in publishing and sweeps: links that leave a model or sweep folder, a merge card's
``base_model`` with local paths, results rows that name paths, and sweep workers that
outlive a killed parent."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import mmath, write_recipe
from hub_server import TOKEN, FakeHub, hub_fixture  # noqa: F401  (the `hub` fixture)
from test_sweep import WEIGHT, models, rows_of, sweep_args  # noqa: F401  (the `models` fixture)

from mergekit_math.errors import UserError
from mergekit_math.hub.push import files_to_upload, push_model


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMATH_CACHE_DIR", str(tmp_path / "cache"))


def one_error(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


# ============================================================================ push: links


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A model folder, and a secret next to it that must never be uploaded."""
    (tmp_path / "secret.txt").write_text("SECRET-CONTENT")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}\n')
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    return model


def assert_nothing_pushed(hub: FakeHub) -> None:
    assert hub.requests == [] and hub.repos == {}
    assert not [where for where, data in hub.stored_bytes() if b"SECRET" in data]


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda m: (m / "notes.txt").symlink_to(m.parent / "secret.txt"), "outside the model"),
        (lambda m: (m / "up").symlink_to(m.parent), "outside the model folder"),
        (lambda m: (m / "abs.txt").symlink_to("/etc/hostname"), "outside the model folder"),
        (lambda m: (m / "gone.txt").symlink_to(m / "nothing"), "does not exist"),
        (lambda m: (m / "self").symlink_to(m / "sub", target_is_directory=True), "to the folder"),
        (lambda m: os.mkfifo(m / "pipe"), "is not a regular file"),
    ],
    ids=["file-outside", "folder-outside", "absolute", "dangling", "folder-inside", "fifo"],
)
def test_push_refuses_links_that_leave_the_folder(hub: FakeHub, folder: Path, make, why):
    (folder / "sub").mkdir()
    (folder / "sub" / "x.json").write_text("{}")
    make(folder)
    with pytest.raises(UserError) as err:
        push_model(folder, "me/m", token=TOKEN)
    assert why in str(err.value) and "nothing was pushed" in str(err.value)
    assert str(folder) in str(err.value)
    assert_nothing_pushed(hub)


def test_mmath_push_refuses_a_link_outside_before_any_request(hub: FakeHub, folder: Path):
    link = folder / "tokenizer.json"
    link.symlink_to(folder.parent / "secret.txt")
    res = mmath("push", folder, "me/m", "--no-eval", "--force", "--token", TOKEN)
    assert res.exit_code == 2, res.output
    line = one_error(res.output)
    assert f"{link} is a symlink to {folder.parent / 'secret.txt'} outside the model folder" in line
    assert "nothing was pushed" in line
    assert_nothing_pushed(hub)


def test_push_uploads_a_link_inside_the_folder_as_its_content(hub: FakeHub, folder: Path):
    (folder / "weights").mkdir()
    (folder / "weights" / "real.bin").write_bytes(b"inside")
    (folder / "alias.bin").symlink_to("weights/real.bin")
    paths = [path for path, _ in files_to_upload(folder)]
    assert "alias.bin" in paths and "weights/real.bin" in paths
    push_model(folder, "me/m", token=TOKEN)
    files = hub.repos["me/m"].files
    assert files["alias.bin"] == files["weights/real.bin"] == b"inside"


# ============================================================================ merge card


def card_front(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_merge_card_base_model_lists_hub_ids_only(zoo, tmp_path, monkeypatch):
    """Local parents (absolute, ../relative, and NAMESPACE/NAME-looking folders next to the
    recipe) stay out of base_model and in the text; a parent fetched from the Hub stays in."""
    import shutil

    import mergekit_math.io.resolve as resolve

    work = tmp_path / "work"
    (work / "demo").mkdir(parents=True)
    shutil.copytree(zoo["b"], work / "demo" / "ft")  # 'demo/ft': looks like a Hub id
    snapshot = tmp_path / "hub" / "models--org--remote" / "snapshots" / "abc123"
    shutil.copytree(zoo["c"], snapshot)
    fetched = []

    def download(repo_id: str, where: str) -> Path:
        fetched.append(repo_id)
        assert repo_id == "org/remote"
        return snapshot

    monkeypatch.setattr(resolve, "_download", download)
    recipe = write_recipe(
        work / "recipe.yaml",
        f"merge_method: task_arithmetic\nbase_model: {zoo['base']}\nmodels:\n"
        f"  - model: {os.path.relpath(zoo['a'], tmp_path)}\n    parameters: {{weight: 0.3}}\n"
        "  - model: demo/ft\n    parameters: {weight: 0.3}\n"
        "  - model: org/remote\n    parameters: {weight: 0.3}\n",
    )
    monkeypatch.chdir(tmp_path)  # the ../-style path is relative to here, demo/ft to the recipe
    res = mmath("merge", recipe, tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert fetched == ["org/remote"]
    front = card_front(tmp_path / "out")
    assert front["base_model"] == ["org/remote"]
    text = (tmp_path / "out" / "README.md").read_text()
    for local in (str(zoo["base"]), "demo/ft", os.path.relpath(zoo["a"], tmp_path)):
        assert f"- {local}\n" in text.split("## Parents", 1)[1]

    # Only local parents: no base_model key at all.
    res = mmath(
        "merge",
        write_recipe(
            work / "local.yaml",
            f"merge_method: linear\nmodels:\n  - model: {zoo['a']}\n    parameters: {{weight: 1}}\n"
            f"  - model: {zoo['b']}\n    parameters: {{weight: 1}}\n",
        ),
        tmp_path / "out2",
    )
    assert res.exit_code == 0, res.output
    assert "base_model" not in card_front(tmp_path / "out2")


def test_patch_apply_card_base_model_has_no_local_path(zoo, tmp_path):
    patch = tmp_path / "patch"
    res = mmath("patch", "extract", "--base", zoo["base"], "--finetuned", zoo["a"], "-o", patch)
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    res = mmath("patch", "apply", "--patch", patch, "--base", zoo["b"], "-o", out, "-q")
    assert res.exit_code == 0, res.output
    assert "base_model" not in card_front(out)
    assert str(zoo["b"].resolve()) in (out / "README.md").read_text()  # named in the text


# ============================================================================ sweep folders


def test_rows_naming_paths_are_ignored(tmp_path):
    """A results row's id becomes a path (points/<id>/model is deleted under --keep best and
    pushed by --push-best): an id that is not a point id is not a row."""
    from test_sweep import fake_sweep

    from mergekit_math.sweep.report import write_report

    folder = tmp_path / "s"
    fake_sweep(folder, [WEIGHT], [{WEIGHT: 0.5}])
    victim = tmp_path / "victim" / "model"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("x")
    evil = {
        "id": "../../victim",
        "point": {WEIGHT: 1.0},
        "metrics": {"gsm8k_cot_local:exact_match,flexible-extract": 99.0},
        "recipe": {"merge_method": "ties"},
    }
    with open(folder / "results.jsonl", "a") as f:
        f.write(json.dumps(evil) + "\n" + json.dumps({**evil, "id": 7}) + "\n")
    files = write_report(folder)
    assert [r["id"] for r in files.rows] == ["0" * 16]
    assert files.best["id"] == "0" * 16


@pytest.mark.parametrize("name", ["results.jsonl", ".sweep.lock", "points"])
def test_sweep_refuses_links_in_its_folder(models, tmp_path, name):  # noqa: F811
    """A link planted in a sweep folder is refused before anything is written through it."""
    import shutil

    out = tmp_path / "sweep"
    res = mmath(*sweep_args(models, out, "0"))
    assert res.exit_code == 0, res.output
    target = tmp_path / "elsewhere"
    target.mkdir()
    precious = target / "precious"
    path = out / name
    if path.is_dir():
        shutil.rmtree(path)
        path.symlink_to(target)
    else:
        shutil.copy(path, precious)  # the link reads as the real file did
        path.unlink()
        path.symlink_to(precious)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    res = mmath(*sweep_args(models, out, "0,1"))
    assert res.exit_code == 2, res.output
    assert f"{path} is a symlink" in one_error(res.output)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_point_folder_link_is_refused(tmp_path):
    from mergekit_math.sweep.point import LOG, PointTask, run_point_safe

    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / LOG).symlink_to(target)
    task = PointTask("0" * 16, "sha256:0", {}, {}, str(folder), {"tasks": ["gsm8k_local"]})
    status, _, message = run_point_safe(task)
    assert status == "error" and f"{folder / LOG} is a symlink" in message
    assert target.read_text() == "keep"


# ============================================================================ sweep: locks


def test_locked_point_is_skipped_and_a_recorded_one_not_rerun(models, tmp_path):  # noqa: F811
    """A point whose lock a live process holds is skipped with a message (not run, not
    recorded); a point recorded by the time its lock is taken is not run again."""
    from mergekit_math.sweep.point import LOCK, PointTask, run_point_safe
    from mergekit_math.sweep.runner import SweepSettings, plan_sweep

    out = tmp_path / "sweep"
    res = mmath(*sweep_args(models, out, "1"))
    assert res.exit_code == 0, res.output
    [done] = rows_of(out)

    # The row recorded meanwhile (as by a worker of a killed sweep): not run, not appended.
    task = PointTask(
        done["id"],
        done["recipe_hash"],
        done["point"],
        done["recipe"],
        str(out / "points" / done["id"]),
        {"tasks": ["gsm8k_local"]},
        results=str(out / "results.jsonl"),
    )
    status, _, message = run_point_safe(task)
    assert status == "skipped" and "recorded already" in message
    assert rows_of(out) == [done]

    settings = SweepSettings(  # point ids do not depend on the folder or the evaluation
        recipe=models["recipe"], sets=[f"{WEIGHT}=0"], out=tmp_path / "o", eval={"tasks": ["x"]}
    )
    [busy] = plan_sweep(settings).points
    folder = out / "points" / busy.id
    folder.mkdir()
    args = sweep_args(models, out, "0,1")
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"424242")
        res = mmath(*args)
    finally:
        os.close(fd)
    assert res.exit_code == 1, res.output  # the sweep is not complete: say so
    assert "1 of 1 points are being run by another process" in res.output
    assert "(1 recorded, 1 to run)" in res.output
    assert f"point {busy.id} is being run by another process (pid 424242)" in res.output
    assert rows_of(out) == [done]
    assert not (folder / "model").exists() and not (folder / "log.txt").exists()

    res = mmath(*args)  # lock released: the busy point runs now
    assert res.exit_code == 0, res.output
    assert "(1 recorded, 1 to run)" in res.output
    assert [r["id"] for r in rows_of(out)] == [done["id"], busy.id]


def alive(procs) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigkill_of_sweep_kills_its_workers_and_resume_has_no_duplicates(
    models,  # noqa: F811
    tmp_path,
):
    """SIGKILL of `mmath sweep --jobs 2` once a point has started: no worker survives it (the
    kernel kills them, PR_SET_PDEATHSIG), and the resume records each point exactly once."""
    import psutil

    out = tmp_path / "sweep"
    args = sweep_args(models, out, "0,1")
    env = {**os.environ, "MMATH_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergekit_math", *map(str, args), "--jobs", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    workers: list = []
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("points/*/log.txt")):  # a worker is merging a point
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no point started in time"
            time.sleep(0.02)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        gone = time.monotonic() + 2
        while alive(workers) and time.monotonic() < gone:
            time.sleep(0.05)
        assert alive(workers) == [], [p.cmdline()[-3:] for p in alive(workers)]
    finally:  # a failing run leaves no process behind either
        for p in alive(workers + psutil.Process().children(recursive=True)):
            p.kill()
    res = mmath(*args)
    assert res.exit_code == 0, res.output
    rows = rows_of(out)
    assert len(rows) == 2 and len({r["id"] for r in rows}) == 2
    assert len({r["recipe_hash"] for r in rows}) == 2
    assert not list(out.rglob("*partial*"))


def test_parent_watchdog_alone_ends_an_orphaned_worker(tmp_path):
    """Without PR_SET_PDEATHSIG (not Linux), the watchdog thread ends a worker whose parent
    is gone within about a second."""
    import psutil

    child = (
        "import ctypes, sys, time\n"
        "def no_libc(*args, **kwargs):\n"
        "    raise OSError('no prctl here')  # as where there is no PR_SET_PDEATHSIG\n"
        "ctypes.CDLL = no_libc\n"
        "from mergekit_math.sweep.point import die_with_parent\n"
        "die_with_parent(int(sys.argv[1]))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = (
        "import os, subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())],"
        " stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)\n"
        "assert p.stdout.readline() == 'ready\\n'\n"
        "print(p.pid, flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", parent], capture_output=True, text=True, timeout=60, check=True
    )
    orphan = psutil.Process(int(out.stdout.strip()))
    try:
        deadline = time.monotonic() + 3
        while alive([orphan]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive([orphan]) == []
    finally:
        for p in alive([orphan]):
            p.kill()


def test_interrupt_swallowed_by_a_library_still_stops_the_sweep(monkeypatch) -> None:
    """Ctrl-C that lands while pydantic builds a validator comes back as its SchemaError
    (seen in test_resume_after_sigint): the in-process sweep must stop, not record a failed
    point and go on with the next."""

    from mergekit_math.sweep import runner

    ran: list[str] = []

    def point_that_swallows_the_interrupt(task):
        ran.append(task)
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt as exc:  # what a library does with it
            return ("error", task, f"SchemaError: wrapped {exc!r}")
        raise AssertionError("SIGINT did not interrupt")

    monkeypatch.setattr(runner, "run_point_safe", point_that_swallows_the_interrupt)
    handled: list = []
    # the handler the sweep must put back: Python's own, or SIG_IGN where the test process was
    # started in the background by a shell without job control
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        runner.run_local(["p1", "p2", "p3"], 1, None, handled.append)
    assert ran == ["p1"] and handled == []
    assert signal.getsignal(signal.SIGINT) is before

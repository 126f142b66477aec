"""The merge process's allocator tuning (mergekit_math.cli.startup.tune_malloc), checked in
fresh interpreters by glibc's own account of its arenas (``malloc_info``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's mallopt and malloc_info"
)

# Four threads each hold a 1 MB block (under the 8 MB mmap threshold: from an arena), then
# malloc_info's XML is read back and its heaps counted, one per arena.
_ARENAS = textwrap.dedent(
    """
    import ctypes, ctypes.util, os, sys, tempfile, threading
    from mergekit_math.cli.startup import tune_malloc
    if sys.argv[1] == "tuned":
        tune_malloc()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    held, ready, done = [], threading.Barrier(5), threading.Event()
    def hold():
        held.append(libc.malloc(1 << 20))
        ready.wait()
        done.wait()
    threads = [threading.Thread(target=hold) for _ in range(4)]
    for t in threads:
        t.start()
    ready.wait()
    path = os.path.join(tempfile.mkdtemp(), "info.xml")
    f = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, f)
    libc.fclose(f)
    done.set()
    for t in threads:
        t.join()
    print(open(path).read().count("<heap nr="))
    """
)


def _script(script: str, mode: str, env: dict[str, str], prefix: str) -> str:
    """``script``'s output in a fresh interpreter, with the environment's variables that
    start with ``prefix`` replaced by ``env``."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    run_env.update(env)
    cmd = [sys.executable, "-c", script, mode]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, env=run_env).stdout


def _arenas(mode: str, env: dict[str, str] | None = None) -> int:
    return int(_script(_ARENAS, mode, env or {}, "MALLOC_").strip())


def test_tune_malloc_gives_the_merge_threads_one_arena():
    """Untuned, threads that allocate get arenas of their own (each heap grows to its own
    thread's peak: more fresh memory); tuned, they share the main one."""
    assert _arenas("plain") > 1
    assert _arenas("tuned") == 1


def test_tune_malloc_leaves_a_users_arena_setting():
    """MALLOC_ARENA_MAX in the environment wins over the tuning."""
    assert _arenas("tuned", {"MALLOC_ARENA_MAX": "3"}) > 1


_THREADS = textwrap.dedent(
    """
    import os, sys
    if sys.argv[1] == "cli":
        from mergekit_math.cli.startup import one_blas_thread
        one_blas_thread()
    before = len(os.listdir("/proc/self/task"))
    import numpy  # noqa: F401
    print(len(os.listdir("/proc/self/task")) - before, os.environ.get("OPENBLAS_NUM_THREADS"))
    """
)


def _blas_threads(mode: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    started, setting = _script(_THREADS, mode, env or {}, "OPENBLAS_NUM_THREADS").split()
    return int(started), setting


def test_the_cli_loads_numpy_without_openblas_server_threads():
    """Loading numpy starts an OpenBLAS thread per extra core, none after the CLI's setting;
    a user's OPENBLAS_NUM_THREADS stays as given."""
    if (os.cpu_count() or 1) > 1:
        assert _blas_threads("plain")[0] > 0
    assert _blas_threads("cli") == (0, "1")
    assert _blas_threads("cli", {"OPENBLAS_NUM_THREADS": "2"})[1] == "2"


def test_main_asks_for_one_blas_thread_before_running_a_command(monkeypatch):
    from mergekit_math import cli

    seen = []
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "unset at the end")  # undone after the test
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    monkeypatch.setattr("mergekit_math.cli.startup.freeze_for_exit", lambda: None)
    monkeypatch.setattr(cli, "app", lambda: seen.append(os.environ.get("OPENBLAS_NUM_THREADS")))
    cli.main()
    assert seen == ["1"]


# The console script's entry (``cli.run``) after a merge: an atexit handler of the caller's
# writes "atexit", an object left for the interpreter's teardown writes "teardown" when freed
# then; argv[3] "thread" leaves a thread that is not a daemon running 0.3 s past the merge.
_EXIT = textwrap.dedent(
    """
    import atexit, sys, threading, time
    flags = sys.argv[4]
    def note(word):
        with open(flags, "a") as f:
            f.write(word + " ")
    atexit.register(note, "atexit")
    class Late:
        def __del__(self):
            note("teardown")
    sys.modules["late_holder"] = type(sys)("late_holder")
    sys.modules["late_holder"].obj = Late()
    from mergekit_math.cli import run, startup
    def outlive():
        while not startup._merge_done:
            time.sleep(0.01)
        time.sleep(0.3)
    if sys.argv[3] == "thread":
        threading.Thread(target=outlive).start()
    sys.argv = ["mmath", "merge", sys.argv[1], sys.argv[2], "--quiet"]
    run()
    """
)


def _exit_run(
    tmp_path, recipe, out, mode: str = "plain"
) -> tuple[subprocess.CompletedProcess, str]:
    flags = tmp_path / f"flags-{out.name}"
    run = subprocess.run(
        [sys.executable, "-c", _EXIT, str(recipe), str(out), mode, str(flags)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    return run, flags.read_text() if flags.exists() else ""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from conftest import make_model

    root = tmp_path_factory.mktemp("exit")
    base = make_model(root / "base", seed=0)
    return base, make_model(root / "a", base=base, seed=1)


def _task_arithmetic(path, base, model):
    """A recipe adding half of ``model``'s delta to ``base``."""
    from conftest import write_recipe

    return write_recipe(
        path,
        f"merge_method: task_arithmetic\nbase_model: {base}\n"
        f"models:\n  - model: {model}\n    parameters: {{weight: 0.5}}\n",
    )


def test_the_console_script_ends_a_merge_without_the_interpreters_teardown(tmp_path, pair):
    """After a merge that succeeded: status 0, the last line on stdout, the caller's atexit
    handler run, the teardown not (its object's finaliser never runs); the output whole."""
    from conftest import load_dir

    base, a = pair
    recipe = _task_arithmetic(tmp_path / "r.yaml", base, a)
    run, flags = _exit_run(tmp_path, recipe, tmp_path / "out")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("merged ") and run.stdout.endswith(f"{tmp_path / 'out'}\n")
    assert flags.split() == ["atexit"]
    assert load_dir(tmp_path / "out").keys() == load_dir(a).keys()


def test_a_failed_merge_or_a_live_thread_exits_as_usual(tmp_path, pair):
    """A merge that fails keeps its status and the whole teardown; so does a successful one
    while a thread that is not a daemon still runs (the normal exit waits for it)."""
    base, a = pair
    missing = _task_arithmetic(tmp_path / "bad.yaml", base, tmp_path / "nowhere")
    run, flags = _exit_run(tmp_path, missing, tmp_path / "out1")
    assert run.returncode != 0 and "error:" in run.stderr
    assert flags.split() == ["atexit", "teardown"]
    good = _task_arithmetic(tmp_path / "good.yaml", base, a)
    run, flags = _exit_run(tmp_path, good, tmp_path / "out2", "thread")
    assert run.returncode == 0, run.stderr
    assert flags.split() == ["atexit", "teardown"]

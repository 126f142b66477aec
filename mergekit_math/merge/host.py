"""Merging without torch: where every output tensor of a plan is a copy or goes through its
method's fused kernel, the merge reads, computes and writes numpy arrays and never imports
torch (measurements in docs/benchmarks.md, "Start-up").

Importing torch is about 1.0-1.3 s of a merge's start-up and exit, half of the IO floor of a
TinyLlama-sized merge on this machine; the fused kernels take numpy arrays anyway. Here:

- :func:`runs_without_torch`: whether a plan qualifies (CPU, numba kernels enabled, plain
  safetensors inputs, every item a copy or fused). ``MMATH_TORCH=1`` turns it off.
- :class:`~mergekit_math.io.writer.HostPart`: a part of an output tensor as numpy bytes and
  its dtype name, what the sharded writer takes besides torch tensors.
- :func:`as_torch`: an input range read into numpy as the torch tensor of its stored dtype
  (zero-copy), where a kernel declines after all and the torch path runs.
- :func:`import_torch`: the merge's one way of importing torch (the collector paused, the
  objects frozen), with the thread count asked for by :func:`set_threads`.
- :func:`import_torch_in_background`: for a plan whose tensors are all fused but whose
  preparation needs torch somewhere (``prepares_with_torch``: the SLERP family's small
  tensors; SCE's and Arcee Fusion's where their torch-free steps are not known to give torch's
  bits on this machine), the merge still runs on numpy arrays and torch
  is imported on a thread of its own while the first tensors are read and merged; code that
  uses torch meanwhile waits for it at its ``import torch`` (Python's module lock).
- :func:`warm_kernels_in_background`: numba's set-up for its first kernel call, on a thread
  of its own while the first tensors are read.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

from mergekit_math.io.input_file import NUMPY_VIEWS
from mergekit_math.merge.fused import FusedRange
from mergekit_math.merge.types import Plan

if TYPE_CHECKING:
    import torch


def one_intra_op_thread() -> None:
    """Make the calling thread's torch ops run on it alone (no OpenMP team): the merge's
    reader, writer and chunk workers, whose parallelism is their number.

    torch sets a thread's OpenMP thread count at the thread's first parallel op, from the
    process-wide count of the last ``torch.set_num_threads`` (any thread's): set before that
    first op, a 1 was overwritten by the main thread's 2. Then the writer's staging copies
    forked a team whose idle member spun, busy-waiting for the next region, on one of this
    machine's two cores: a quarter of a TIES merge's CPU time. So the count is read first
    (which applies it), then set.
    """
    import torch

    torch.get_num_threads()
    torch.set_num_threads(1)


def as_torch(array: Any, dtype: str) -> torch.Tensor:
    """A range read into numpy as a tensor of its stored ``dtype`` sharing the memory. The
    first call of a merge without torch imports it, with one intra-op thread per thread as
    a merge with torch has (its threads started without torch)."""
    wait_for_torch()
    if "torch" not in sys.modules:
        import_torch()
        one_intra_op_thread()
    import torch

    return torch.from_numpy(array.reshape(-1).view("uint8")).view(getattr(torch, dtype))


def runs_without_torch(plan: Plan, device: str) -> bool:
    """Whether the whole plan runs on numpy arrays and never needs torch: it
    :func:`runs_on_numpy`, and its method prepares its tensors (if at all) without torch
    (``Chunking.host``). A kernel that still declines a range imports torch there
    (:func:`as_torch`)."""
    return runs_on_numpy(plan, device) and not prepares_with_torch(plan)


def prepares_with_torch(plan: Plan) -> bool:
    """Whether the plan's method prepares its tensors with torch (``Chunking.prepare``
    without ``host``)."""
    chunking = plan.method.chunking
    return chunking is not None and chunking.prepare is not None and not chunking.on_host()


def runs_on_numpy(plan: Plan, device: str) -> bool:
    """Whether the plan reads, merges and writes numpy arrays: on the CPU with the compiled
    kernels, inputs in safetensors files, and every item a copy of a tensor or fused with
    its method's kernel on chunks. Its preparations may still need torch
    (:func:`prepares_with_torch`: then imported in the background)."""
    from mergekit_math import kernels

    if os.environ.get("MMATH_TORCH") == "1" or device != "cpu":
        return False
    if not kernels.enabled(device, plan.output_elements):
        return False
    if any(c.pickled for c in plan.checkpoints.values()):
        return False
    method = plan.method
    chunking = method.chunking
    for item in plan.items:
        if item.copy_only:
            if item.out.dtype not in NUMPY_VIEWS:
                return False
            continue
        if FusedRange.of(plan, item, device, None, None) is None:
            return False
        if chunking is None or not method.chunkable(item.shared, item.params):
            return False
    return True


_imported = False
_threads: int | None = None


def set_threads(threads: int | None) -> None:
    """The process's merge thread count (``mmath merge --threads``): torch's intra-op count,
    set now where torch is imported, else when :func:`import_torch` imports it, and the
    number of worker threads of a merge without torch."""
    global _threads
    _threads = threads
    torch = imported_torch()
    if threads is not None and torch is not None:
        torch.set_num_threads(threads)


def default_threads() -> int:
    """Worker threads for a merge not told how many: :func:`set_threads`' count, else
    torch's where it is imported, else the CPUs this process may run on (torch's default)."""
    if _threads is not None:
        return _threads
    torch = imported_torch()
    if torch is not None:
        return torch.get_num_threads()
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_merged = False


def merged() -> None:
    """Note that a merge without torch finished in this process (see
    :func:`imported_here`)."""
    global _merged
    _merged = True


def imported_here() -> bool:
    """Whether :func:`import_torch` imported torch in this process, or a merge without
    torch finished in it: either way the heap holds the merge's modules (torch's, or numpy's
    and numba's), which the interpreter's final collections would walk for nothing
    (``cli.startup.freeze_for_exit``: about 0.3 s after a merge without torch)."""
    return _imported or _merged


def import_torch() -> None:
    """Import torch with the cyclic collector paused, then freeze the objects that exist:
    the collector would traverse its ~160,000 objects while they are created and in every
    full collection after (about 0.25 s). Nothing is done where torch is already imported
    (a long-lived process, the tests): there the heap holds more than start-up objects."""
    global _imported
    wait_for_torch()
    if "torch" in sys.modules:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch
    finally:
        if enabled:
            gc.enable()
    gc.freeze()
    _imported = True
    if _threads is not None:
        torch.set_num_threads(_threads)


_background: threading.Thread | None = None


def import_torch_in_background() -> bool:
    """Start :func:`import_torch` on a thread of its own, then set torch's intra-op thread
    count to 1 (the merge's worker threads, whose parallelism is their number, take it at
    their first torch op; :func:`restore_threads` gives it back after the merge). Returns
    whether an import started (not where torch is imported or being imported).

    The import holds the interpreter lock for most of its ~1 s, but the merge's reader and
    compiled kernels run without it, so it overlaps the first tensors' reads and passes. A
    failed import is left to fail again, with its error, where torch is first used."""
    global _background
    if "torch" in sys.modules or (_background is not None and _background.is_alive()):
        return False

    def run() -> None:
        try:
            import_torch()
            sys.modules["torch"].set_num_threads(1)
        except BaseException:  # noqa: BLE001 (re-raised by the next import, where used)
            pass

    _background = threading.Thread(target=run, name="mmath-import-torch", daemon=True)
    _background.start()
    return True


def maps_inputs() -> bool:
    """Whether a merge on numpy arrays reads its inputs through mappings once the SIGBUS
    guard is installed (``MMATH_MAP=0``: never)."""
    return os.environ.get("MMATH_MAP", "1") != "0"


class InputMaps:
    """Whether a merge's reads map their ranges: decided once the kernels' warm-up has
    installed the SIGBUS guard or failed to (:func:`warm_kernels_in_background`)."""

    def __init__(self) -> None:
        self.decided = threading.Event()
        self.on = False  # the guard is installed for this merge

    def wait(self) -> bool:
        """Whether to map, once decided. The reads wait for it rather than copy the first
        ranges (their buffers would stay in the heap while the mapped ones add to them)."""
        self.decided.wait()
        return self.on


def warm_kernels_in_background(mapped: InputMaps | None = None) -> threading.Thread:
    """Set up numba's dispatch on a thread of its own while the first tensors are read, and
    return the thread (the merge joins it before it ends). The first call of any compiled
    kernel in a process builds numba's typing and target contexts (about 0.12 s here; 0.25
    with the import of scipy.linalg that ``kernels.target`` spares it) before it loads the
    kernel from the cache; the merge's worker threads waited for that after the first
    tensor's read, the reads' buffers full. One tiny call of a cached kernel does it.

    With ``mapped`` it then installs the SIGBUS guard (``kernels.sigbus``, its cached
    handler: 3 ms) and decides ``mapped``; the merge uninstalls it (:func:`release_guard`)
    after joining this thread."""

    def run() -> None:
        try:
            import numpy as np

            from mergekit_math.kernels.elementwise import widen_into

            widen_into(np.zeros(1, np.uint16), np.zeros(1, np.float32))
            if mapped is not None:
                from mergekit_math.kernels import sigbus

                if sigbus.available():
                    sigbus.install()
                    mapped.on = True
        except BaseException:  # noqa: BLE001 (a kernel that fails fails again where used;
            pass  # without the guard the reads copy)
        finally:
            if mapped is not None:
                mapped.decided.set()

    thread = threading.Thread(target=run, name="mmath-warm-kernels", daemon=True)
    thread.start()
    return thread


def wait_for_torch() -> None:
    """Wait for a background import of torch to finish (none: return at once)."""
    thread = _background
    if thread is not None and thread is not threading.current_thread():
        thread.join()


def imported_torch() -> Any:
    """The torch module where it is imported; None where it is not, or while an import of
    it is under way on some thread (the module is then in ``sys.modules`` half made: a
    background import, or a kernel's fallback importing it on one worker while another
    looks), or while a background import has not yet set its thread count."""
    module = sys.modules.get("torch")
    # importlib's own test for a module being executed (``_find_and_load``)
    if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None
    thread = _background
    if thread is not None and thread.is_alive():
        return None
    return module


def restore_threads(threads: int) -> None:
    """After a merge on numpy arrays that imported torch (in the background, or where a
    kernel declined a range): the calling thread's (and new threads') intra-op count back to
    ``threads`` (:func:`import_torch_in_background` and :func:`as_torch` set 1 for the
    merge's workers)."""
    wait_for_torch()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def release_guard(mapped: InputMaps | None) -> None:
    """Uninstall the SIGBUS guard where :func:`warm_kernels_in_background` installed it for
    ``mapped`` (after joining that thread)."""
    if mapped is not None and mapped.on:
        from mergekit_math.kernels import sigbus

        mapped.on = False
        sigbus.uninstall()

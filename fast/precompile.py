"""Compile the fast layer's Triton kernels in parallel before the first call of a run.

What to read: fast/kernels.py (the kernels); results/perf-notes.md (the first-run times).

Why: with an empty kernel cache, the first 256×256×16 run compiled about 90 kernel variants one after another (each
launch waits for its own compilation): 28 s of a 37 s run on an H100 (2026-12-06). Most of a compilation is in
subprocesses (ptxas, the C build of the launcher) and in LLVM, which threads can overlap.

How (`precompile`): each given call runs once with Triton's `jit_cache_hook` set, so every kernel variant this
process has not compiled yet is recorded (its specialisation) instead of compiled and launched: that pass computes
nothing useful (the kernels' outputs stay unwritten) and its result is dropped. Its other work is real: the first
calls of cuDNN, cuBLAS and flash attention set themselves up, which is what a CUDA graph's eager warm-up is for
(so `fast.compile_kernels` lets the graphs capture at their first call). The recorded variants are then
compiled, or read from the disk cache, by `JITFunction.preload` in a pool of threads, then loaded onto the GPU. The
real calls that follow find them compiled.

The compilations overlap; loading a kernel and building its launcher (`_init_handles`) happen one at a time (a
lock), while the other threads go on compiling. Triton loads each launcher as a C extension module, all of one name
(`__triton_launcher`), and kernels of one signature share a launcher file. Seen on an H100 (2026-12-06, Triton 3.6,
CPython 3.12) with the loading in threads: the first launch of the frame-attention kernel failed with `TypeError:
function takes exactly 33 arguments (25 given)`, 33 being the arity of a GroupNorm kernel's launcher. The likely
mechanism: when CPython loads such a file a second time, it reuses the one module object registered under that name
and refreshes its `launch`, so two threads doing this at once can hand a kernel another kernel's launcher. Where
this Triton lacks the hook or `preload`, or anything in it fails, nothing is lost: the kernels compile at their
first launch, as without it.

Official implementation: none. Same results: it only fills the caches the first launch would fill (the graph and
kernel tests run after it in `lvd.generate`).
"""
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

log = logging.getLogger(__name__)


def precompile(calls, workers=None):
    """calls: [(fn, args)], each run once with its kernel launches recorded (result dropped). Compiles the recorded
    variants in `workers` threads (default: the CPU count). -> (variants, seconds, whether the calls ran)."""
    try:
        import triton
        from triton.runtime.jit import JITFunction
        hook_owner = triton.knobs.runtime
    except (ImportError, AttributeError):
        return 0, 0.0, False
    if not hasattr(JITFunction, "preload") or not hasattr(hook_owner, "jit_cache_hook"):
        return 0, 0.0, False
    t0, seen = time.perf_counter(), {}

    def record(*, key, fn, compile, **_):
        seen.setdefault((id(fn.jit_function), str(key)), (fn.jit_function, compile["specialization_data"]))
        return True  # skip the compilation and the launch

    old, hook_owner.jit_cache_hook = hook_owner.jit_cache_hook, record
    try:
        for fn, args in calls:
            fn(*args)
    except Exception as e:  # noqa: BLE001 (a pass that cannot run recorded: compile at first launch instead)
        log.warning("precompile: the recording pass failed (%s: %s); kernels compile at first launch",
                    type(e).__name__, e)
        return 0, time.perf_counter() - t0, False
    finally:
        hook_owner.jit_cache_hook = old
    device = torch.cuda.current_device()

    one_at_a_time = threading.Lock()

    def build(item):
        torch.cuda.set_device(device)
        kernel = item[0].preload(item[1])  # compiled, or read from the disk cache
        init = getattr(kernel, "_init_handles", None)  # load onto the GPU, build and load the launcher
        if init is not None:
            with one_at_a_time:  # see the module docstring
                init()

    try:
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            list(pool.map(build, seen.values()))
    except Exception as e:  # noqa: BLE001 (the rest compile at their first launch)
        log.warning("precompile: %s: %s; the remaining kernels compile at first launch", type(e).__name__, e)
    return len(seen), time.perf_counter() - t0, True

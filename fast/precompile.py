"""Compile the fast layer's Triton kernels in parallel at the first call of a run.

What to read: fast/kernels.py (the kernels); results/perf-notes.md (the first-run times).

Why: with an empty kernel cache, the first 256×256×16 run compiled about 90 kernel variants one after another (each
launch waits for its own compilation): 28 s of a 37 s run on an H100 (2026-12-06). Most of a compilation is in
subprocesses (ptxas, the C build of the launcher) and in LLVM, which threads can overlap.

How (`first_run`, a CUDA graph's eager first call in `GraphCache`): the call runs once with Triton's
`jit_cache_hook` set, so every kernel variant this process has not compiled yet is recorded (its specialisation)
instead of compiled and launched. Where it recorded none (the kernels were compiled by an earlier call), that run
was the real one and its result is returned: nothing is done twice. Else its result is dropped (the skipped
kernels' outputs stay unwritten), and the recorded variants are compiled, or read from the disk cache, by
`JITFunction.preload` in a pool of threads and loaded onto the GPU. The run's other work was real (the first calls
of cuDNN and cuBLAS set themselves up), so the graph captures at once, finding the kernels compiled: a call whose
kernels had to be compiled costs one eager run, as one whose kernels were compiled does (a recording pass before
the first step cost one pass and one step more per video: `results/perf-notes.md`, 2026-12-06).

The compilations overlap; loading a kernel and building its launcher (`_init_handles`) happen one at a time (a
lock), while the other threads go on compiling. Triton loads each launcher as a C extension module, all of one name
(`__triton_launcher`), and kernels of one signature share a launcher file. Seen on an H100 (2026-12-06, Triton 3.6,
CPython 3.12) with the loading in threads: the first launch of the frame-attention kernel failed with `TypeError:
function takes exactly 33 arguments (25 given)`, 33 being the arity of a GroupNorm kernel's launcher. The likely
mechanism: when CPython loads such a file a second time, it reuses the one module object registered under that name
and refreshes its `launch`, so two threads doing this at once can hand a kernel another kernel's launcher. Where
this Triton lacks the hook or `preload`, or anything in it fails, nothing is lost: the kernels compile at their
first launch, as without it.

Where an earlier run built them (`key`): the recording pass costs more than it saves once the variants are in the
disk cache. Each skipped launch still goes through Triton's launch path and the hook (about 1,200 of them in a
256×256×16 guidance pass), and the run's other work is done and dropped. On an H100 (2026-12-07, 256×256×16, the
kernel cache filled, runs alternated; results/perf-notes.md) `generate` took 3.5–3.8 s with plain eager warm-ups
against 3.9–4.4 s with the recording pass. So `first_run` records only where no marker says that a run of the
same key (the call, its input shapes, the fast settings, the model config, the GPU, torch, Triton and the
kernels' sources) built its variants. A marker is a small file in Triton's cache folder, `lvd-built/`. It goes
where that folder goes, so a fresh cache is recorded again. Where a marker outlives some of the kernels, those
kernels compile at their first launch.

Official implementation: none. Same results: it only fills the caches the first launch would fill
(tests/test_graphs.py).
"""
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

log = logging.getLogger(__name__)


def first_run(fn, args, workers=None, on_build=None, key=None):
    """A first fn(*args) with the Triton kernel variants it launches compiled in parallel. The run records (and
    skips) each launch of a variant this process has not compiled yet. Where it recorded none, it was a real run.
    Else its result is dropped, the recorded variants are compiled in `workers` threads (default: the CPU count),
    and the caller runs fn again, or captures it in a CUDA graph at once: the run has set up cuDNN and cuBLAS as
    an eager warm-up does. on_build: callable(n), called before n variants are built (progress). key: `run_key`'s
    tuple, or None; where a marker says an earlier run built this key's variants, fn just runs (see the module
    docstring), and a build that went through leaves the marker.
    -> (result or None, whether the result is real, variants compiled, seconds on them)."""
    if key is not None and os.path.exists(marker_path(key)):
        return fn(*args), True, 0, 0.0
    try:
        import triton
        from triton.runtime.jit import JITFunction
        hook_owner = triton.knobs.runtime
        able = hasattr(JITFunction, "preload") and hasattr(hook_owner, "jit_cache_hook")
    except (ImportError, AttributeError):
        able = False
    if not able:  # this Triton cannot record: the kernels compile at their first launch
        return fn(*args), True, 0, 0.0
    t0, seen = time.perf_counter(), {}

    def record(*, key, fn, compile, **_):
        seen.setdefault((id(fn.jit_function), str(key)), (fn.jit_function, compile["specialization_data"]))
        return True  # skip the compilation and the launch

    old, hook_owner.jit_cache_hook = hook_owner.jit_cache_hook, record
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001 (a call that cannot run recorded: compile at first launch instead)
        log.warning("precompile: the recording run failed (%s: %s); kernels compile at first launch",
                    type(e).__name__, e)
        seen = None
    finally:
        hook_owner.jit_cache_hook = old
    if seen is None:
        return fn(*args), True, 0, time.perf_counter() - t0
    if not seen:
        return out, True, 0, 0.0  # every launch ran
    del out  # computed with launches skipped
    if on_build is not None:
        on_build(len(seen))
    n, built = _build(seen.values(), workers)
    if built and key is not None:
        _mark(key)
    return None, False, n, time.perf_counter() - t0


def _build(items, workers=None):
    """Compile (or read from the disk cache) and load each recorded (JITFunction, specialisation) in threads.
    -> (how many were given, whether all went through)."""
    items = list(items)
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    one_at_a_time = threading.Lock()

    def build(item):
        if device is not None:
            torch.cuda.set_device(device)  # each thread's current device is its own
        kernel = item[0].preload(item[1])  # compiled, or read from the disk cache
        init = getattr(kernel, "_init_handles", None)  # load onto the GPU, build and load the launcher
        if init is not None:
            with one_at_a_time:  # see the module docstring
                init()

    try:
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            list(pool.map(build, items))
    except Exception as e:  # noqa: BLE001 (the rest compile at their first launch)
        log.warning("precompile: %s: %s; the remaining kernels compile at first launch", type(e).__name__, e)
        return len(items), False
    return len(items), True


def run_key(model, fn, args):
    """What decides the kernel variants that fn(*args) launches on `model` (a UNet with the fast layer): the
    call, its inputs' shapes, dtypes and devices, the fast settings, the model's config, the GPU, torch, Triton
    and the kernels' sources. -> a tuple (its repr names the marker)."""
    import triton
    sources = hashlib.sha256()
    for name in ("kernels.py", "kernels_rows.py", "kernels_attention.py"):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            sources.update(f.read())
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    cards = sorted({torch.cuda.get_device_name(a.device) for a in tensors if a.is_cuda})
    inputs = tuple((tuple(a.shape), str(a.dtype), str(a.device)) if isinstance(a, torch.Tensor) else repr(a)
                   for a in args)
    return (getattr(fn, "__qualname__", type(fn).__name__), inputs, getattr(model, "_fast_settings", None),
            repr(getattr(model, "config", None)), cards, torch.__version__, getattr(triton, "__version__", None),
            sources.hexdigest())


def marker_path(key):
    """The marker of `key`: a file in `lvd-built/` of Triton's cache folder (TRITON_CACHE_DIR, default
    ~/.triton/cache), or in LVD_KERNEL_MARKERS where that is set (the tests: a folder of their own)."""
    folder = os.environ.get("LVD_KERNEL_MARKERS")
    if not folder:
        try:
            import triton
            root = triton.knobs.cache.dir
        except (ImportError, AttributeError):
            root = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
        folder = os.path.join(root, "lvd-built")
    return os.path.join(folder, hashlib.sha256(repr(key).encode()).hexdigest()[:32])


def _mark(key):
    """Write `key`'s marker (atomically; where it cannot be written, later runs record again)."""
    path = marker_path(key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(repr(key) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("precompile: could not write %s (%s); the next run records its kernels again", path, e)

"""The fast path: the two UNet calls that repeat with the same shapes, replayed from CUDA graphs.

What to read: `lvd-method.md` §4.1 and §4.6 (per video: 40 CFG UNet steps and up to 10 × 5 guidance passes, each
a cond-only forward and a backward to the latents, all of one shape); results/perf-notes.md (the measurements).

Official implementation: none; the official code runs both eagerly. Same results: a graph replays the kernels
that the eager call launched (tests/test_graphs.py compares them on CUDA).

Why: the guidance pass launches about 5.5k kernels. On the H200 of 2026-12-01 the CPU took 183 ms to issue a
256×256×16 pass whose kernels ran for 58 ms, so the GPU mostly waited (at 576×320×24: 190 ms issue, 169 ms of
kernels). A replayed graph issues everything at once.

How (`Graphed`): the first call with a new signature (shapes, dtypes, devices of the inputs) runs `fn` eagerly on a
side stream (a warm-up whose result is returned; cuBLAS/cuDNN set themselves up outside any capture); the second
captures `fn` into a graph over static input buffers; from then on a call copies its inputs into the buffers,
replays, and returns clones of the static outputs. A `GraphCache`'s warm-ups compile their Triton kernels in
parallel (precompile.py's `first_run`); a warm-up that had kernels to compile drops its result, and the graph
captures at once (that call then replays). One side stream serves all of a Graphed's warm-ups (and all of a
GraphCache's): cuBLAS keeps a workspace per stream it has run on, so a new stream per warm-up would leave one more
workspace allocated each time. Cloning at once is what makes one memory pool safe to share between graphs (the CFG
step's and the guidance pass's) that replay interleaved: whatever one graph leaves in the pool is dead before the
other runs. Without CUDA, or with `enabled=False`, `fn` runs directly.

`GraphCache` keeps one model's graphs across `generate` calls (a notebook's second video of the same shape replays
at once): the CFG step's per input signature, and the guidance pass of the latest guidance set-up, captured again
when its masks, token positions or parameters change (they are constants of the graph).

`fn` must take and return tensors only, and do no host synchronisation (`.item()`, `int(tensor)`, copies of
non-pinned CPU tensors): everything that depends on host values (the masks' top-k sizes, the token positions)
is fixed before the first call.
"""
import contextlib

import torch


@contextlib.contextmanager
def cudnn_benchmark(enabled=True):
    """torch.backends.cudnn.benchmark inside the block, restored after: cuDNN times its algorithms at each new
    convolution shape on its first, eager call (here a graph's warm-up) and keeps the fastest for the process.
    It pays where many calls of one size follow (batch.py; bench.py measures the steady state with it); the
    timing itself costs time on the first calls, and the choice may differ between runs in the last bits."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = old or enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def graph_pool():
    """A memory pool for graphs that are replayed one at a time (None without CUDA)."""
    return torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None


class Graphed:
    """fn(*tensors) -> tensor or tuple of tensors, replayed from a CUDA graph per input signature.

    enabled: False runs fn directly (the reference path). pool: `graph_pool()` to share with other graphs.
    first: callable(fn, args) -> (fn's result, whether it is real), run for the eager warm-up instead of fn(*args);
    where the result is not real (the warm-up compiled kernels), the call captures and replays at once.
    `stats` counts 'eager' calls (warm-ups whose result is returned), 'recorded' (warm-ups whose result was
    dropped), 'captured' and 'replayed'.
    """

    def __init__(self, fn, enabled=True, pool=None, stream=None, first=None):
        self.fn, self.enabled, self.pool, self.stream, self.first = fn, enabled, pool, stream, first
        self.graphs, self.warm = {}, set()
        self.stats = {"eager": 0, "recorded": 0, "captured": 0, "replayed": 0}

    @staticmethod
    def signature(args):
        return tuple((tuple(a.shape), a.dtype, a.device) for a in args)

    def __call__(self, *args):
        if not (self.enabled and all(a.is_cuda for a in args)):
            self.stats["eager"] += 1
            return self.fn(*args)
        key = self.signature(args)
        if key not in self.warm:
            self.warm.add(key)
            out, real = self._side_stream(args)
            if real:
                self.stats["eager"] += 1
                return out
            self.stats["recorded"] += 1  # its result dropped, its set-up done: capture now
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
            self.stats["captured"] += 1
        graph, inputs, outputs, is_tuple = self.graphs[key]
        for buf, a in zip(inputs, args):
            buf.copy_(a)
        graph.replay()
        self.stats["replayed"] += 1
        out = tuple(o.clone() for o in outputs)
        return out if is_tuple else out[0]

    def _side_stream(self, args):
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        side = self.stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = (self.fn(*args), True) if self.first is None else self.first(self.fn, args)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, args):
        inputs = [a.detach().clone() for a in args]
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's cached blocks: not held twice beside the graph's own pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*inputs)
        is_tuple = isinstance(out, tuple)
        return graph, inputs, out if is_tuple else (out,), is_tuple

    def reset(self):
        """Drop the captured graphs (and the memory they hold)."""
        self.graphs.clear()
        self.warm.clear()


class GraphCache:
    """One model's graphs, kept across `generate` calls in one memory pool: the CFG step (`cfg_step`) and the
    guidance pass of the latest guidance set-up (`guidance_pass`). `release()` frees them and their memory."""

    def __init__(self, unet):
        self.unet, self.pool = unet, graph_pool()
        self.stream = torch.cuda.Stream() if self.pool is not None else None  # the warm-ups' side stream
        self.cfg, self.guide, self.guidance = None, None, None
        self.compiled = {"variants": 0, "seconds": 0.0}  # Triton kernels compiled by the warm-ups (first_call)
        self.on_compile = None  # callable(n) as a warm-up starts building n kernel variants (generate's progress)

    def cfg_step(self):
        """The CFG step's UNet call (x (1, 4, f, h, w), t, text (2, 77, d)) -> eps (2, 4, f, h, w), as a Graphed."""
        if self.cfg is None:
            unet = self.unet
            self.cfg = Graphed(torch.no_grad()(lambda x, t, text: unet(x, t, text)), pool=self.pool, stream=self.stream,
                               first=self.first_call)
        return self.cfg

    def guidance_pass(self, guide):
        """Replay `guide`'s pass (attention.LatentGuidance) from a graph: the kept one where the last guidance had
        the same constants, else a new one (the old one freed). -> the Graphed, now `guide.run_pass`."""
        if self.guide is None or not same_pass(self.guide, guide):
            if self.guidance is not None:
                self.guidance.reset()
                self.guide.run_pass = self.guide._pass
            self.guide, self.guidance = guide, graph_guidance(guide, self.pool, self.stream, self.first_call)
        guide.run_pass = self.guidance
        return self.guidance

    def first_call(self, fn, args):
        """A graph's eager warm-up: where the model runs Triton kernels, the variants `fn` launches that this
        process lacks are compiled in parallel threads (precompile.first_run), unless a marker says that an earlier
        run built them: then fn runs as it is. -> (fn(*args) or None, whether the result is real: not where kernels
        were compiled)."""
        if getattr(self.unet, "_fast_settings", (None,) * 3)[1] != "triton":
            return fn(*args), True
        from fast.precompile import first_run, run_key
        out, real, n, seconds = first_run(fn, args, on_build=self.on_compile, key=run_key(self.unet, fn, args))
        self.compiled["variants"] += n
        self.compiled["seconds"] += seconds
        return out, real

    def release(self):
        for graphed in (self.cfg, self.guidance):
            if graphed is not None:
                graphed.reset()
        if self.guide is not None:
            self.guide.run_pass = self.guide._pass  # eager again (and no guide <-> graph reference cycle)
        self.cfg, self.guide, self.guidance = None, None, None


def graph_guidance(guide, pool=None, stream=None, first=None):
    """Replay a LatentGuidance's pass from a CUDA graph (a Graphed; eager where its inputs are not on CUDA): it
    becomes `guide.run_pass`. -> the Graphed, whose `reset()` frees the graph."""
    graphed = Graphed(guide._pass, pool=pool, stream=stream, first=first)
    guide.run_pass = graphed
    return graphed


def same_pass(a, b):
    """Whether two LatentGuidance passes run the same graph: same UNet, parameters, token positions and masks (the
    text embedding is an input of the pass, not a constant)."""
    return (a.unet is b.unet and a.params == b.params and a.token_positions == b.token_positions
            and a.masks.keys() == b.masks.keys()
            and all(torch.equal(torch.as_tensor(a.masks[k]), torch.as_tensor(b.masks[k])) for k in a.masks))

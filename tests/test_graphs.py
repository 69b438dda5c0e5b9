"""The CUDA graphs of the fast layer (fast/graphs.py) give what the eager calls give.

Oracle: the same function run eagerly (`enabled=False`), on the same inputs. The CUDA tests need a GPU: CI has
none and skips them (they are not counted as run there); they run on the device machine
(README: the GPU test command). The CPU tests check the fallback and
that nothing in the guidance pass needs a host value (the condition for capturing it).
"""
import os
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import attention as A
import fast
import lvd
import planner
from sampler import NoiseSchedule
from unet3d import UNet3D, UNet3DConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the device machine)")


pytestmark = pytest.mark.usefixtures("no_tf32")


SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _unet(device):
    torch.manual_seed(0)
    cfg = UNet3DConfig(block_out_channels=(64, 64, 128, 128), cross_attention_dim=32)
    return UNet3D(cfg).to(device).eval().requires_grad_(False)


def _guide(unet, cond, graphed, f=3, h=16, w=16, params=None, positions=([2], [4, 5])):
    boxes = [[(0.0, 0.5 - 0.1 * k, 0.4, 0.9 - 0.1 * k) for k in range(f)], [(0.55, 0.1, 0.95, 0.45)] * f]
    masks = A.layer_masks(boxes, (h, w))
    guide = A.LatentGuidance(unet, cond, masks, positions, NoiseSchedule.from_config(SCHEDULE),
                             params or A.GuidanceParams())
    if graphed:
        fast.graph_guidance(guide, fast.graph_pool())
    return guide


def test_without_cuda_the_function_runs_directly():
    calls = []
    g = fast.Graphed(lambda a, b: calls.append(1) or a + b)
    assert torch.equal(g(torch.ones(2), torch.ones(2)), torch.full((2,), 2.0))
    assert g.stats == {"eager": 1, "recorded": 0, "captured": 0, "replayed": 0} and calls == [1]


def test_kept_graphs_serve_only_a_pass_with_the_same_constants():
    """fast.graphs(unet) keeps one guidance pass: reused for a guide that differs only in its text (an input of the
    pass), captured anew for other masks, token positions or parameters; apply with other settings and remove
    drop the kept graphs. On the CPU the Graphed runs its function directly, so the reused pass is checked too."""
    unet = fast.apply(_unet("cpu"), kernels=None)
    cache = fast.graphs(unet)
    assert fast.graphs(unet) is cache and cache.cfg_step() is cache.cfg_step()
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    a, b = _guide(unet, cond, False), _guide(unet, 2 * cond, False)
    kept = cache.guidance_pass(a)
    assert cache.guidance_pass(b) is kept and b.run_pass is kept
    x = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    (l1, g1), (l0, g0) = b.loss_and_grad(x, 500), _guide(unet, 2 * cond, False).loss_and_grad(x, 500)
    assert torch.equal(g1, g0) and torch.equal(l1, l0)  # b's text, through a's pass
    for other in (_guide(unet, cond, False, h=24), _guide(unet, cond, False, positions=([2], [4])),
                  _guide(unet, cond, False, params=A.GuidanceParams(loss_scale=7.0))):
        new = cache.guidance_pass(other)
        assert new is not kept and other.run_pass is new
        kept = new
    assert a.run_pass == a._pass  # a replaced guide runs eagerly again
    out, real = cache.first_call(lambda v: v + 1, (x,))  # no Triton kernels: the warm-up is fn itself
    assert real and out.equal(x + 1)
    assert cache.compiled == {"variants": 0, "seconds": 0.0}
    fast.apply(unet, kernels=None)  # the same settings: kept
    assert fast.graphs(unet) is cache
    fast.apply(unet, memory="full", kernels=None)  # other settings: dropped
    assert fast.graphs(unet) is not cache and other.run_pass == other._pass
    fast.remove(unet)
    assert "_graphs" not in unet.__dict__ and "_fast_settings" not in unet.__dict__


class FakeKernel:
    """A JITFunction as precompile sees it: a launch of a variant not yet compiled asks Triton's jit_cache_hook,
    which may skip it (no compilation, no launch); `preload` compiles a variant."""

    def __init__(self, runtime):
        self.runtime, self.compiled, self.preloaded = runtime, set(), []

    def preload(self, spec):
        self.preloaded.append(spec)
        self.compiled.add(spec)
        return types.SimpleNamespace(_init_handles=lambda: None)

    def launch(self, spec):
        """-> whether the kernel ran"""
        hook = self.runtime.jit_cache_hook
        if spec not in self.compiled and hook is not None and \
                hook(key=spec, fn=types.SimpleNamespace(jit_function=self), compile={"specialization_data": spec}):
            return False
        self.compiled.add(spec)
        return True


def fake_triton(monkeypatch):
    """Triton as precompile sees it (the hook's owner, JITFunction with `preload`), in sys.modules for the test.
    -> the runtime knobs (jit_cache_hook)"""
    runtime = types.SimpleNamespace(jit_cache_hook=None)
    jit = types.ModuleType("triton.runtime.jit")
    jit.JITFunction = FakeKernel
    triton = types.ModuleType("triton")
    triton.knobs, triton.runtime = types.SimpleNamespace(runtime=runtime), types.ModuleType("triton.runtime")
    triton.runtime.jit = jit
    for name, module in (("triton", triton), ("triton.runtime", triton.runtime), ("triton.runtime.jit", jit)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no CUDA initialisation beside a fake Triton
    return runtime


def test_a_marker_skips_the_recording_where_an_earlier_run_built_the_kernels(monkeypatch, tmp_path):
    """first_run with a key: a first call records, builds and leaves the key's marker; a later call of that key in
    a process that has compiled nothing runs fn as it is (no hook set, its result real); another key records again;
    a build that fails leaves no marker. Markers lie in Triton's cache folder unless LVD_KERNEL_MARKERS is set."""
    from fast.precompile import first_run, marker_path
    runtime, hooked = fake_triton(monkeypatch), []
    kernel = FakeKernel(runtime)

    def fn(a):
        hooked.append(runtime.jit_cache_hook is not None)
        ran = [kernel.launch(spec) for spec in ("v1", "v2")]
        return a * 2 if all(ran) else "unwritten"
    key, other = ("cfg", ((1, 4, 2, 8, 8),)), ("cfg", ((1, 4, 3, 8, 8),))
    assert not os.path.exists(marker_path(key))
    assert first_run(fn, (3,), key=key)[:3] == (None, False, 2) and os.path.exists(marker_path(key))
    kernel.compiled.clear()  # a new process
    assert first_run(fn, (3,), key=key) == (6, True, 0, 0.0) and hooked == [True, False]
    assert kernel.compiled == {"v1", "v2"}  # compiled at their first launch
    kernel.compiled.clear()
    assert first_run(fn, (3,), key=other)[:3] == (None, False, 2) and hooked[-1]
    broken, third = FakeKernel(runtime), ("cfg", ((1, 4, 4, 8, 8),))
    broken.preload = lambda spec: 1 / 0
    assert first_run(lambda a: broken.launch("v3") and a, (1,), key=third)[:3] == (None, False, 1)
    assert not os.path.exists(marker_path(third))
    assert marker_path(key).startswith(str(tmp_path))  # conftest: this test's own folder
    monkeypatch.delenv("LVD_KERNEL_MARKERS")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    assert marker_path(key).startswith(os.path.join(str(tmp_path / "triton"), "lvd-built", ""))


def test_the_marker_key_names_the_call_its_shapes_and_the_settings():
    """precompile.run_key: equal for the same call on inputs of the same shapes, different for another shape,
    another call or other fast settings."""
    from fast.precompile import run_key
    unet = fast.apply(_unet("cpu"), kernels=None)
    x, y = torch.zeros(1, 4, 2, 8, 8), torch.zeros(1, 4, 3, 8, 8)

    def cfg(x):
        return x

    def other(x):
        return x
    key = run_key(unet, cfg, (x,))
    assert run_key(unet, cfg, (x.clone(),)) == key and run_key(unet, cfg, (y,)) != key
    assert run_key(unet, other, (x,)) != key
    fast.apply(unet, memory="full", kernels=None)
    assert run_key(unet, cfg, (x,)) != key


def test_first_run_keeps_its_result_only_where_nothing_was_left_to_compile(monkeypatch):
    """The warm-up protocol (precompile.first_run) on a fake Triton: uncompiled variants are recorded and skipped,
    then compiled in threads, and the result is dropped; with all compiled, one run and its result; a call that
    fails while recording runs again plainly; the hook is put back each time."""
    from fast.precompile import first_run
    runtime = fake_triton(monkeypatch)
    kernel, runs = FakeKernel(runtime), []

    def fn(a):
        ran = [kernel.launch(spec) for spec in ("v1", "v2", "v1")]
        runs.append(all(ran))
        return a * 2 if all(ran) else "unwritten"  # what skipped launches leave
    builds = []
    assert first_run(fn, (3,), workers=2, on_build=builds.append)[:3] == (None, False, 2)
    assert runs == [False] and sorted(kernel.preloaded) == ["v1", "v2"] and runtime.jit_cache_hook is None
    assert builds == [2]  # the progress is told before the build
    assert first_run(fn, (4,), on_build=builds.append) == (8, True, 0, 0.0) and runs == [False, True]
    assert builds == [2]  # nothing built, nothing told

    unet = fast.apply(_unet("cpu"), kernels=None)
    unet._fast_settings = ("cheap", "triton", True)  # as on CUDA with the kernels: GraphCache's warm-up records
    cache = fast.graphs(unet)
    cache.on_compile = builds.append
    kernel.compiled.clear()
    assert cache.first_call(fn, (5,)) == (None, False) and builds == [2, 2] and cache.compiled["variants"] == 2
    assert cache.first_call(fn, (5,)) == (10, True) and builds == [2, 2]

    def fails_recorded(a):
        if runtime.jit_cache_hook is not None:
            raise RuntimeError("a host read of an unwritten output")
        return a + 1
    assert first_run(fails_recorded, (1,))[:3] == (2, True, 0) and runtime.jit_cache_hook is None


class HostTraffic(TorchDispatchMode):
    """Records every op on the meta device that reads a value to the host or takes a CPU tensor (a copy to the
    device): what CUDA-graph capture refuses."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if func is torch.ops.aten._local_scalar_dense.default or \
                (any(t.device.type == "cpu" for t in tensors) and any(t.is_meta for t in tensors)):
            self.seen.append(str(func))
        return func(*args, **kwargs)


def test_cudnn_benchmark_holds_inside_the_block_and_is_restored():
    old = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with fast.cudnn_benchmark(True):
            assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cudnn.benchmark is False
        with pytest.raises(RuntimeError), fast.cudnn_benchmark(True):
            raise RuntimeError("a failed run")
        assert torch.backends.cudnn.benchmark is False
        with fast.cudnn_benchmark(False):
            assert torch.backends.cudnn.benchmark is False
        torch.backends.cudnn.benchmark = True  # a caller's own setting is kept
        with fast.cudnn_benchmark(False):
            assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = old


def test_the_guidance_pass_needs_no_host_value():
    """Capture fails on any device -> host read (int(t), .item()); on the meta device, which has no values, the
    pass runs end to end and HostTraffic records each such read. (Host -> device copies made inside tensor
    creation, e.g. an index list, do not reach the dispatcher: the CUDA tests below catch those.)"""
    unet = fast.apply(_unet("cpu"), memory="cheap", kernels=None).to("meta")  # the reference, and the fast forwards
    cond = torch.randn(1, 77, 32, device="meta")
    guide = _guide(unet, cond, graphed=False)
    guide._masks_on(torch.device("meta"), torch.float32)  # once per video, before any capture
    with HostTraffic() as mode:
        loss, g, *maps = guide._pass(torch.randn(1, 4, 3, 16, 16, device="meta"), torch.tensor(974, device="meta"),
                                     cond)
    assert mode.seen == []
    assert loss.shape == () and g.shape == (1, 4, 3, 16, 16) and len(maps) == 6
    with HostTraffic() as mode:  # the detector itself: a host read is caught
        with pytest.raises(RuntimeError):
            int(torch.randn(3, 4, device="meta").sum())
    assert mode.seen == ["aten._local_scalar_dense.default"]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@cuda
@pytest.mark.parametrize("mode", ["off", "cheap", "full"])
def test_graphed_guidance_pass_equals_the_eager_pass(mode):
    """The oracle is eager itself: the graph must be as close to an eager pass as a second eager pass is (GPU
    backward kernels may add in any order), and within 1e-5 (fp32 rounding) where eager happens to repeat exactly."""
    unet = fast.apply(_unet("cuda"), memory=mode, kernels=None)
    cond = torch.randn(1, 77, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    eager, again, graphed = (_guide(unet, cond, graphed=k) for k in (False, False, True))
    gen = torch.Generator("cuda").manual_seed(2)
    for k, t in enumerate((999, 974, 949, 924)):  # warm-up, capture + replay, replays with new inputs
        x = torch.randn(1, 4, 3, 16, 16, device="cuda", generator=gen)
        (l0, g0), (l1, g1), (l2, g2) = (guide.loss_and_grad(x, t) for guide in (eager, again, graphed))
        floor = max(10 * rel(g1, g0), 1e-5)
        assert rel(g2, g0) <= floor, (k, rel(g2, g0), rel(g1, g0))
        assert abs(float(l2) - float(l0)) <= max(10 * abs(float(l1) - float(l0)), 1e-5 * abs(float(l0))), k
        for p in A.GUIDED_LAYERS:
            assert rel(graphed.last_maps[p], eager.last_maps[p]) <= max(10 * rel(again.last_maps[p], eager.last_maps[p]),
                                                                     1e-5), (k, p)
    assert graphed.run_pass.stats == {"eager": 1, "recorded": 0, "captured": 1, "replayed": 3}


@cuda
@pytest.mark.parametrize("mode", ["off", "full"])
def test_graphed_video_equals_the_eager_video(tiny_model_dir, mode):
    """A whole guided video (4 steps, 4 × 5 passes forced) with and without the fast layer; the reference twice is
    the noise floor."""
    pipe = lvd.load_pipeline(tiny_model_dir, "cuda", torch.float32)
    layout = planner.plan("A bear walks from the left to the right")  # the shipped example layout
    params = A.GuidanceParams(loss_threshold=-1.0)  # every guided step runs all 5 iterations
    infos = []
    for on in (False, False, True):  # the reference twice, then the fast layer
        info = {}
        lvd.generate(pipe, layout.prompt, layout, 2, 64, 64, steps=4, guidance=params, info=info, fast=on,
                     memory=mode)
        infos.append(info)
    assert len(infos[2]["guidance_history"]) == 20
    (e0, e1, f) = (info["latents"] for info in infos)
    assert rel(f, e0) <= max(10 * rel(e1, e0), 1e-5), (rel(f, e0), rel(e1, e0))


@cuda
def test_a_second_video_replays_the_kept_graphs(tiny_model_dir):
    """generate keeps the fast layer's graphs on the UNet: a second video of the same shape and layout captures
    nothing (no eager warm-up either) and gives the first one's latents; another layout captures its pass anew.
    A graph's first call is its warm-up: where it compiled Triton kernels its result is dropped and the graph
    captures at once ('recorded'), else it is an eager call and the graph captures at its second."""
    import triton
    from fast import kernels, kernels_attention, kernels_rows
    for mod in (kernels, kernels_rows, kernels_attention):  # none compiled in this process: the first pass records
        for f in vars(mod).values():
            if isinstance(f, triton.runtime.jit.JITFunction):
                f.device_caches.clear()

    def warmed_once(stats, calls):
        r = stats["recorded"]
        return stats == {"eager": 1 - r, "recorded": r, "captured": 1, "replayed": calls - 1 + r}
    pipe = lvd.load_pipeline(tiny_model_dir, "cuda", torch.float32)
    layout = planner.plan("A bear walks from the left to the right")
    params = A.GuidanceParams(loss_threshold=-1.0)  # 4 steps × 5 passes

    stages = []

    def video(lay):
        info = {}
        lvd.generate(pipe, lay.prompt, lay, 2, 64, 64, steps=4, guidance=params, info=info, fast=True,
                     on_stage=stages.append)
        return info["latents"]
    first = video(layout)
    assert any(s.startswith("Triton kernels: ") for s in stages), stages  # the progress names the build
    cache = fast.graphs(pipe.unet)
    cfg, guidance = cache.cfg, cache.guidance
    assert warmed_once(cfg.stats, 4), cfg.stats  # recorded where its kernels were not all the guidance pass's
    assert cfg.stream is cache.stream and guidance.stream is cache.stream  # one side stream: one cuBLAS workspace
    assert guidance.stats == {"eager": 0, "recorded": 1, "captured": 1, "replayed": 20}
    assert cache.compiled["variants"] >= 8
    r = cfg.stats["recorded"]
    second = video(layout)
    assert cache.cfg is cfg and warmed_once(cfg.stats, 8) and cfg.stats["recorded"] == r
    assert cache.guidance is guidance and guidance.stats == {"eager": 0, "recorded": 1, "captured": 1, "replayed": 40}
    assert rel(second, first) <= 1e-5, rel(second, first)  # atomics in some backward kernels: fp32 rounding
    other = planner.plan("A realistic lively video of a scene with a car moving from the left to the right")
    video(other)
    assert cache.cfg is cfg and warmed_once(cfg.stats, 12) and cache.guidance is not guidance
    assert cache.guidance.stats == {"eager": 1, "recorded": 0, "captured": 1, "replayed": 19}  # kernels compiled
    assert cache.guidance.stream is cache.stream
    fast.release_graphs(pipe.unet)
    assert "_graphs" not in pipe.unet.__dict__


@cuda
def test_first_run_compiles_the_kernels_then_runs_once_where_they_are():
    """precompile.first_run (a GraphCache graph's warm-up) on the CFG step and the guidance pass: with none of
    the kernels compiled in this process, it records their variants without running them, compiles them in
    threads and drops the result; then it records nothing and its one run is real. A Graphed whose warm-up
    dropped its result captures at once. With a key, a build leaves a marker, and the next first run of that key
    in a process that has compiled nothing runs at once. All results are what first launches give."""
    import triton
    from fast import kernels, kernels_attention, kernels_rows
    from fast.precompile import first_run
    jitted = [f for mod in (kernels, kernels_rows, kernels_attention) for f in vars(mod).values()
              if isinstance(f, triton.runtime.jit.JITFunction)]
    x = torch.randn(1, 4, 3, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    text = torch.randn(2, 77, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    t = torch.tensor(500, device="cuda")

    def run(unet, guide, x):
        with torch.no_grad():
            y = unet(x, t, text)
        return y, guide._pass(x, t, text[1:])[1]

    def forget_kernels():  # this process has compiled none of them (the disk cache may hold them)
        for f in jitted:
            f.device_caches.clear()
    forget_kernels()
    unet = fast.apply(_unet("cuda"), kernels="triton")
    guide, runs = _guide(unet, text[1:], False), []
    out, real, n, _ = first_run(lambda x: runs.append(1) or run(unet, guide, x), (x,))
    assert out is None and not real and n >= 8 and len(runs) == 1, (n, runs)  # GroupNorm, LayerNorm, GEGLU, ...
    (y1, g1), real, n1, seconds = first_run(lambda x: runs.append(1) or run(unet, guide, x), (x,))
    assert (real, n1, seconds, len(runs)) == (True, 0, 0.0, 2)  # nothing left to compile: one run, its result kept
    forget_kernels()
    graphed = fast.Graphed(lambda x: run(unet, guide, x), first=lambda fn, args: first_run(fn, args)[:2])
    y2, g2 = graphed(x)
    assert graphed.stats == {"eager": 0, "recorded": 1, "captured": 1, "replayed": 1}
    key = ("both", tuple(x.shape))
    forget_kernels()
    assert first_run(lambda x: run(unet, guide, x), (x,), key=key)[:2] == (None, False)  # built: the marker
    forget_kernels()  # as in a new process: the marker says the disk cache holds them
    (y3, g3), real, n3, _ = first_run(lambda x: run(unet, guide, x), (x,), key=key)
    assert (real, n3) == (True, 0)
    forget_kernels()
    other = fast.apply(_unet("cuda"), kernels="triton")  # the same weights, compiled at first launch
    y0, g0 = run(other, _guide(other, text[1:], False), x)
    for a, b in ((y1, y0), (y2, y0), (y3, y0)):
        assert rel(a, b) <= 1e-6, rel(a, b)
    for a, b in ((g1, g0), (g2, g0), (g3, g0)):
        assert rel(a, b) <= 1e-5, rel(a, b)  # atomics in some backward kernels

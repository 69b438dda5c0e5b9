"""The fused GroupNorm (kernels.group_norm_fwd: statistics, merge, apply) on every GroupNorm shape of the 576×320×24
CFG step, against the memory bandwidth, for a sweep of its launch settings; and the flat kernels' int32 index.

What to read: kernels.py, results/perf-notes.md (seventh session: what this measured, what was kept).

Each case is replayed from a CUDA graph (20 calls, as the UNet runs it: no launch gaps of the CPU), median ms per
call. Settings: kernels._BLOCK_S (rows per statistics tile), _PROGRAMS (about this many statistics programs: fewer
row blocks per program, more chunks for the merge), _STATS_WARPS, _FLAT (elements per apply program). Printed:
per shape its calls per CFG step, a copy's time (reads and writes x: the bandwidth bound is about a copy and a half),
the current setting's time and the best one; then per setting the total over the CFG step's 166 calls.
Then GEGLU's gate and the residual add at level 0 with int64 against int32 offsets (`kernels._wide`).
--backward: kernels.group_norm_bwd instead, on the calls of one 576×320×24 guidance pass (recorded from the 1.7B
UNet with random weights: shape, SiLU, add, residual), for a sweep of _GRAD_BLOCK_S, _GRAD_PROGRAMS, _GRAD_WARPS.

Usage: python scripts/bench_groupnorm.py [--backward] [--smoke]   (--smoke: Triton's interpreter on the CPU, two
small shapes)
"""
import itertools
import os
import statistics
import sys

import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import kernels  # noqa: E402

# (n, s, c): calls per CFG step at 576×320×24 (batch 2), counted on the meta device (every group_norm call)
SHAPES = {(2, 69120, 320): 21, (2, 17280, 640): 25, (48, 2880, 320): 11, (2, 4320, 1280): 25, (48, 720, 640): 11,
          (48, 2880, 640): 2, (48, 2880, 960): 1, (48, 180, 1280): 11, (1, 69120, 320): 5, (2, 1080, 1280): 29,
          (48, 720, 1920): 1, (24, 2880, 320): 2, (48, 180, 2560): 2, (48, 720, 1280): 1, (48, 45, 1280): 12,
          (48, 720, 960): 1, (48, 45, 2560): 3, (48, 180, 1920): 1, (48, 720, 320): 1, (48, 180, 640): 1}
NOW = dict(_BLOCK_S=32, _PROGRAMS=1024, _STATS_WARPS=4, _FLAT=2048)
SWEEP = [dict(_BLOCK_S=bs, _PROGRAMS=p, _STATS_WARPS=w, _FLAT=2048)
         for bs, p, w in itertools.product((16, 32, 64), (1024, 2048, 4096), (2, 4, 8))]

GRAD_NOW = dict(_GRAD_BLOCK_S=16, _GRAD_PROGRAMS=1024, _GRAD_WARPS=2)
GRAD_SWEEP = [dict(_GRAD_BLOCK_S=bs, _GRAD_PROGRAMS=p, _GRAD_WARPS=w)
              for bs, p, w in itertools.product((16, 32, 64), (512, 1024, 2048, 4096), (2, 4, 8))]


def graph_ms(fn, calls=20, runs=10):
    """Median ms per call of fn replayed `calls` times from one CUDA graph (CUDA events around each replay)."""
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def with_settings(settings, fn):
    old = {k: getattr(kernels, k) for k in settings}
    for k, v in settings.items():
        setattr(kernels, k, v)
    try:
        return fn()
    finally:
        for k, v in old.items():
            setattr(kernels, k, v)


def pass_calls(f=24, h=320, w=576):
    """{(n, s, c, silu, add, residual): calls} of group_norm_bwd in one guidance pass (`LatentGuidance`, as
    generate runs it) of the 1.7B UNet, fp16, random weights."""
    import attention
    from unet3d import UNet3D, UNet3DConfig
    with torch.device("cuda"):
        unet = UNet3D(UNet3DConfig()).half().eval().requires_grad_(False)
    unet.fuse_(True)
    calls = {}
    for k in {id(m.fused): m.fused for m in unet.modules() if getattr(m, "fused", None) is not None}.values():
        def record(g, x, weight, bias, add, mean, rstd, groups, silu, residual=None, bwd=k.gn_bwd):
            key = (*x.shape, silu, add is not None, residual is not None)
            calls[key] = calls.get(key, 0) + 1
            return bwd(g, x, weight, bias, add, mean, rstd, groups, silu, residual)
        k.gn_bwd = record
    cond = torch.randn(1, 77, 1024, device="cuda", dtype=torch.half)
    masks = attention.layer_masks([[[0.0, 0.5, 0.2, 0.7]] * f], (h // 8, w // 8))
    guide = attention.LatentGuidance(unet, cond, masks, [[1]], [0.5] * 1000, attention.GuidanceParams())
    guide.loss_and_grad(torch.randn(1, 4, f, h // 8, w // 8, device="cuda", dtype=torch.half), 999)
    return calls


def sweep_case(run, sweep, now, count, totals):
    """Times run() under every setting of `sweep` (each checked against the current setting's result), adds
    count × time to `totals` -> (the time under `now`, the best time, the best setting)."""
    ref = run().float()
    times = []
    for i, st in enumerate(sweep):
        err = ((with_settings(st, run).float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-2, (st, err)
        times.append(with_settings(st, lambda: graph_ms(run)))
        totals[i] += count * times[-1]
    best = min(range(len(sweep)), key=lambda i: times[i])
    return times[sweep.index(now)] if now in sweep else float("nan"), times[best], _named(sweep[best])


def print_totals(label, sweep, now, totals):
    print(f"\n{label}, by setting:")
    for i in sorted(range(len(sweep)), key=lambda i: totals[i]):
        print(f"  {totals[i]:7.3f} ms  {_named(sweep[i])}{'  (now)' if sweep[i] == now else ''}")


def _named(settings):
    return {k[1:]: v for k, v in settings.items()}  # without the leading underscore


def backward(smoke):
    """The backward sweep (--backward)."""
    dev = "cpu" if smoke else "cuda"
    calls = {(2, 150, 64, True, True, False): 1, (1, 300, 96, False, False, True): 1} if smoke else pass_calls()
    sweep = GRAD_SWEEP[:2] if smoke else GRAD_SWEEP
    totals = [0.0] * len(sweep)
    for (n, s, c, silu, has_add, has_r), count in sorted(calls.items(), key=lambda kv: -kv[0][1] * kv[0][2] * kv[1]):
        x, g = (torch.randn(n, s, c, device=dev) * 3 + 5).half(), torch.randn(n, s, c, device=dev).half()
        wt, b = torch.rand(c, device=dev).half() + 0.5, torch.randn(c, device=dev).half()
        a = torch.randn(n, 1, c, device=dev).half() if has_add else None
        r = torch.randn(n, s, c, device=dev).half() if has_r else None
        _, mean, rstd = kernels.group_norm_fwd(x, wt, b, a, 32, 1e-5, silu)
        now, best, setting = sweep_case(lambda: kernels.group_norm_bwd(g, x, wt, b, a, mean, rstd, 32, silu, r),
                                        sweep, GRAD_NOW, count, totals)
        print(f"{(n, s, c)} silu {silu:d} add {has_add:d} residual {has_r:d} x{count}: now {now:.3f} ms; best "
              f"{best:.3f} ms {setting}", flush=True)
    print_totals(f"per guidance pass ({sum(calls.values())} calls)", sweep, GRAD_NOW, totals)


def main():
    smoke = "--smoke" in sys.argv
    if not smoke:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, fp16")
    if "--backward" in sys.argv:
        return backward(smoke)
    dev = "cpu" if smoke else "cuda"
    shapes = {(2, 150, 64): 1, (1, 300, 96): 1} if smoke else SHAPES
    sweep = SWEEP[:2] if smoke else SWEEP
    totals = [0.0] * len(sweep)
    for (n, s, c), calls in shapes.items():
        x = (torch.randn(n, s, c, device=dev) * 3 + 5).half()
        wt, b = torch.rand(c, device=dev).half() + 0.5, torch.randn(c, device=dev).half()
        y = torch.empty_like(x)
        copy = graph_ms(lambda: y.copy_(x))
        now, best, setting = sweep_case(lambda: kernels.group_norm_fwd(x, wt, b, None, 32, 1e-5, True)[0], sweep, NOW,
                                        calls, totals)
        print(f"{(n, s, c)} x{calls}: copy {copy:.3f} ms; now {now:.3f} ms; best {best:.3f} ms {setting}", flush=True)
    print_totals("per CFG step (166 calls)", sweep, NOW, totals)
    if smoke:
        return
    h = torch.randn(138240, 2560, device=dev).half()
    a, bb, bias = torch.randn(2, 48, 2880, 320, device=dev).half(), None, torch.randn(320, device=dev).half()
    a, bb = a[0], a[1]
    print("\nlevel 0, int64 | int32 offsets:")
    for name, fn in (("GEGLU gate (138240, 2560)", lambda: kernels.geglu_fwd(h)),
                     ("residual add (48, 2880, 320)", lambda: kernels.add_bias(a, bb, bias))):
        t64 = with_settings({"_wide": lambda t: True}, lambda: graph_ms(fn))
        t32 = with_settings({"_wide": lambda t: False}, lambda: graph_ms(fn))
        print(f"  {name:30s} {t64:.3f} | {t32:.3f} ms")


if __name__ == "__main__":
    main()

"""Where the UNet's time goes on a GPU: a kernel-category profile of the CFG step and the guidance pass.

Usage (CUDA, real 1.7B config, random weights, fp16): python scripts/profile_unet.py [--sizes 24x320x576]

Prints, per size, the median ms of the CFG step (batch 2) and the truncated guidance pass (batch 1), and the
share of CUDA time per kernel category (matmul, convolution, attention, normalisation, elementwise, copies)
from torch.profiler, with the ten most expensive kernels. Used to pick the optimisations in
results/perf-notes.md; it is a measuring tool, not a benchmark (bench.py is). --fast profiles the fast layer
(`fast.apply`: fused kernels, channels-last, 'cheap'; eager, no CUDA graph, so the kernels show one by one);
--diffusers times diffusers' CFG step and the official guidance pass. It also prints the CPU time to issue each
call (near the GPU time: launch-bound).
"""
import argparse
import os
import re
import sys
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "scripts")):
    if p not in sys.path:
        sys.path.insert(0, p)

import attention  # noqa: E402
from bench import cuda_ms  # noqa: E402
from unet3d import UNet3D, UNet3DConfig  # noqa: E402

CATEGORIES = [  # (category, regex over the kernel name), first match wins
    ("fused (fast/kernels*.py)", r"^_(chunk_stats|group_affine|scale_shift|chunk_grad_sums|grad_coefficients|norm_grad|"
                           r"layer_norm|geglu|add|frames|linear)"),
    ("attention", r"flash|fmha|attention|softmax|cudnn.*sdpa|mha"),
    ("convolution", r"conv|implicit|wgrad|dgrad|fprop|winograd|nhwc|nchw"),
    ("matmul", r"gemm|sm90|cutlass|matmul|xmma|ampere|hopper"),
    ("normalisation", r"norm|welford|group|moments"),
    ("copies", r"copy|transpose|permute|cat|elementwise_kernel_with_index|contiguous|memcpy|memset"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|gelu|mul|add|reduce|fill"),
]


def category(name):
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def median_ms(fn, runs=10):
    return cuda_ms(fn, runs, warmup=3)[0]  # bench.py's timer: CUDA events, warm-up, median


def issue_ms(fn, runs=5):
    """Wall ms for the CPU to issue fn() (no sync inside): near the GPU time means launch-bound."""
    import time
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, 1e3 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
    return best


def profile(fn, label, top=12, ops=0):
    """Kernel time per category and the `top` kernels; with `ops`, also the `ops` aten ops whose own kernels
    take the most time."""
    from torch.profiler import ProfilerActivity, profile as prof
    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA] + [ProfilerActivity.CPU] * bool(ops)) as p:
        fn()
        torch.cuda.synchronize()
    per_cat, per_kernel, count, n = defaultdict(float), defaultdict(float), defaultdict(int), 0
    for ev in p.events():
        if ev.device_type.name != "CUDA":
            continue
        us = ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
        per_cat[category(ev.name)] += us
        per_kernel[ev.name[:150]] += us
        count[ev.name[:150]] += 1
        n += 1
    total = sum(per_cat.values())
    print(f"\n## {label}: {total / 1e3:.1f} ms of kernels, {n} launches")
    for cat, us in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:14s} {us / 1e3:8.1f} ms  {100 * us / total:5.1f}%")
    for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {us / 1e3:7.2f} ms x{count[name]:<4d} [{category(name)}] {name}")
    if ops:
        own = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
        rows = [(own(e), e.count, e.key) for e in p.key_averages() if e.key.startswith("aten::") and own(e) > 0]
        print("  aten ops by the kernel time of their own:")
        for us, cnt, key in sorted(rows, reverse=True)[:ops]:
            print(f"    {us / 1e3:7.2f} ms x{cnt:<4d} {key}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16x256x256,24x320x576")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--diffusers", action="store_true", help="also time diffusers (CFG step, official guidance pass)")
    ap.add_argument("--fast", action="store_true", help="profile the fast layer (fast.apply), eagerly")
    ap.add_argument("--top", type=int, default=12, help="how many of the most expensive kernels to list")
    ap.add_argument("--ops", type=int, default=0, help="also list this many aten ops by their kernels' time")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet3D(UNet3DConfig()).half().eval().requires_grad_(False)
    if args.fast:
        import fast
        fast.apply(unet)
    for size in args.sizes.split(","):
        f, h, w = (int(v) for v in size.split("x"))
        x = torch.randn(1, 4, f, h // 8, w // 8, device="cuda", dtype=torch.half)
        ctx = torch.randn(2, 77, 1024, device="cuda", dtype=torch.half)
        t = torch.tensor(999, device="cuda")
        masks = attention.layer_masks([[[0.0, 0.5, 0.2, 0.7]] * f], (h // 8, w // 8))
        masks = {k: v.cuda() for k, v in masks.items()}
        params = attention.GuidanceParams()

        def cfg_step():
            with torch.no_grad():
                return unet(x, t, ctx)  # one latent, two text rows (the shared prefix), as generate

        def guidance_pass():
            store = attention.AttentionStore(attention.GUIDED_LAYERS, truncate=True)
            with torch.enable_grad():
                z = x.detach().requires_grad_(True)
                unet(z, t, ctx[1:], store=store)
                loss = attention.energy(store.maps, masks, [[1]], params)
                return torch.autograd.grad(loss, z)[0]

        def guidance_forward():
            store = attention.AttentionStore(attention.GUIDED_LAYERS, truncate=True)
            with torch.enable_grad():
                z = x.detach().requires_grad_(True)
                unet(z, t, ctx[1:], store=store)
                return attention.energy(store.maps, masks, [[1]], params)

        print(f"\n# {size}: CFG step {median_ms(cfg_step):.1f} ms, guidance pass {median_ms(guidance_pass):.1f} ms"
              f" (its forward {median_ms(guidance_forward):.1f} ms); CPU time to issue: CFG step "
              f"{issue_ms(cfg_step):.1f} ms, guidance pass {issue_ms(guidance_pass):.1f} ms", flush=True)
        if not args.no_profile:
            profile(cfg_step, f"{size} CFG step (batch 2)", args.top, args.ops)
            profile(guidance_pass, f"{size} guidance pass (batch 1)", args.top, args.ops)
        if args.diffusers:
            ref = diffusers_unet(unet)
            from official_guidance import install, official_pass
            with torch.no_grad():
                ms = median_ms(lambda: ref(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample)
            maps = install(ref)
            ms_g = median_ms(lambda: official_pass(ref, maps, x, t, ctx[1:], masks, [[1]], params))
            torch.cuda.reset_peak_memory_stats()
            official_pass(ref, maps, x, t, ctx[1:], masks, [[1]], params)
            gib = torch.cuda.max_memory_allocated() / 2 ** 30
            print(f"  diffusers: CFG step {ms:.1f} ms; official guidance pass {ms_g:.1f} ms, peak {gib:.2f} GiB", flush=True)
            del ref, maps
            torch.cuda.empty_cache()


def diffusers_unet(unet):
    from diffusers import UNet3DConditionModel
    from gpu_parity_unet import REAL
    with torch.device("cuda"):
        ref = UNet3DConditionModel(**REAL).half().eval().requires_grad_(False)
    ref.load_state_dict(unet.state_dict())
    return ref


if __name__ == "__main__":
    main()

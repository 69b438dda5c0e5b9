"""Where the UNet's time goes on a GPU: a kernel-category profile of the CFG step and the guidance pass.

Usage (CUDA, real 1.7B config, random weights, fp16): python scripts/profile_unet.py [--sizes 24x320x576]

Prints, per size, the median ms of the CFG step (batch 2) and the truncated guidance pass (batch 1), and the
share of CUDA time per kernel category (matmul, convolution, attention, normalisation, elementwise, copies)
from torch.profiler, with the ten most expensive kernels. Used to pick the optimisations in
results/perf-notes.md; it is a measuring tool, not a benchmark (bench.py is). Its first run (H200, 2026-12-01,
the NCHW code of that day) is results/profile-h200.md. --variants also times cuDNN/efficient attention, CUDA
graphs, the temporal convolution's layouts, bf16 and channels-last weights; --diffusers times diffusers' CFG step
and the official guidance pass. It also prints the CPU time to issue each call (near the GPU time: launch-bound).
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
    ("fused (kernels.py)", r"^_(chunk_stats|group_affine|scale_shift|chunk_grad_sums|grad_coefficients|norm_grad|"
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
    take the most time (scripts/copy_sources.py follows each copy kernel up its chain of ops)."""
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
    ap.add_argument("--variants", action="store_true", help="also time channels-last, cuDNN attention, CUDA graphs")
    ap.add_argument("--compile", action="store_true", help="with --variants: also time torch.compile")
    ap.add_argument("--diffusers", action="store_true", help="also time diffusers (CFG step, official guidance pass)")
    ap.add_argument("--fused", action="store_true", help="profile with the fused kernels on (UNet3D.fuse_)")
    ap.add_argument("--top", type=int, default=12, help="how many of the most expensive kernels to list")
    ap.add_argument("--ops", type=int, default=0, help="also list this many aten ops by their kernels' time")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet3D(UNet3DConfig()).half().eval().requires_grad_(False)
    if args.fused:
        unet.fuse_(True)
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
        if args.variants:
            variants(unet, cfg_step, guidance_pass, x, t, ctx, args.compile)
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


def temporal_conv_micro(x):
    """One level-0 temporal conv (3,1,1) at the CFG step's shape, four ways: forward, and forward + input backward."""
    import torch.nn.functional as F
    b, _, f, h, w = x.shape
    c = 320
    wt = torch.randn(c, c, 3, 1, 1, device="cuda", dtype=torch.half) * 0.02
    src = torch.randn(2 * f, c, h, w, device="cuda", dtype=torch.half)  # (b f) c h w, as the UNet holds it
    nhwc = src.to(memory_format=torch.channels_last)  # (b f) h w c in memory

    def as_5d(y):  # (b f) c h w -> b c f h w
        return y.reshape(2, f, c, h, w).permute(0, 2, 1, 3, 4)

    def conv3d_ncdhw(y):
        return F.conv3d(as_5d(y).contiguous(), wt, padding=(1, 0, 0))

    def conv3d_view(y):
        return F.conv3d(as_5d(y), wt, padding=(1, 0, 0))

    def conv3d_cl(y):  # nhwc view: b c f h w with strides of b f h w c = channels_last_3d
        return F.conv3d(as_5d(y), wt.to(memory_format=torch.channels_last_3d), padding=(1, 0, 0))

    def three_gemms(y):  # b f (h w) c tokens; out_f = sum_k x_{f+k-1} W_k^T
        tok = y.permute(0, 2, 3, 1).reshape(2, f, h * w, c)
        pad = F.pad(tok, (0, 0, 0, 0, 1, 1))
        out = pad[:, 1:-1] @ wt[:, :, 1, 0, 0].t()
        out = out + pad[:, :-2] @ wt[:, :, 0, 0, 0].t()
        return out + pad[:, 2:] @ wt[:, :, 2, 0, 0].t()

    for name, fn, inp in (("conv3d NCDHW (copy in)", conv3d_ncdhw, src), ("conv3d permuted view", conv3d_view, src),
                          ("conv3d channels-last-3d", conv3d_cl, nhwc), ("3 GEMMs on NHWC tokens", three_gemms, nhwc)):
        try:
            with torch.no_grad():
                ms = median_ms(lambda: fn(inp))
            z = inp.detach().requires_grad_(True)

            def fb():
                y = fn(z)
                return torch.autograd.grad(y, z, torch.ones_like(y))[0]
            ms_b = median_ms(fb)
            print(f"  temporal conv micro {tuple(src.shape)}: {name}: fwd {ms:.2f} ms, fwd+bwd {ms_b:.2f} ms", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  temporal conv micro {name}: failed {type(e).__name__}: {str(e)[:200]}")


def diffusers_unet(unet):
    from diffusers import UNet3DConditionModel
    from gpu_parity_unet import REAL
    with torch.device("cuda"):
        ref = UNet3DConditionModel(**REAL).half().eval().requires_grad_(False)
    ref.load_state_dict(unet.state_dict())
    return ref


def variants(unet, cfg_step, guidance_pass, x, t, ctx, compile_too=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, bk in (("cudnn attention", SDPBackend.CUDNN_ATTENTION), ("efficient attention", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([bk, SDPBackend.FLASH_ATTENTION]):
                print(f"  {name}: CFG step {median_ms(cfg_step):.1f} ms, guidance {median_ms(guidance_pass):.1f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 (exploration)
            print(f"  {name}: failed {type(e).__name__}: {str(e)[:200]}")
    # CUDA graph of the CFG step
    try:
        x2 = torch.cat([x, x])
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(2):
                unet(x2, t, ctx)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g), torch.no_grad():
            out = unet(x2, t, ctx)
        print(f"  CUDA graph: CFG step {median_ms(g.replay):.1f} ms", flush=True)
        del g, out
    except Exception as e:  # noqa: BLE001
        print(f"  CUDA graph: failed {type(e).__name__}: {str(e)[:200]}")
    torch.cuda.empty_cache()
    temporal_conv_micro(x)
    # bf16 (same kernels family; fp16 is the default)
    try:
        unet.bfloat16()
        xb, cb = x.bfloat16(), ctx.bfloat16()
        with torch.no_grad():
            ms = median_ms(lambda: unet(torch.cat([xb, xb]), t, cb))
        print(f"  bf16: CFG step {ms:.1f} ms", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"  bf16: failed {type(e).__name__}: {str(e)[:200]}")
    unet.half()
    # channels-last everywhere: every conv weight channels-last (2-D) / channels-last-3d (Conv3d), input too
    try:
        for m in unet.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.data = m.weight.data.to(memory_format=torch.channels_last)
            elif isinstance(m, torch.nn.Conv3d):
                m.weight.data = m.weight.data.to(memory_format=torch.channels_last_3d)
        print(f"  channels-last 2-D + 3-D conv weights: CFG step {median_ms(cfg_step):.1f} ms, "
              f"guidance {median_ms(guidance_pass):.1f} ms", flush=True)
        profile(cfg_step, "channels-last CFG step")
    except Exception as e:  # noqa: BLE001
        print(f"  channels-last all: failed {type(e).__name__}: {str(e)[:300]}")
    unet.channels_last_(False)  # NCHW, to time the 2-D-only variant below
    # channels-last 2-D convolutions
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    for m in convs:
        m.weight.data = m.weight.data.to(memory_format=torch.channels_last)
    print(f"  channels-last conv2d weights: CFG step {median_ms(cfg_step):.1f} ms, "
          f"guidance {median_ms(guidance_pass):.1f} ms", flush=True)
    unet.channels_last_()  # back to the default layout
    # CUDA graph of the whole guidance pass (forward + autograd.grad)
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                guidance_pass()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = guidance_pass()
        print(f"  CUDA graph: guidance pass {median_ms(g.replay):.1f} ms", flush=True)
        del g, out
    except Exception as e:  # noqa: BLE001
        print(f"  CUDA graph (guidance): failed {type(e).__name__}: {str(e)[:300]}")
    if not compile_too:
        return
    try:
        import time as _t
        t0 = _t.perf_counter()
        fast = torch.compile(unet, dynamic=False)
        with torch.no_grad():
            fast(torch.cat([x, x]), t, ctx)
        c_s = _t.perf_counter() - t0
        with torch.no_grad():
            ms = median_ms(lambda: fast(torch.cat([x, x]), t, ctx))
        print(f"  torch.compile: CFG step {ms:.1f} ms (compile {c_s:.0f} s)", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"  torch.compile: failed {type(e).__name__}: {str(e)[:200]}")


if __name__ == "__main__":
    main()

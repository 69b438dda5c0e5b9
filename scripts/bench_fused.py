"""What the fused kernels (fused.py) buy on the GPU: the CFG step and the guidance pass with and without them.

What to read: fused.py, unet3d.py (`UNet3D.fuse_`), results/perf-notes.md.

Per size (frames x height x width in pixels), fp16, the real config with random weights, both replayed from CUDA
graphs (graphs.py, the fast path): (i) the CFG step unet(x, t, ctx) (ctx: 2 rows); (ii) one guidance pass
(LatentGuidance.loss_and_grad, demo-like boxes, --checkpointing off and cheap), unfused then fused; the time of the
first fused call (Triton compiling kernels.py), the relative difference of the outputs and gradients, and the
eager-vs-graph difference of the unfused gradient as the noise floor. `--smoke`: the tiny config on the CPU.

Usage: python scripts/bench_fused.py [--sizes 16x256x256,24x320x576] [--smoke]
"""
import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)

import attention  # noqa: E402
import fused  # noqa: E402
from bench import cuda_ms, rel_err  # noqa: E402
from bench_layout import kernel_summary, setup, sizes_of  # noqa: E402
from graphs import Graphed, graph_pool  # noqa: E402


def gb(v):
    return "-" if v is None else f"{v:.2f}"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def micro(f, h, w, c, device, dtype, kernels, runs):
    """(0): the level-0 ops alone, eager | fused: forward ms (its GB/s), forward+backward ms."""
    from memory import GroupNorm
    from memory import batch_to_frames
    from unet3d import norm_silu
    from unet_transformers import GEGLU
    gn, ln = GroupNorm(32, c).to(device, dtype), fused.LayerNorm(c).to(device, dtype)
    geglu = GEGLU(c, 4 * c).to(device, dtype)
    for m in (gn, ln, geglu):
        m.requires_grad_(False)

    def gate(t):
        if geglu.fused is not None:
            return geglu.fused.geglu(t)
        value, g = t.chunk(2, dim=-1)
        return value * torch.nn.functional.gelu(g)
    x4 = torch.randn(2 * f, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    cases = [("GroupNorm+SiLU 4-D", lambda t: norm_silu(gn, t), x4, 2),
             ("GroupNorm 5-D", lambda t: gn(batch_to_frames(t, f)), x4, 2),
             ("LayerNorm", ln, torch.randn(2 * f, h * w, c, device=device, dtype=dtype), 2),
             ("GEGLU gate", gate, torch.randn(2 * f, h * w, 8 * c, device=device, dtype=dtype), 1.5)]
    for label, fn, inp, passes in cases:
        row = []
        for on in (False, True):
            for m in (gn, ln, geglu):
                m.fused = kernels if on else None
            with torch.no_grad():
                fwd = cuda_ms(lambda: fn(inp), runs, warmup=3)[0]
            leaf = inp.detach().requires_grad_(True)

            def fb():
                y = fn(leaf)
                torch.autograd.grad(y, leaf, torch.ones_like(y))
            both = cuda_ms(fb, runs, warmup=3)[0]
            row.append(f"{fwd:.3f} ({passes * inp.numel() * inp.element_size() / fwd / 1e6:.0f} GB/s) / {both:.3f}")
        print(f"  (0) {label} of {tuple(inp.shape)}: eager fwd / fwd+bwd {row[0]} | fused {row[1]} ms", flush=True)
    for m in (gn, ln, geglu):
        m.fused = None


def run_size(unet, f, h, w, device, dtype, ctx_dim, kernels, runs, do_profile=False):
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, 4, f, h, w, generator=g, device=device, dtype=dtype)
    ctx = torch.randn(2, 77, ctx_dim, generator=g, device=device, dtype=dtype)
    t = torch.tensor(999, device=device)
    boxes = np.stack([np.tile([[0.1, 0.3, 0.45, 0.8]], (f, 1)), np.tile([[0.5, 0.2, 0.9, 0.6]], (f, 1))])
    masks = attention.layer_masks(boxes, (h, w))
    schedule = np.linspace(0.99, 0.01, 1000)
    params = attention.preset("benchmark")
    out, grads = {}, {}
    for on in (False, True):
        unet.fuse_(on, kernels=kernels if on else None)
        step = Graphed(lambda x, t, c: unet(x, t, c), pool=graph_pool())
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            step(x, t, ctx)  # the first call: warm-up (and the kernels compile)
        sync()
        first = time.perf_counter() - t0
        with torch.no_grad():
            ms, gib = cuda_ms(lambda: step(x, t, ctx), runs)
            out[on] = step(x, t, ctx)
        step.reset()
        if do_profile and on:
            from torch.profiler import ProfilerActivity, profile
            with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                unet(x, t, ctx)
                sync()
            kernel_summary(prof, True, top_kernels=20, top_ops=1)
        print(f"  CFG step, fused={on}: {ms:.1f} ms, peak {gb(gib[0])} GiB (first call {first:.1f} s)", flush=True)
        for mode in ("off", "cheap"):
            p = dataclasses.replace(params, checkpointing=mode)
            guide = attention.LatentGuidance(unet, ctx[1:], masks, [[2, 3], [6]], schedule, p, fast=True,
                                             pool=graph_pool())
            sync()
            t0 = time.perf_counter()
            guide.loss_and_grad(x, t)
            sync()
            first = time.perf_counter() - t0
            ms, gib = cuda_ms(lambda: guide.loss_and_grad(x, t), runs)
            grads[on, mode] = guide.loss_and_grad(x, t)[1]
            if not on:
                guide.fast = False
                floor = rel_err(guide.loss_and_grad(x, t)[1], grads[on, mode])
            guide.drop_graph()
            print(f"  guidance pass --checkpointing {mode}, fused={on}: {ms:.1f} ms, peak {gb(gib[0])} GiB, above "
                  f"models {gb(gib[1])} (first call {first:.1f} s)" + ("" if on else f"; eager vs graph {floor:.1e}"),
                  flush=True)
    unet.fuse_(False)
    if dtype != torch.float32:  # the fp32 reference: the same weights in fp32, eager, unfused
        import copy
        unet32 = copy.deepcopy(unet).float()
        with torch.no_grad():
            ref = unet32(x.float(), t, ctx.float())
        guide = attention.LatentGuidance(unet32, ctx[1:].float(), masks, [[2, 3], [6]], schedule, params)
        g32 = guide.loss_and_grad(x.float(), t)[1]
        del unet32, guide
        print(f"  against fp32 (unfused | fused): CFG output {rel_err(out[False], ref):.1e} | {rel_err(out[True], ref):.1e};"
              f" gradient off {rel_err(grads[False, 'off'], g32):.1e} | {rel_err(grads[True, 'off'], g32):.1e}", flush=True)
    print(f"  fused vs unfused: CFG output {rel_err(out[True], out[False]):.1e}; gradient off "
          f"{rel_err(grads[True, 'off'], grads[False, 'off']):.1e}, cheap "
          f"{rel_err(grads[True, 'cheap'], grads[False, 'cheap']):.1e}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", help="frames x height x width (pixels); default 16x256x256,24x320x576")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="the top kernels of the fused eager CFG step")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny config on the CPU (the fused math through the 'torch' backend)")
    args = ap.parse_args(argv)
    device, dtype, cfg, unet = setup(args.smoke)
    kernels = fused.Kernels("triton" if fused.available() else "torch")
    for size, f, hp, wp in sizes_of(args.sizes, args.smoke):
        print(f"\n# {size}: latent {f}x{hp // 8}x{wp // 8}", flush=True)
        micro(f, hp // 8, wp // 8, cfg.block_out_channels[0], device, dtype, kernels, 1 if args.smoke else args.runs)
        run_size(unet, f, hp // 8, wp // 8, device, dtype, cfg.cross_attention_dim, kernels,
                 1 if args.smoke else args.runs, args.profile)


if __name__ == "__main__":
    main()

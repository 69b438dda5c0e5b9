"""Two layout questions for the UNet's graph nodes, timed on the GPU (fp16, the CFG step's batch 2 at 576×320×24):
(1) the temporal convolution (3,1,1) as cuDNN conv3d on channels_last_3d (as now) against conv2d with a (3, 1)
kernel over (f, h·w) on the same memory (a view: channels-last (b, c, f, h·w)); (2) a self-attention's q, k, v as
three products against one product with the concatenated weight. Each: median ms (CUDA events) and the kernels
launched per call (torch.profiler, memsets included).

What to read: results/perf-notes.md (sixth session: the graph's ~2,100 nodes and their memsets).
Usage: python scripts/bench_ops.py [--size 24x320x576]
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import cuda_ms  # noqa: E402


def launches(fn):
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


def report(name, fn, x, grad=False):
    """fn(x): forward time and launches; with `grad`, also forward + the input gradient (frozen weights)."""
    with torch.no_grad():
        ms, n = cuda_ms(lambda: fn(x), 20)[0], launches(lambda: fn(x))
    line = f"  {name:34s} fwd {ms:7.3f} ms, {n} kernels"
    if grad:
        z = x.detach().requires_grad_(True)

        def fb():
            y = fn(z)
            return torch.autograd.grad(y, z, torch.ones_like(y))[0]
        line += f"; fwd+input bwd {cuda_ms(fb, 20)[0]:7.3f} ms, {launches(fb)} kernels"
    print(line, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="24x320x576")
    args = ap.parse_args(argv)
    f, hp, wp = map(int, args.size.split("x"))
    h, w = hp // 8, wp // 8
    dev, dt = "cuda", torch.float16
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.size}")
    for level, c in enumerate((320, 640, 1280, 1280)):
        x = torch.randn(2, c, f, h, w, device=dev, dtype=dt).to(memory_format=torch.channels_last_3d)
        wt = (torch.randn(c, c, 3, 1, 1, device=dev, dtype=dt) * c ** -0.5)
        w3 = wt.to(memory_format=torch.channels_last_3d)
        w2 = wt.view(c, c, 3, 1).to(memory_format=torch.channels_last)
        as4 = lambda t: t.permute(0, 2, 3, 4, 1).reshape(2, f, h * w, c).permute(0, 3, 1, 2)  # noqa: E731
        # b c f h w (memory b f h w c) -> b c f (h w), channels-last: a view
        c3 = lambda t: F.conv3d(t, w3, padding=(1, 0, 0))  # noqa: E731
        c2 = lambda t: F.conv2d(as4(t), w2, padding=(1, 0))  # noqa: E731
        with torch.no_grad():
            ref = c3(x).float()
            err = (c2(x).float() - ref.reshape(2, c, f, h * w)).norm() / ref.norm()
        print(f"level {level}: c = {c}, {h}x{w}; conv2d vs conv3d rel. diff {float(err):.1e}")
        report("temporal conv: conv3d (now)", c3, x, grad=True)
        report("temporal conv: conv2d (3, 1)", c2, x, grad=True)
        t = torch.randn(2 * f * h * w, c, device=dev, dtype=dt)
        wq, wk, wv = (torch.randn(c, c, device=dev, dtype=dt) * c ** -0.5 for _ in range(3))
        wqkv = torch.cat([wq, wk, wv])
        report("q, k, v: three products", lambda t: (F.linear(t, wq), F.linear(t, wk), F.linear(t, wv)), t)
        report("q, k, v: one product", lambda t: F.linear(t, wqkv).split(c, dim=-1), t)
        h, w = -(-h // 2), -(-w // 2)


if __name__ == "__main__":
    main()

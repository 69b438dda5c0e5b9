"""The transformer blocks' linear layers on the GPU: cuBLAS and the separate op after it (as the UNet runs them
now) against kernels_matmul.py's Triton products with that op in the epilogue, per UNet level and tile config.

What to read: kernels_matmul.py, results/perf-notes.md (sixth session).

Per size (frames x height x width in pixels), fp16, the CFG step's batch 2, tokens M = 2·f·h·w at each level, d the
level's width; the shapes of one BasicTransformerBlock:
  residual d->d    x + attn.to_out(o)       cuBLAS F.linear + eager add | torch.addmm(x, o, Wᵀ) (bias carried elsewhere) | Triton
  residual 4d->d   x + ff.net.2(h)          the same
  geglu d->8d      GEGLU(ff.net.0.proj(x))  cuBLAS F.linear + kernels.geglu_fwd | Triton
  bias d->d        proj_in(x)               cuBLAS F.linear | Triton (the product alone)
Each: median ms (CUDA events), TFLOP/s, relative error against an fp32 evaluation. At the end: per size, the
step's total for each path with each level's shapes counted as often as the UNet runs them (10 blocks at levels
0-2, 2 at level 3), using the best Triton config per shape.
Usage: python scripts/bench_matmul.py [--sizes 16x256x256,24x320x576] [--runs 20]
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import kernels  # noqa: E402
import kernels_matmul as km  # noqa: E402
from bench import cuda_ms  # noqa: E402

CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)
    (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 4, 3), (128, 64, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 128, 32, 8, 8, 4),
]
BLOCKS = (10, 10, 10, 2)  # transformer blocks per level in one UNet forward (spatial + temporal)


def cfg(c):
    return dict(BLOCK_M=c[0], BLOCK_N=c[1], BLOCK_K=c[2], GROUP_M=c[3], num_warps=c[4], num_stages=c[5])


def cases(m, d, gen):
    """(name, per-block count, FLOP, {label: fn}, fp32 reference) for one level's shapes."""
    r16 = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float16, generator=gen)  # noqa: E731
    out = []
    for name, k in (("residual d->d", d), ("residual 4d->d", 4 * d)):
        a, w, b, x = r16(m, k), r16(d, k) / k ** 0.5, r16(d), r16(m, d)
        ref = x.float() + F.linear(a.float(), w.float(), b.float())
        fns = {"cuBLAS + add": lambda a=a, w=w, b=b, x=x: x + F.linear(a, w, b),
               "addmm (no bias)": lambda a=a, w=w, x=x: torch.addmm(x, a, w.t())}
        for c in CONFIGS:
            fns[f"triton {c}"] = lambda a=a, w=w, b=b, x=x, c=c: km.linear(a, w, b, km.RESIDUAL, x, config=cfg(c))
        out.append((name, 2 if k == d else 1, 2 * m * k * d, fns, ref))
    a, w, b = r16(m, d), r16(8 * d, d) / d ** 0.5, r16(8 * d)
    h = F.linear(a.float(), w.float(), b.float())
    value, gate = h.chunk(2, dim=-1)
    fns = {"cuBLAS + geglu": lambda: kernels.geglu_fwd(F.linear(a, w, b))}
    for c in CONFIGS:
        fns[f"triton {c}"] = lambda c=c: km.linear(a, w, b, km.GEGLU, config=cfg(c))
    out.append(("geglu d->8d", 1, 2 * m * d * 8 * d, fns, value * F.gelu(gate)))
    w1 = w[:d].contiguous()
    fns = {"cuBLAS": lambda: F.linear(a, w1, b[:d])}
    for c in CONFIGS:
        fns[f"triton {c}"] = lambda c=c: km.linear(a, w1, b[:d], km.BIAS, config=cfg(c))
    out.append(("bias d->d", 0, 2 * m * d * d, fns, F.linear(a.float(), w1.float(), b[:d].float())))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16x256x256,24x320x576")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "bench_matmul.py needs CUDA"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16")
    summary = []
    for size in args.sizes.split(","):
        f, hp, wp = map(int, size.split("x"))
        h, w = hp // 8, wp // 8
        totals = {"now (cuBLAS + op)": 0.0, "addmm residuals": 0.0, "best triton": 0.0}
        for level, (d, blocks) in enumerate(zip((320, 640, 1280, 1280), BLOCKS)):
            m = 2 * f * h * w
            gen = torch.Generator(device="cuda").manual_seed(level)
            print(f"\n{size} level {level}: M = {m} tokens, d = {d}")
            for name, count, flop, fns, ref in cases(m, d, gen):
                times = {}
                for label, fn in fns.items():
                    try:
                        with torch.no_grad():
                            err = ((fn().float() - ref).norm() / ref.norm()).item()
                            ms = cuda_ms(fn, args.runs)[0]
                    except Exception as e:  # noqa: BLE001 (a config the GPU refuses: shared memory, registers)
                        print(f"  {name:15s} {label:34s} failed: {type(e).__name__}: {str(e)[:80]}")
                        continue
                    times[label] = ms
                    print(f"  {name:15s} {label:34s} {ms:8.3f} ms {flop / ms / 1e9:7.1f} TFLOP/s  err {err:.1e}")
                best = min((t, lb) for lb, t in times.items() if lb.startswith("triton"))
                now = next(t for lb, t in times.items() if lb.startswith("cuBLAS"))
                print(f"  {name:15s} best: {best[1]} {best[0]:.3f} ms vs {now:.3f} ms now ({now / best[0]:.2f}x)")
                n = count * blocks
                totals["now (cuBLAS + op)"] += n * now
                totals["addmm residuals"] += n * times.get("addmm (no bias)", now)
                totals["best triton"] += n * min(best[0], now)
            h, w = -(-h // 2), -(-w // 2)
        summary.append((size, totals))
    print("\nPer CFG step, the blocks' residual and GEGLU products (each level's shapes times its block count):")
    for size, totals in summary:
        print(f"  {size}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in totals.items()))


if __name__ == "__main__":
    main()

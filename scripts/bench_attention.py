"""The temporal transformer's attention on the GPU: PyTorch SDPA on folded tokens (as before) against the
Triton kernels of kernels_attention.py, per UNet level, forward (the CFG step's batch 2) and forward+backward
(the guidance pass's batch 1).

What to read: kernels_attention.py, fused.frame_attention, results/perf-notes.md (fifth session).

Per size (frames x height x width in pixels), fp16, q, k, v (b, f, h·w, n·64) as the temporal transformer makes them
(transformer_in: 8 heads; the blocks' temporal transformers: c / 64 heads):
  permute+SDPA  fused.frame_attention, the reference and the unfused path: q, k, v copied to (b h w) f c, SDPA, and
                the output permuted back;
  triton B/W    the kernels, B rows per tile, W warps.
Each: median ms (CUDA events), TFLOP/s of the useful work (4·b·p·n·f²·e forward, 2.5× that forward+backward), and
the kernel's relative error against SDPA. Usage: python scripts/bench_attention.py [--sizes 16x256x256,24x320x576]
"""
import argparse
import functools
import os
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fused  # noqa: E402
import kernels_attention as ka  # noqa: E402
from bench import cuda_ms  # noqa: E402

CONFIGS = [(32, 4), (64, 4), (64, 8), (128, 4), (128, 8)]  # (rows per tile, warps)


def levels(f, h, w):
    """(name, p, heads) of every temporal attention shape of the 1.7B UNet at an h x w latent."""
    out, c = [("transformer_in", h * w, 8)], (320, 640, 1280, 1280)
    for i, ch in enumerate(c):
        out.append((f"level {i}", h * w, ch // 64))
        h, w = -(-h // 2), -(-w // 2)
    return out


def tuned(block, warps):
    """kernels_attention's launchers at `block` rows per tile and `warps` warps (fused._FrameAttention's argument)."""
    return types.SimpleNamespace(
        rows_apart=ka.rows_apart, frame_attention_fwd=functools.partial(ka.frame_attention_fwd, block=block, warps=warps),
        frame_attention_bwd=functools.partial(ka.frame_attention_bwd, block=block, warps=warps))


def fwd_bwd(fn, qkv, g):
    def run():
        out = fn(qkv.detach().requires_grad_(True))
        torch.autograd.backward(out, g)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16x256x256,24x320x576")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "bench_attention.py needs CUDA"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16")
    totals = {}
    for size in args.sizes.split(","):
        f, hp, wp = map(int, size.split("x"))
        for name, p, heads in levels(f, hp // 8, wp // 8):
            gen = torch.Generator(device="cuda").manual_seed(0)
            rows = []
            for mode, b in (("fwd", 2), ("fwd+bwd", 1)):
                # one joined product q | k | v, as the UNet's temporal self-attention makes it
                qkv = torch.randn(b, f, p, 3 * heads * 64, device="cuda", dtype=torch.float16, generator=gen)
                g = torch.randn(b, f, p, heads * 64, device="cuda", dtype=torch.float16, generator=gen)
                flop = 4 * b * p * heads * f * f * 64 * (1 if mode == "fwd" else 2.5)
                ref = fused.frame_attention(*qkv.chunk(3, dim=-1), heads).float()
                fns = {"permute+SDPA": lambda qkv: fused.frame_attention(*qkv.chunk(3, dim=-1), heads)}
                for block, warps in CONFIGS:
                    if block >= f:
                        fns[f"triton {block}/{warps}"] = (
                            lambda qkv, tuned=tuned(block, warps): fused._FrameAttention.apply(qkv, heads, tuned))
                for label, fn in fns.items():
                    with torch.no_grad():
                        err = ((fn(qkv).float() - ref).norm() / ref.norm()).item()
                    run = (lambda fn=fn: fn(qkv)) if mode == "fwd" else fwd_bwd(fn, qkv, g)
                    with torch.set_grad_enabled(mode != "fwd"):
                        ms = cuda_ms(run, args.runs)[0]
                    totals[(size, mode, label)] = totals.get((size, mode, label), 0.0) + ms
                    rows.append(f"  {mode:8s} {label:14s} {ms:8.3f} ms {flop / ms / 1e9:7.1f} TFLOP/s  err {err:.1e}")
            print(f"{size} {name}: b·p = {p} positions, {heads} heads, f = {f}")
            print("\n".join(rows))
    print("\nTotals over one UNet pass's shapes, each level counted once (the UNet runs some levels 2-3 times):")
    for (size, mode, label), ms in totals.items():
        print(f"  {size:11s} {mode:8s} {label:14s} {ms:8.3f} ms")


if __name__ == "__main__":
    main()

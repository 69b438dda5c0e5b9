"""What the channels-last layout buys on the GPU: memory.group_norm against nn.GroupNorm, and the UNet's CFG step.

What to read: unet3d.py ("Differences"; `UNet3D.channels_last_`), memory.py's `group_norm`, tests/test_layout.py.

Per size (frames x height x width in pixels, latent /8), fp16, the real config with random weights:
  (i) one level-0 GroupNorm (320 channels, 32 groups), 4-D (b f) c h w as in a resnet and 5-D b c f h w as in a
      temporal layer: group_norm on channels-last input | nn.GroupNorm on NCHW | nn.GroupNorm on channels-last;
  (ii) the CFG step unet(cat([x, x]), t, ctx), ctx (2, 77, 1024), t = 999: channels-last and NCHW
      (`channels_last_(False)`), eager and replayed from a CUDA graph (graphs.py: the kernels' time alone); then
      the profile of the eager channels-last step: the top 15 kernels, and key_averages' top 25 rows by CUDA time.
Timings: CUDA events, warm-up 3, median of 10. `--smoke`: the tiny config on the CPU (wall clock), to check the code.

Usage: python scripts/bench_layout.py [--sizes 16x256x256,24x320x576] [--no-profile] [--smoke]
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import cuda_ms  # noqa: E402
from graphs import Graphed  # noqa: E402
from memory import batch_to_frames, group_norm  # noqa: E402
from unet3d import UNet3D, UNet3DConfig  # noqa: E402


def median_ms(fn, warmup=3, runs=10):
    return cuda_ms(fn, runs, warmup)[0]  # bench.py's timer: CUDA events (the wall clock on the CPU), median


def bench_group_norm(c, f, h, w, device, dtype):
    """(i): one level-0 GroupNorm on (b f) c h w (batch 2), 4-D as in a resnet and 5-D as in a temporal layer."""
    norm = torch.nn.GroupNorm(32, c).to(device, dtype)
    x = torch.randn(2 * f, c, h, w, device=device, dtype=dtype)  # (b f) c h w, NCHW
    x_cl = x.contiguous(memory_format=torch.channels_last)  # memory (b f) h w c
    ours = lambda x: group_norm(x, 32, norm.weight, norm.bias, norm.eps)
    print(f"  (i) GroupNorm of {tuple(x.shape)}, ms: group_norm channels-last | nn.GroupNorm NCHW | channels-last")
    x5, x5_cl = batch_to_frames(x, f).contiguous(), batch_to_frames(x_cl, f)  # b c f h w: NCDHW, channels_last_3d
    with torch.no_grad():
        for label, nchw, cl in (("4-D (b f) c h w", x, x_cl), ("5-D b c f h w", x5, x5_cl)):
            row = [median_ms(lambda: ours(cl)), median_ms(lambda: norm(nchw)), median_ms(lambda: norm(cl))]
            err = ((ours(cl).float() - norm(nchw).float()).norm() / norm(nchw).float().norm()).item()
            print(f"      {label:16s} " + " | ".join(f"{t:7.3f}" for t in row) + f"   rel. diff {err:.1e}")


def kernel_summary(prof, cuda, top_kernels=15, top_ops=25):
    """The top kernels (GPU) by time, then key_averages' table (aten ops and kernels) by CUDA (CPU) time."""
    avgs = prof.key_averages()
    if cuda:
        kernels = [e for e in avgs if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in kernels) or 1.0
        print(f"  top {top_kernels} kernels by CUDA time (all kernels: {total / 1e3:.1f} ms)")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top_kernels]:
            print(f"    {e.self_device_time_total / 1e3:8.2f} ms {100 * e.self_device_time_total / total:5.1f}% "
                  f"x{e.count:<5d} {e.key[:110]}")
    print(avgs.table(sort_by="device_time_total" if cuda else "cpu_time_total", row_limit=top_ops,
                     max_name_column_width=50))


def bench_cfg_step(unet, f, h, w, device, dtype, ctx_dim, do_profile):
    """(ii): the CFG step (batch 2), channels-last and NCHW, eager and from a CUDA graph; the profile."""
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, 4, f, h, w, generator=g, device=device, dtype=dtype)
    ctx = torch.randn(2, 77, ctx_dim, generator=g, device=device, dtype=dtype)
    t = torch.tensor(999, device=device)
    step = lambda: unet(torch.cat([x, x]), t, ctx)
    rows = []
    with torch.no_grad():
        for channels_last in (True, False):
            unet.channels_last_(channels_last)
            graphed = Graphed(lambda x2, t, ctx: unet(x2, t, ctx))
            rows.append((step(), median_ms(step), median_ms(lambda: graphed(torch.cat([x, x]), t, ctx))))
            graphed.reset()
        unet.channels_last_()
        (y_cl, *cl), (y_nchw, *nchw) = rows
        err = ((y_cl.float() - y_nchw.float()).norm() / y_nchw.float().norm()).item()
        print(f"  (ii) CFG step (batch 2), ms: eager channels-last {cl[0]:.1f} | NCHW {nchw[0]:.1f}; CUDA graph "
              f"channels-last {cl[1]:.1f} | NCHW {nchw[1]:.1f}; rel. diff of the outputs {err:.1e}", flush=True)
        if do_profile:
            cuda = device.type == "cuda"
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                step()
                if cuda:
                    torch.cuda.synchronize()
            kernel_summary(prof, cuda)


def setup(smoke):
    """-> (device, dtype, config, UNet with random weights): the real config in fp16 on CUDA, or with `smoke` the
    tiny one in fp32 on the CPU; prints the machine line. Shared with scripts/bench_fused.py."""
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.float16
    cfg = UNet3DConfig(block_out_channels=(64, 64, 128, 128), cross_attention_dim=32) if smoke else UNet3DConfig()
    with torch.device(device):
        unet = UNet3D(cfg).to(dtype).eval().requires_grad_(False)  # channels-last weights (UNet3D.__init__)
    print(f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, {dtype}")
    return device, dtype, cfg, unet


def sizes_of(sizes, smoke):
    """'FxHxW,...' (default 16x256x256,24x320x576; smoke: 2x64x96) -> [(label, f, height, width)] in pixels."""
    sizes = sizes or ("2x64x96" if smoke else "16x256x256,24x320x576")
    return [(size, *(int(v) for v in size.split("x"))) for size in sizes.split(",")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", help="frames x height x width (pixels); default 16x256x256,24x320x576 (smoke: 2x64x96)")
    ap.add_argument("--no-profile", action="store_true", help="timings only")
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU, small sizes: checks the code")
    args = ap.parse_args(argv)
    device, dtype, cfg, unet = setup(args.smoke)
    for size, f, hp, wp in sizes_of(args.sizes, args.smoke):
        print(f"\n# {size}: latent {f}x{hp // 8}x{wp // 8}", flush=True)
        bench_group_norm(cfg.block_out_channels[0], f, hp // 8, wp // 8, device, dtype)
        bench_cfg_step(unet, f, hp // 8, wp // 8, device, dtype, cfg.cross_attention_dim, not args.no_profile)


if __name__ == "__main__":
    main()

"""Full-size parity of UNet3D with diffusers' UNet3DConditionModel, random weights, on a GPU.

What to read: `modelscope-architecture.md` §3.1 (the real config), §5 (1,411,233,860 parameters),
§4.10 and §14.12 (numerics, SDPA backends, tolerances); `style.md` §4.7 ("Full size").

Official implementation (the oracle): diffusers `UNet3DConditionModel` (test-only dependency; put
diffusers on PYTHONPATH). It is built with the real config, every parameter re-randomised, saved
with `save_pretrained(variant="fp16")` (the published fp16 layout) and loaded by `UNet3D.from_pretrained`.

Differences: none intended. Both sides hold the same fp16 values; for fp32 both are upcast from
them (ref.float(), and our loader converting the fp16 file), TF32 is off, and both run under the
same SDPA backend (flash for fp16 and memory-efficient for fp32 on CUDA, math on CPU).

Usage (the lead, on an H100):
    PYTHONPATH=/path/to/diffusers/src python scripts/gpu_parity_unet.py [--out results/gpu_parity_unet.md]
On CPU at a tiny config (to test this script): python scripts/gpu_parity_unet.py --tiny --out /tmp/x.md

Glossary: b (batch), f (frames), h, w (latent height, width), l (77 text tokens).
"""
import argparse
import datetime
import math
import os
import sys
import tempfile
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import diffusers  # noqa: E402  (test-only reference)
from diffusers import UNet3DConditionModel  # noqa: E402

from outputs import code_commit, write_report  # noqa: E402
from unet3d import UNet3D  # noqa: E402

REAL = dict(  # unet/config.json of ali-vilab/text-to-video-ms-1.7b (§3.1)
    in_channels=4, out_channels=4, act_fn="silu", attention_head_dim=64, block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=1024, down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
    up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3, layers_per_block=2, norm_eps=1e-5,
    norm_num_groups=32, sample_size=32, downsample_padding=1, mid_block_scale_factor=1)
REAL_PARAMS = 1_411_233_860  # §5
TINY = dict(REAL, block_out_channels=(64, 64, 128, 128), cross_attention_dim=32)
SHAPES = {"real": [(16, 32, 32), (24, 40, 72)], "tiny": [(3, 16, 24), (3, 10, 14)]}  # f, h, w
THRESH = {torch.float16: 5e-3, torch.float32: 1e-5}


def rerandomise(model, seed):
    """Every parameter random and non-zero: matrices N(0, 1/fan_in) (activations stay O(1) through
    1.4 B parameters), norm scales N(1, 0.1²), biases N(0, 0.1²). Runs on the model's device."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # GroupNorm / LayerNorm scales
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def rel_err(a, b):
    """Relative L2 error ||a - b|| / ||b||, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def backend(device, dtype):
    if device.type != "cuda":
        return SDPBackend.MATH
    return SDPBackend.FLASH_ATTENTION if dtype == torch.float16 else SDPBackend.EFFICIENT_ATTENTION


def make_inputs(shape, ctx_dim, device, seed):
    f, h, w = shape
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(1, 4, f, h, w, generator=g, device=device)
    ctx = torch.randn(1, 77, ctx_dim, generator=g, device=device)
    return x, torch.tensor([500], device=device), ctx


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    y = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return y, time.perf_counter() - t0


def compare(ref, ours, dtype, shapes, ctx_dim, device, rows, ref_outputs, path="reference"):
    """Run both models on every shape in `dtype`; append one result row per shape."""
    bk = backend(device, dtype)
    for i, shape in enumerate(shapes):
        x, t, ctx = make_inputs(shape, ctx_dim, device, seed=i)
        with torch.no_grad(), sdpa_kernel(bk):
            y_ref, t_ref = timed(lambda: ref(x.to(dtype), t, ctx.to(dtype)).sample, device)
            y, t_ours = timed(lambda: ours(x.to(dtype), t, ctx.to(dtype)), device)
        assert y.shape == y_ref.shape == x.shape, (y.shape, y_ref.shape)
        err = rel_err(y, y_ref)
        ok = bool(torch.isfinite(y_ref).all()) and err <= THRESH[dtype]
        rows.append(dict(path=path, shape="×".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""),
                         backend=bk.name, err=err, thresh=THRESH[dtype], ok=ok, std=y_ref.float().std().item(),
                         maxabs=(y.float() - y_ref.float()).abs().max().item(), ms=(1e3 * t_ref, 1e3 * t_ours)))
        ref_outputs[(shape, dtype)] = y_ref.float().cpu()
        print(f"{path:>9} {rows[-1]['shape']:>10} {rows[-1]['dtype']:>8} {bk.name:>20} rel err {err:.3e} "
              f"(<= {THRESH[dtype]:.0e}) {'PASS' if ok else 'FAIL'}  ref out std {rows[-1]['std']:.3f}", flush=True)


def report(rows, extra, args, device, n_params, seconds):
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"# UNet3D vs diffusers UNet3DConditionModel, {'tiny' if args.tiny else 'real 1.7B'} config, random weights",
        "",
        f"- device: {gpu}; date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"commit {code_commit()}",
        "- paths: `reference` (unet3d.py as it is) and `fast` (`fast.apply`: fused kernels where Triton runs, "
        "channels-last, the shared prefix; eager, no CUDA graph)",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}",
        f"- parameters: {n_params:,}; weights saved as fp16 (`variant=\"fp16\"`), fp32 = both sides upcast from fp16;"
        " TF32 off; batch 1, timestep 500, 77 random context tokens",
        f"- wall time {seconds:.0f} s"
        + (f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""),
        "",
        "| path | latent f×h×w | dtype | SDPA backend | rel L2 err | threshold | result | ref output std |"
        " max abs err | ref / ours ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['path']} | {r['shape']} | {r['dtype']} | {r['backend']} | {r['err']:.2e} | {r['thresh']:.0e} | "
                     f"{'PASS' if r['ok'] else 'FAIL'} | {r['std']:.3f} | {r['maxabs']:.2e} | "
                     f"{r['ms'][0]:.0f} / {r['ms'][1]:.0f} |")
    lines += ["", "For scale (not a pass criterion): diffusers fp16 vs diffusers fp32 on the same weights:"]
    lines += [f"- {s}: rel L2 {e:.2e}" for s, e in extra]
    return "\n".join(lines) + "\n"


def both_paths(ref, ours, dtype, shapes, ctx_dim, device, rows, outs):
    """The reference, then the fast layer plugged into the same modules, then the reference again."""
    import fast
    compare(ref, ours, dtype, shapes, ctx_dim, device, rows, outs)
    fast.apply(ours)
    compare(ref, ours, dtype, shapes, ctx_dim, device, rows, {}, path="fast")
    fast.remove(ours)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "gpu_parity_unet.md"))
    ap.add_argument("--tiny", action="store_true", help="tiny config and shapes (runs on CPU in seconds)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", default=None, help="where the temporary fp16 checkpoint goes (local disk)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device, start = torch.device(args.device), time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg, shapes = (TINY, SHAPES["tiny"]) if args.tiny else (REAL, SHAPES["real"])

    with torch.device("meta"):
        ref = UNet3DConditionModel(**cfg)
    assert not list(ref.buffers()), "unexpected buffers: to_empty would leave them uninitialised"
    # requires_grad off on both sides: on CPU, fp16 F.linear takes another kernel (other rounding)
    # when the weight requires grad, even under no_grad; our loader returns requires_grad=False.
    ref = rerandomise(ref.to_empty(device=device), args.seed).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in ref.parameters())
    if not args.tiny:
        assert n_params == REAL_PARAMS, f"{n_params:,} parameters, expected {REAL_PARAMS:,}"
    print(f"reference built: {n_params:,} parameters on {device}", flush=True)

    rows, extra, outs = [], [], {}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="lvd_unet_parity_") as folder:
        ref.half().save_pretrained(folder, safe_serialization=True, variant="fp16")
        print(f"saved fp16 checkpoint to {folder}", flush=True)
        ours = UNet3D.from_pretrained(folder, device=device, dtype=torch.float16)
        assert sum(p.numel() for p in ours.parameters()) == n_params
        both_paths(ref, ours, torch.float16, shapes, cfg["cross_attention_dim"], device, rows, outs)
        del ours
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ref.float()  # the fp16 values, upcast
        ours = UNet3D.from_pretrained(folder, device=device, dtype=torch.float32)  # the fp16 file, upcast
        both_paths(ref, ours, torch.float32, shapes, cfg["cross_attention_dim"], device, rows, outs)
    for shape in shapes:
        extra.append(("×".join(map(str, shape)), rel_err(outs[(shape, torch.float16)], outs[(shape, torch.float32)])))

    text = report(rows, extra, args, device, n_params, time.time() - start)
    print(text)
    print(f"wrote {write_report(args.out, text)}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""What the guidance pass keeps for its backward: bytes of saved activations per UNet part, on the CPU.

What to read: `lvd-method.md` §4.6 (the guidance pass: a cond-only forward whose graph is kept, then a backward to
the latents) and §10.15 (the official code keeps the whole graph); results/perf-notes.md (what this decided).

Method: the real 1.7B config with random weights, one guidance pass (truncated after the last guided layer, as
lvd runs it) under `torch.autograd.graph.saved_tensors_hooks`. Every tensor that autograd saves is attributed
to the innermost named module running when it was saved, and counted once per storage, at 2 bytes per element
(fp16, as on the GPU); weights are left out. The ops save the same tensors on the CPU as on CUDA (GroupNorm and
LayerNorm inputs and statistics, SiLU/GELU inputs, SDPA's q, k, v, output and log-sum-exp; a frozen Linear keeps no
input, and lvd's convolutions keep none either, see memory.py), so the count is a device-independent model of the
GPU's activation memory; it leaves out the transient buffers of the backward. Checked against the GPU: the count
for the plain pass at 24x40x72 before memory.py's convolutions, 17.49 GiB, matches the 17.41 GiB that an H100
measured above the models (results/bench-h100.md).
Activations grow linearly with frames × height × width, so a small frame count is measured and scaled.

Usage: python scripts/saved_activations.py [--latent 2x40x72] [--scale-to 24x40x72] [--checkpointing off,cheap,full]
"""
import argparse
import os
import sys
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import attention  # noqa: E402
from unet3d import UNet3D, UNet3DConfig  # noqa: E402


def part_of(path):
    """'down_blocks.0.temp_convs.1.conv2.2' -> ('down_blocks.0', 'temp_convs'); coarse groups for the table."""
    bits = path.split(".")
    if bits[0] in ("down_blocks", "up_blocks") and len(bits) > 2:
        return f"{bits[0]}.{bits[1]}", bits[2]
    if bits[0] == "mid_block" and len(bits) > 1:
        return "mid_block", bits[1]
    return bits[0] or "(top)", ""


def measure(unet, f, h, w, checkpointing):
    """-> ({(block, kind): bytes at fp16}, total bytes, {module class: bytes}) for one guidance pass at latent f×h×w."""
    x = torch.randn(1, 4, f, h, w)
    ctx = torch.randn(1, 77, 1024)
    masks = attention.layer_masks([[[0.1, 0.3, 0.4, 0.8]] * f], (h, w))
    stack, seen, per_part = [], set(), defaultdict(int)
    cls = {n: type(m).__name__ for n, m in unet.named_modules()}
    per_class = defaultdict(int)
    hooks = [m.register_forward_pre_hook(lambda m, a, _n=n: stack.append(_n)) for n, m in unet.named_modules()]
    hooks += [m.register_forward_hook(lambda m, a, o: stack.pop() and None) for m in unet.modules()]

    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}  # saved weights (views too) are not activations

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            if key[0] not in weights and t.untyped_storage().nbytes() > 1024:
                nb = t.untyped_storage().nbytes() // t.element_size() * 2
                per_part[part_of(stack[-1] if stack else "")] += nb
                per_class[cls.get(stack[-1], "?") if stack else "(top)"] += nb
        return t

    store = attention.AttentionStore(attention.GUIDED_LAYERS, truncate=True)
    params = attention.GuidanceParams()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            z = x.requires_grad_(True)
            unet(z, 999, ctx, store=store, checkpoint=checkpointing)
            loss = attention.energy(store.maps, masks, [[1]], params)
        torch.autograd.grad(loss, z)
    finally:
        for hk in hooks:
            hk.remove()
    return dict(per_part), sum(per_part.values()), dict(per_class)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latent", default="2x40x72", help="frames x latent height x latent width measured")
    ap.add_argument("--scale-to", default="24x40x72", help="the size reported (linear scaling in f·h·w)")
    ap.add_argument("--checkpointing", default="off,cheap,full")
    args = ap.parse_args(argv)
    f, h, w = (int(v) for v in args.latent.split("x"))
    F, H, W = (int(v) for v in args.scale_to.split("x"))
    scale = (F * H * W) / (f * h * w)
    torch.manual_seed(0)
    unet = UNet3D(UNet3DConfig()).eval().requires_grad_(False)
    modes = {"off": "off", "cheap": "cheap", "full": "full"}
    results = {}
    for name in args.checkpointing.split(","):
        results[name] = measure(unet, f, h, w, modes[name])
        print(f"{name}: {results[name][1] * scale / 2 ** 30:.2f} GiB at {args.scale_to}; by module class: " +
              ", ".join(f"{k} {v * scale / 2 ** 30:.2f}" for k, v in sorted(results[name][2].items(), key=lambda kv: -kv[1])),
              file=sys.stderr, flush=True)
    names = list(results)
    parts = sorted({p for r, _, _ in results.values() for p in r}, key=lambda p: -results[names[0]][0].get(p, 0))
    print(f"\nSaved activations of one guidance pass (fp16 bytes, measured at {args.latent}, scaled to {args.scale_to})\n")
    print("| part | kind | " + " | ".join(f"{n} GiB" for n in names) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for p in parts:
        cells = [f"{results[n][0].get(p, 0) * scale / 2 ** 30:.2f}" for n in names]
        if max(float(c) for c in cells) >= 0.05:
            print(f"| {p[0]} | {p[1]} | " + " | ".join(cells) + " |")
    print("| **total** | | " + " | ".join(f"**{results[n][1] * scale / 2 ** 30:.2f}**" for n in names) + " |")


if __name__ == "__main__":
    main()

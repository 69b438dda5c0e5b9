"""Which ops copy memory in the guidance pass, and how much: every aten copy (copy_, clone, _to_copy, cat) seen in
the truncated pass's forward and backward, by the autograd node that ran it, with the bytes written.

What to read: results/perf-notes.md (the pass's 'copies' kernels); memory.py, fused.py (the autograd Functions).

Usage: python scripts/copy_sources.py [--size 24x320x576] [--no-fused] (CUDA: the real config, fp16, random
weights; --smoke: the tiny config on the CPU).
"""
import argparse
import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)

import attention  # noqa: E402
from bench_layout import setup  # noqa: E402

COPIES = {"aten.copy_.default", "aten.clone.default", "aten._to_copy.default", "aten.cat.default"}


class CopyLog(TorchDispatchMode):
    """Counts copy ops and their output bytes by (autograd node or 'forward', op, output shape)."""

    def __init__(self):
        super().__init__()
        self.calls, self.bytes = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) in COPIES and isinstance(out, torch.Tensor):
            node = torch._C._current_autograd_node()
            key = (node.name() if node is not None else "forward", str(func).split(".")[1], tuple(out.shape))
            self.calls[key] += 1
            self.bytes[key] += out.numel() * out.element_size()
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="24x320x576", help="frames x height x width in pixels")
    ap.add_argument("--no-fused", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    device, dtype, cfg, unet = setup(args.smoke)
    unet.fuse_(not args.no_fused)
    f, hp, wp = (int(v) for v in ("2x64x96" if args.smoke else args.size).split("x"))
    h, w = hp // 8, wp // 8
    x = torch.randn(1, 4, f, h, w, device=device, dtype=dtype)
    cond = torch.randn(1, 77, cfg.cross_attention_dim, device=device, dtype=dtype)
    masks = attention.layer_masks([[[0.1, 0.3, 0.45, 0.8]] * f], (h, w))
    guide = attention.LatentGuidance(unet, cond, masks, [[2]], [0.5] * 1000, attention.preset("benchmark"))
    guide.loss_and_grad(x, 500)  # warm-up
    log = CopyLog()
    with log:
        guide.loss_and_grad(x, 500)
    total = sum(log.bytes.values())
    print(f"# copies in one guidance pass, {args.size}, fused={not args.no_fused}: {sum(log.calls.values())} ops, "
          f"{total / 2 ** 30:.2f} GiB written")
    by_node = collections.Counter()
    for (node, op, _), b in log.bytes.items():
        by_node[node, op] += b
    for (node, op), b in by_node.most_common():
        n = sum(c for (nd, o, _), c in log.calls.items() if (nd, o) == (node, op))
        print(f"  {b / 2 ** 30:7.3f} GiB  x{n:<4d} {node}: {op}")
    print("  largest single shapes:")
    for key, b in log.bytes.most_common(12):
        print(f"    {b / 2 ** 20:9.1f} MiB x{log.calls[key]:<4d} {key}")
    if device.type == "cuda":
        copy_kernels_by_op(lambda: guide.loss_and_grad(x, 500))


def copy_kernels_by_op(fn, pattern="copy"):
    """The copy kernels of one call of fn (CUDA), by the chain of ops that launched them, from the autograd node
    down: this sees the copies made inside C++ ops too (the dispatch log above sees only the outermost ops)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    us, calls = collections.Counter(), collections.Counter()
    for e in prof.events():
        kernels = [k for k in getattr(e, "kernels", []) if pattern in k.name.lower()]
        if not kernels:
            continue
        chain, p = [], e
        while p is not None and not p.name.startswith("autograd::engine::evaluate_function"):
            chain.append(p.name)
            p = p.cpu_parent
        node = "forward" if p is None else p.name.split(": ")[-1]
        key = (node, " < ".join(chain[:4]))
        us[key] += sum(k.duration for k in kernels)
        calls[key] += len(kernels)
    print(f"\n# '{pattern}' kernels by the ops that launched them: {sum(us.values()) / 1e3:.2f} ms, "
          f"{sum(calls.values())} kernels")
    for key, t in us.most_common(15):
        print(f"  {t / 1e3:7.2f} ms x{calls[key]:<4d} {key[0]}: {key[1]}")


if __name__ == "__main__":
    main()

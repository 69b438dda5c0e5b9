"""Time and peak memory of loading a full-size (1.41 B parameter, ~2.8 GB fp16) UNet checkpoint.

What to read: `style.md` §4.6 (lean, strict loading: meta-device build, no double allocation),
`modelscope-architecture.md` §2.2 (file sizes) and §5 (parameter count).

Official implementation: none; the loader measured is `weights/checkpoint.py` `load_module`, through
`UNet3D.from_pretrained`. Target: peak RSS of the loading process ≤ 1.5 × the file size for an fp16
load (one copy of the weights, no fp32 copy, plus the Python + torch baseline).

Differences from a real download: the weights are random fp16 (same keys, shapes and file layout as
unet/diffusion_pytorch_model.fp16.safetensors), and the file is in the page cache when loaded (it was
just written), so the time is the warm-cache time.

Each step runs in its own fresh process: the writer (holds all 2.8 GB to call save_file) and one
measurement per dtype, so every peak RSS belongs to one load only.

Usage: python scripts/load_cost.py [--out results/load_cost.md] [--workdir /tmp] [--dtypes float16,float32] [--keep]
"""
import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

WEIGHTS = "diffusion_pytorch_model.fp16.safetensors"
TARGET = 1.5  # peak RSS / file size, fp16 load


def proc_status(field):
    """A /proc/self/status field in bytes (e.g. VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def write_checkpoint(folder):
    """Random fp16 weights for the real UNet3DConfig, keys and shapes from lvd's UNet3D on meta."""
    import torch
    from safetensors.torch import save_file

    from unet3d import UNet3D, UNet3DConfig
    cfg = UNet3DConfig()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet3D(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: (0.02 * torch.randn(s, generator=g)).half() for k, s in shapes.items()}
    save_file(state, os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump({"_class_name": "UNet3DConditionModel", **dataclasses.asdict(cfg)}, fh)
    print(json.dumps({"tensors": len(state), "params": sum(t.numel() for t in state.values())}))


def measure(folder, dtype_name):
    """Load once in this (fresh) process; print the measurements as one JSON line."""
    import torch

    from unet3d import UNet3D
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base_rss, base_hwm = proc_status("VmRSS"), proc_status("VmHWM")
    t0 = time.perf_counter()
    model = UNet3D.from_pretrained(folder, dtype=getattr(torch, dtype_name))
    seconds = time.perf_counter() - t0
    params = list(model.parameters())
    print(json.dumps({
        "seconds": seconds, "base_rss": base_rss, "base_hwm": base_hwm,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "vm_hwm": proc_status("VmHWM"), "rss_after": proc_status("VmRSS"),
        "params": sum(p.numel() for p in params), "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in params}),
        "devices": sorted({p.device.type for p in params}),
    }))


def run_child(*args):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n):
    return n / 2**30


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "load_cost.md"))
    ap.add_argument("--workdir", default=None, help="where the temporary 2.8 GB checkpoint goes (local disk)")
    ap.add_argument("--dtypes", default="float16,float32", help="load dtypes to measure (target applies to float16)")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoint folder")
    ap.add_argument("--_write", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--_measure", nargs=2, metavar=("DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._write:
        return write_checkpoint(args._write)
    if args._measure:
        return measure(*args._measure)

    folder = tempfile.mkdtemp(dir=args.workdir, prefix="lvd_load_cost_")
    rows = []
    try:
        t0 = time.perf_counter()
        written = run_child("--_write", folder)
        write_s = time.perf_counter() - t0
        size = os.path.getsize(os.path.join(folder, WEIGHTS))
        print(f"wrote {written['tensors']} tensors, {written['params']:,} params, {gib(size):.2f} GiB "
              f"in {write_s:.0f} s to {folder}", flush=True)
        for dt in args.dtypes.split(","):
            r = run_child("--_measure", folder, dt)
            peak = max(r["ru_maxrss"], r["vm_hwm"])
            ok = peak <= TARGET * size and r["dtypes"] == ["float16"] if dt == "float16" else None
            rows.append((dt, r, peak, ok))
            print(f"{dt}: {r['seconds']:.1f} s, peak RSS {gib(peak):.2f} GiB = {peak / size:.2f} x file, "
                  f"baseline {gib(r['base_rss']):.2f} GiB, params {r['dtypes']}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    lines = [
        "# Loading cost of the full-size UNet3D checkpoint (random fp16 weights)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; host: "
        f"{platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}",
        f"- file: {WEIGHTS}, {size:,} bytes ({gib(size):.2f} GiB), {written['tensors']} tensors, "
        f"{written['params']:,} parameters; warm page cache (just written); load on CPU",
        "- each load in a fresh process; baseline = RSS after `import torch, unet3d`, before loading",
        f"- target (float16): peak RSS ≤ {TARGET} × file size, parameters all float16",
        "",
        "| load dtype | load s | MB/s | peak RSS ru_maxrss GiB | VmHWM GiB | baseline GiB | params GiB |"
        " peak / file | (peak − baseline) / file | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dt, r, peak, ok in rows:
        lines.append(
            f"| {dt} | {r['seconds']:.1f} | {size / 1e6 / r['seconds']:.0f} | {gib(r['ru_maxrss']):.2f} | "
            f"{gib(r['vm_hwm']):.2f} | {gib(r['base_rss']):.2f} | {gib(r['param_bytes']):.2f} | {peak / size:.2f} | "
            f"{(peak - r['base_rss']) / size:.2f} | {'n/a (info)' if ok is None else 'PASS' if ok else 'FAIL'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, args.out)  # atomic
    print(f"wrote {args.out}")
    return 0 if all(ok is not False for _, _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

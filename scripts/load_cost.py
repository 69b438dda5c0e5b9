"""Time and peak memory of loading a full-size (1.41 B parameter, ~2.8 GB fp16) UNet checkpoint.

What to read: `style.md` §4.6 (lean, strict loading: meta-device build, no double allocation),
`modelscope-architecture.md` §2.2 (file sizes) and §5 (parameter count).

Official implementation: none; the loader measured is `weights/checkpoint.py` `load_module`, through
`UNet3D.from_pretrained`: header checks, a meta-device build with initialisers skipped, then each tensor
read by safetensors' `safe_open(..., device=...)` straight onto the device (on the CPU with the `pread`
backend where safetensors has it). Target: peak RSS growth of a CPU fp16 load ≤ 1.5 × the file size
(one copy of the weights, no fp32 copy). GPU loads are timed for information (and their host RSS shown).

Differences from a real download: the weights are random fp16 (same keys, shapes and file layout as
unet/diffusion_pytorch_model.fp16.safetensors), and the file is in the page cache when loaded (it was
just written), so the time is the warm-cache time.

Each step runs in its own fresh process: the writer (holds all 2.8 GB to call save_file) and one
measurement per device and dtype, so every peak belongs to one load only. The peak is the load's own:
the child resets VmHWM (/proc/self/clear_refs) just before loading, after `import torch, unet3d`.

Usage: python scripts/load_cost.py [--out results/load_cost.md] [--workdir /tmp] [--dtypes float16,float32]
           [--devices cpu,cuda] [--folder DIR (reuse or keep a written checkpoint)] [--small] [--keep]
--small writes a UNet of 64/64/128/128 channels (~80 MB) instead: a quick check that the script works.
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
TARGET = 1.5  # peak RSS growth / file size, fp16 load on the CPU
SMALL_CHANNELS = (64, 64, 128, 128)


def proc_status(field):
    """A /proc/self/status field in bytes (e.g. VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak():
    """VmHWM := VmRSS (Linux >= 4.0), so that VmHWM afterwards is the peak of what follows. -> done?"""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def write_checkpoint(folder, small):
    """Random fp16 weights for the real (or --small) UNet3DConfig, keys and shapes from lvd's UNet3D on meta."""
    import torch
    from safetensors.torch import save_file

    from unet3d import UNet3D, UNet3DConfig
    cfg = UNet3DConfig()
    if small:
        cfg = dataclasses.replace(cfg, block_out_channels=SMALL_CHANNELS)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet3D(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: (0.02 * torch.randn(s, generator=g)).half() for k, s in shapes.items()}
    save_file(state, os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump({"_class_name": "UNet3DConditionModel", **dataclasses.asdict(cfg)}, fh)
    print(json.dumps({"tensors": len(state), "params": sum(t.numel() for t in state.values())}))


def measure(folder, device, dtype_name):
    """Load once in this (fresh) process; print the measurements as one JSON line."""
    import safetensors
    import torch

    from unet3d import UNet3D
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.empty(1, device=device)  # the CUDA context is not part of the load
    base_rss, base_hwm = proc_status("VmRSS"), proc_status("VmHWM")
    reset = reset_peak()
    t0 = time.perf_counter()
    model = UNet3D.from_pretrained(folder, device=device, dtype=getattr(torch, dtype_name))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    params = list(model.parameters())
    print(json.dumps({
        "seconds": seconds, "base_rss": base_rss, "base_hwm": base_hwm, "reset": reset,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux; not reset
        "vm_hwm": proc_status("VmHWM"), "rss_after": proc_status("VmRSS"),
        "gpu_peak": torch.cuda.max_memory_allocated() if cuda else 0,
        "params": sum(p.numel() for p in params), "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in params}),
        "devices": sorted({p.device.type for p in params}),
        "versions": f"torch {torch.__version__}, safetensors {safetensors.__version__}",
    }))


def run_child(*args):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"load_cost child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n):
    return n / 2**30


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "load_cost.md"))
    ap.add_argument("--workdir", default=None, help="where the temporary 2.8 GB checkpoint goes (local disk)")
    ap.add_argument("--folder", default=None, help="checkpoint folder to reuse (written there if absent, kept)")
    ap.add_argument("--dtypes", default="float16,float32", help="load dtypes to measure (target: float16 on cpu)")
    ap.add_argument("--devices", default="cpu", help="devices to load onto, e.g. cpu,cuda")
    ap.add_argument("--small", action="store_true", help=f"a {SMALL_CHANNELS} channel UNet (~80 MB): a quick run")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoint folder")
    ap.add_argument("--_write", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--_measure", nargs=3, metavar=("DIR", "DEVICE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._write:
        return write_checkpoint(args._write, args.small)
    if args._measure:
        return measure(*args._measure)

    folder = args.folder or tempfile.mkdtemp(dir=args.workdir, prefix="lvd_load_cost_")
    keep = args.keep or args.folder is not None
    rows = []
    try:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, WEIGHTS)
        if not os.path.isfile(path):
            t0 = time.perf_counter()
            run_child("--_write", folder, *(["--small"] if args.small else []))
            print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
        from weights.checkpoint import read_header
        entries, _ = read_header(path)
        written = {"tensors": len(entries), "params": sum(_numel(e[1]) for e in entries.values())}
        size = os.path.getsize(path)
        print(f"{written['tensors']} tensors, {written['params']:,} params, {gib(size):.2f} GiB", flush=True)
        for dev in args.devices.split(","):
            for dt in args.dtypes.split(","):
                r = run_child("--_measure", folder, dev, dt)
                peak = r["vm_hwm"] if r["reset"] else max(r["ru_maxrss"], r["vm_hwm"])
                growth = peak - r["base_rss"]
                ok = growth <= TARGET * size and r["dtypes"] == ["float16"] if (dt, dev) == ("float16", "cpu") else None
                rows.append((dev, dt, r, peak, growth, ok))
                print(f"{dev} {dt}: {r['seconds']:.2f} s, {size / 1e9 / r['seconds']:.2f} GB/s, peak RSS "
                      f"{gib(peak):.2f} GiB, growth {growth / size:.2f} x file, baseline {gib(r['base_rss']):.2f} GiB, "
                      f"GPU peak {gib(r['gpu_peak']):.2f} GiB, params {r['dtypes']} on {r['devices']}", flush=True)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)

    lines = [
        "# Loading cost of the full-size UNet3D checkpoint (random fp16 weights)" if not args.small else
        f"# Loading cost of a small ({', '.join(map(str, SMALL_CHANNELS))} channel) UNet3D checkpoint (a quick check)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; host: "
        f"{platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}; {rows[0][2]['versions']}",
        f"- file: {WEIGHTS}, {size:,} bytes ({gib(size):.2f} GiB), {written['tensors']} tensors, "
        f"{written['params']:,} parameters; warm page cache (just written)",
        "- each load in a fresh process; baseline = RSS after `import torch, unet3d` (and the CUDA context), before "
        "loading; peak = VmHWM reset at the baseline" + ("" if all(r["reset"] for _, _, r, _, _, _ in rows) else
                                                         " (reset refused here: peak includes the import's)"),
        f"- target (cpu, float16): peak RSS growth ≤ {TARGET} × file size, parameters all float16",
        "",
        "| device | load dtype | load s | GB/s | peak RSS GiB | baseline GiB | params GiB | GPU peak GiB |"
        " peak / file | (peak − baseline) / file | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dev, dt, r, peak, growth, ok in rows:
        lines.append(
            f"| {dev} | {dt} | {r['seconds']:.2f} | {size / 1e9 / r['seconds']:.2f} | {gib(peak):.2f} | "
            f"{gib(r['base_rss']):.2f} | {gib(r['param_bytes']):.2f} | {gib(r['gpu_peak']):.2f} | {peak / size:.2f} | "
            f"{growth / size:.2f} | {'n/a (info)' if ok is None else 'PASS' if ok else 'FAIL'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    from outputs import write_report
    print(f"wrote {write_report(args.out, text)}")
    return 0 if all(ok is not False for *_, ok in rows) else 1


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    sys.exit(main())

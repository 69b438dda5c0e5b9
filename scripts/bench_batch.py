"""Throughput of batch.py on 1, 2, 4 … GPUs (torchrun, NCCL): videos per minute and scaling efficiency.

What to read: `lvd-method.md` §5–§6 (the benchmark setting: ModelScope 256×256, 16 frames, 40 steps,
the benchmark guidance preset); batch.py (the sharded batch mode measured here); issue 8.

Official implementation: none; the official generate.py runs one process on one GPU.

Method (and differences from a real benchmark run):
- The real 1.7B configs with random weights (weights/make_tiny.py full=True), fp16 on CUDA.
- The benchmark preset with `--loss-threshold -1` (default): all 10 × 5 guidance passes run for every
  video, as bench.py's guided video (c); with random weights the energy means nothing, so this fixes
  the cost per video at its upper bound. Layouts: the shipped example layouts (data/layouts), each
  served for every sample index.
- Weak scaling: N GPUs get N × --videos-per-gpu jobs, one torchrun launch per N, a fresh output folder.
- End-to-end throughput: videos / the launch's wall time (process start, model load, all videos, index).
  Steady throughput: the videos after each rank's first, over the window from the earliest end of a
  rank's first video to the latest end of a last one (timestamps of index.jsonl, one host's clock).
- Scaling efficiency = throughput(N) / (N × throughput(1)), both measured by this invocation.
With --tiny: the tiny model on the CPU, gloo ranks, 2 frames of 32×32, 2 steps (checks the script only).

Usage: python scripts/bench_batch.py --gpus 1,2,4 [--videos-per-gpu 8] [--out results/bench_batch.md]
       python scripts/bench_batch.py --tiny --gpus 1,2 --videos-per-gpu 3 --out /tmp/bench_batch.md
"""
import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import batch  # noqa: E402
import planner  # noqa: E402
from weights.make_tiny import make_tiny  # noqa: E402

REAL = dict(frames=16, height=256, width=256, steps=40)     # the benchmark setting (§5)
TINY = dict(frames=2, height=32, width=32, steps=2)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layout_cache(path, size, copies):
    """A layout cache (our format) with each example reply under sample indices 0…copies-1; -> prompts."""
    src = planner.LayoutCache(planner.EXAMPLES_PATH, read_only=True)
    cache, prompts = planner.LayoutCache(path), []
    for (template, model, prompt, _), reply in sorted(src.entries.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", planner.LayoutWarning)
            planner.parse_layout(reply, prompt)  # a shipped reply must parse
        prompts.append(prompt)
        for k in range(copies):
            cache.entries[(template, model, prompt, k)] = reply
    cache.save()
    return prompts


def measure(n, args, size, model_dir, prompts, work):
    """One torchrun launch of batch.py with n ranks; -> a result row (dict)."""
    jobs = n * args.videos_per_gpu
    pfile = os.path.join(work, f"prompts{n}.txt")
    with open(pfile, "w", encoding="utf-8") as fh:
        fh.writelines(prompts[i % len(prompts)] + "\n" for i in range(jobs))
    out = os.path.join(work, f"run{n}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), os.path.join(ROOT, "batch.py"), "--prompts", pfile, "--out", out,
           "--model-dir", model_dir, "--layout-cache", os.path.join(work, "layouts.json"),
           "--llm-cache", os.path.join(work, "llm-cache.json"), "--guidance", "benchmark",
           "--loss-threshold", str(args.loss_threshold), "--device", "cpu" if args.tiny else "cuda",
           *[f"--{k}={v}" for k, v in size.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": str(1 if args.tiny else max(1, (os.cpu_count() or n) // n))}
    print(f"bench_batch: {n} rank(s), {jobs} videos: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"batch.py with {n} ranks exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    with open(os.path.join(out, "index.jsonl"), encoding="utf-8") as fh:
        recs = [json.loads(line) for line in fh]
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    done = [x for x in recs if x["status"] == "done"]
    by_rank = {}
    for x in done:
        by_rank.setdefault(x["rank"], []).append(x["t_end"])
    ends = [sorted(v) for v in by_rank.values()]
    window = max(e[-1] for e in ends) - min(e[0] for e in ends) if ends else 0.0
    steady_n = len(done) - len(ends)
    return dict(gpus=n, videos=len(done), failed=len(recs) - len(done), wall_s=wall,
                e2e_vpm=60 * len(done) / wall, steady_vpm=60 * steady_n / window if window > 0 and steady_n else None,
                s_per_video=statistics.median(x["timings_s"]["total_s"] for x in done) if done else None,
                load_s=max(s.get("load_s", 0.0) for s in summary["ranks"]),
                reasons=sorted({x.get("reason", "")[:120] for x in recs if x["status"] == "failed"}))


def table(rows):
    base = next((r for r in rows if r.get("gpus") == 1 and "videos" in r), None)

    def eff(r, key):
        if base is None or not r.get(key) or not base.get(key):
            return ""
        return f"{100 * r[key] / (r['gpus'] * base[key]):.1f}%"

    lines = ["| GPUs | videos | failed | wall s | videos/min (end to end) | efficiency | videos/min (steady) | "
             "efficiency | median s/video | load s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "videos" not in r:
            lines.append(f"| {r['gpus']} | not run: {r['why']} |  |  |  |  |  |  |  |  |")
            continue
        steady = f"{r['steady_vpm']:.2f}" if r["steady_vpm"] else ""
        lines.append(f"| {r['gpus']} | {r['videos']} | {r['failed']} | {r['wall_s']:.1f} | {r['e2e_vpm']:.2f} | "
                     f"{eff(r, 'e2e_vpm')} | {steady} | {eff(r, 'steady_vpm')} | {r['s_per_video']:.2f} | "
                     f"{r['load_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--gpus", default="1,2,4", help="rank counts to measure, comma-separated")
    ap.add_argument("--videos-per-gpu", type=int, default=8)
    ap.add_argument("--loss-threshold", type=float, default=-1.0, help="-1 forces every guidance pass")
    ap.add_argument("--model-dir", help="full-size model folder; made with random weights when missing")
    ap.add_argument("--workdir", help="scratch folder (default: a new temporary folder, removed at the end)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_batch.md"))
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU with gloo (tests the script)")
    args = ap.parse_args(argv)
    counts = [int(s) for s in args.gpus.split(",")]
    if args.videos_per_gpu < 2 or min(counts) < 1:
        ap.error("--videos-per-gpu must be >= 2 (steady throughput skips each rank's first video); --gpus >= 1")
    if not args.tiny and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU machine, or pass --tiny for the CPU check")
    work = args.workdir or tempfile.mkdtemp(prefix="bench_batch.")
    os.makedirs(work, exist_ok=True)
    size = TINY if args.tiny else REAL
    model_dir = args.model_dir or os.path.join(work, "model-tiny" if args.tiny else "model-full")
    if not os.path.isdir(model_dir):
        t = time.perf_counter()
        make_tiny(model_dir, seed=0, fp16_variants=True, full=not args.tiny, device="cpu" if args.tiny else "cuda")
        if not args.tiny:
            torch.cuda.empty_cache()           # the ranks need GPU 0 more than this process does
        print(f"bench_batch: wrote random weights to {model_dir} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    prompts = layout_cache(os.path.join(work, "layouts.json"), size, max(counts) * args.videos_per_gpu)
    visible = os.cpu_count() if args.tiny else torch.cuda.device_count()
    device = "CPU (tiny model, gloo)" if args.tiny else f"{torch.cuda.get_device_name()} (NCCL)"
    rows = []
    for n in counts:
        if n > visible:
            rows.append(dict(gpus=n, why=f"{n} requested, {visible} visible"))
            continue
        rows.append(measure(n, args, size, model_dir, prompts, work))
        print(table(rows), file=sys.stderr, flush=True)
    s = " ".join(f"{k} {v}" for k, v in size.items())
    forced = "every guidance pass forced" if args.loss_threshold < 0 else "as set"
    text = (f"# batch.py throughput: {device}, {datetime.date.today()}\n\n"
            f"torch {torch.__version__}; {'float32' if args.tiny else 'float16'}; "
            f"{'tiny random model' if args.tiny else 'real 1.7B config, random weights'}; {s}; guidance preset "
            f"benchmark with loss_threshold {args.loss_threshold} ({forced}); "
            f"{args.videos_per_gpu} videos per GPU (weak scaling); one torchrun launch per row. Efficiency = "
            f"throughput / (GPUs × the 1-GPU throughput); the target is >= 90%.\n\n{table(rows)}\n")
    for r in rows:
        for why in r.get("reasons", []):
            text += f"\n- {r['gpus']} GPU(s), failed job: {why}"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    batch.write_atomic(args.out, text)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a user of the CLI waits for: `python lvd.py --prompt ...` run as a subprocess, from process start to exit.

Usage (a CUDA machine; the real 1.7B config with random weights, made with weights/make_tiny.py when missing):
    python scripts/bench_cli.py --out results/bench_cli.md [--model-dir DIR] [--sizes modelscope,zeroscope]
    python scripts/bench_cli.py --smoke --out /tmp/cli.md   (the tiny model on the CPU: checks this script)

Rows per size (the model's preset: modelscope 256×256×16, zeroscope 576×320×24): guided with the defaults and an
empty Triton kernel cache (a fresh TRITON_CACHE_DIR: the first run on a machine), the same with the cache filled,
`--no-fast`, `--guidance off`; and `python lvd.py --help` against `python -c "import torch"`. Columns: the wall time
and the stages the CLI reports on its last line (plan, load, denoise, decode, save); "of it, first step" is denoise
less the later steps as the progress bar times them: the first step with the first calls' set-up (cuDNN and cuBLAS,
the Triton kernels compiled or loaded, the guidance graph's capture; the CFG graph's is in step 2); "the rest" is
the wall time less the stages (interpreter start, imports, CUDA set-up, the text encoder). The table names its
date, GPU and commit.

Python's bytecode: `pip install` writes torch's compiled modules (.pyc) beside its sources, and every run then reads
them. Some images ship without them, or with stale ones, and write none (PYTHONDONTWRITEBYTECODE, a read-only
site-packages); there every process compiles about 940 of torch's modules again (1.9 s on the H100 machine). Where
torch's own bytecode is missing or stale (`usable_bytecode`), the runs get PYTHONPYCACHEPREFIX (a folder of this
run, filled once before the first row), as a pip install would have it, and the table says so and gives `import
torch` both ways (`--no-bytecode-cache`: as found).

Official implementation: none (the official code is a script run the same way: generation/lvd.py).
"""
import argparse
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "A bear walks from the left to the right"  # its layout ships in data/layouts/examples.json
STAGES = ("plan", "load", "denoise", "decode", "save")
COLUMNS = ("plan", "load", "denoise", "first", "decode", "save")  # first: a part of denoise (the module docstring)


def run(argv, env=None):
    """(wall seconds, {stage: seconds}) of one CLI run; a failed run raises with its stderr's end."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr[-1500:]}")
    m = re.search(r"lvd: wrote (.*?)  \((.*)\)\s*$", p.stdout)  # the run folder, then the stage times
    if not m:
        return wall, {}
    stages = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", m.group(2))}
    later = [float(v) for i, v in re.findall(r"\b(\d+)/\d+\s+([\d.]+) s/step", p.stderr) if int(i) > 1]
    if later:  # the progress bar times each step; a stage line inside step 1 restarts its clock
        with open(os.path.join(ROOT, m.group(1), "run.json")) as f:  # the unrounded stage times
            stages["first"] = max(json.load(f)["timings_s"]["denoise_s"] - sum(later), 0.0)
    return wall, stages


def usable_bytecode(source):
    """Whether Python would read `source`'s bytecode instead of compiling it again: a .pyc of this interpreter's
    magic number that records the source's mtime and size (or is hash-based). A stale .pyc is compiled again in
    every process where none may be written, as if there were none."""
    try:
        with open(importlib.util.cache_from_source(source), "rb") as f:
            head = f.read(16)
        st = os.stat(source)
    except OSError:
        return False
    if len(head) < 16 or head[:4] != importlib.util.MAGIC_NUMBER:
        return False
    if int.from_bytes(head[4:8], "little") & 1:  # hash-based (PEP 552)
        return True
    return (int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF)


def bytecode_env(work):
    """(extra environment, a note for the table): PYTHONPYCACHEPREFIX under `work` where torch has no usable
    bytecode."""
    if usable_bytecode(importlib.util.find_spec("torch").origin):
        return {}, "torch's bytecode as installed"
    return ({"PYTHONPYCACHEPREFIX": os.path.join(work, "pycache"), "PYTHONDONTWRITEBYTECODE": ""},
            "this installation of torch has no usable bytecode (.pyc: missing or stale); the runs read it from "
            "PYTHONPYCACHEPREFIX, filled once before the first row, as `pip install` would have written it")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", help="a full-size model folder; made with random weights when missing")
    ap.add_argument("--sizes", default="modelscope,zeroscope", help="model presets, comma-separated")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_cli.md"))
    ap.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, 2 steps (numbers mean nothing)")
    ap.add_argument("--no-bytecode-cache", action="store_true", help="run with Python's bytecode as found")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from outputs import code_commit, write_report
    from weights.make_tiny import make_tiny
    work = tempfile.mkdtemp(prefix="lvd-bench-cli-")
    if args.smoke:
        model_dir = make_tiny(os.path.join(work, "tiny"), seed=0)
        extra = ["--device", "cpu", "--steps", "2", "--frames", "2", "--height", "64", "--width", "64"]
        sizes = ["modelscope"]
    else:
        model_dir = args.model_dir or os.path.join(tempfile.gettempdir(), "lvd-full-random")
        if not os.path.isdir(model_dir):
            make_tiny(model_dir, seed=0, fp16_variants=True, full=True, device="cuda")
        extra, sizes = [], args.sizes.split(",")
    pyc, pyc_note = ({}, "Python's bytecode as found") if args.no_bytecode_cache else bytecode_env(work)
    base_env = dict(os.environ, **pyc)
    if pyc:  # compile lvd's, torch's and Triton's modules into the cache once
        run(["-c", "import lvd, fast.kernels, fast.kernels_rows, fast.kernels_attention, fast.precompile"], base_env)
    rows = []
    for size in sizes:
        base = ["lvd.py", "--prompt", DEMO, "--model", size, "--model-dir", model_dir, *extra]
        cases = [("guided, defaults, kernel cache empty", []), ("guided, defaults, kernel cache filled", []),
                 ("guided, --no-fast", ["--no-fast"]), ("--guidance off", ["--guidance", "off"])]
        cache = os.path.join(work, f"triton-{size}")  # empty for the first case; the later ones find it filled
        for label, flags in cases:
            env = dict(base_env, TRITON_CACHE_DIR=cache)
            wall, stages = run([*base, *flags, "--out", os.path.join(work, "out")], env)
            rows.append((size, label, wall, stages))
            print(f"{size} | {label} | {wall:.1f} s | {stages}", file=sys.stderr, flush=True)
    torch_s = min(run(["-c", "import torch"], base_env)[0] for _ in range(3))
    help_s = min(run(["lvd.py", "--help"], base_env)[0] for _ in range(3))
    found = f", {min(run(['-c', 'import torch'])[0] for _ in range(3)):.2f} s with the bytecode as found" if pyc else ""
    import torch
    where = "CPU smoke run of the tiny model (numbers mean nothing)" if args.smoke else torch.cuda.get_device_name()
    lines = [f"# `python lvd.py` as a user runs it: {where}, {datetime.date.today()}, commit {code_commit()}", "",
             f"Wall time from process start to exit (a subprocess each); the stages as the CLI reports them. "
             f"`python lvd.py --help`: {help_s:.2f} s, against {torch_s:.2f} s for `python -c \"import torch\"` "
             f"(best of 3 each{found}). Python's bytecode: {pyc_note}.", "",
             "| size | run | wall s | " + " | ".join("of it, first step" if k == "first" else k for k in COLUMNS)
             + " | the rest |",
             "| --- | --- | --- | " + " | ".join("---" for _ in COLUMNS) + " | --- |"]
    for size, label, wall, st in rows:
        rest = wall - sum(st.get(k, 0.0) for k in STAGES)
        lines.append(f"| {size} | {label} | {wall:.1f} | " + " | ".join(f"{st.get(k, 0.0):.1f}" for k in COLUMNS)
                     + f" | {rest:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

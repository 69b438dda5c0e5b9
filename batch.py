"""Batch generation across processes with torch.distributed: sharded, resumable, one index of every job.

What to read: `lvd-method.md` §5 (seeds: prompt index + seed offset), §6 (the benchmark guidance
preset), §7.1 and §7.4 (the 500 prompts; two runs with seed offsets 0 and 500), §2.7 (the k-th
occurrence of a prompt reads the k-th cached reply).

Official implementation: generate.py in TonyLianLong/LLM-groundedVideoDiffusion @22d90d2 (one
process looping over the prompts with `--seed_offset`; seed = prompt_index + repeat_ind·6789 +
seed_offset) and utils/eval/lvd.py (the prompt list).

Differences:
- Jobs (prompt index, prompt, seed offset) are sharded over torchrun's ranks; the seed of a job is
  prompt index + seed offset whatever the world size, so a job gives the same video on 1 or N ranks
  (bit-identical on the same device, dtype and torch build; see lvd.py on the CPU-drawn noise).
- One video per (prompt, seed): no `repeat_ind` term; a second run is a second seed offset.
- Flat output: `{index:04d}_{slug}_s{seed}/` per job (lvd.save_run: temp folder renamed into place).
  A job whose folder holds run.json is finished and skipped on restart. Rank 0 removes the temp
  folders a killed run left behind.
- Sharding: rank 0 lists the jobs not yet finished at launch and broadcasts the list; pending job k
  goes to rank k % world. A restart after a crash is therefore balanced over all ranks again.
- Failures stay in their job: a layout that cannot be planned, an out-of-memory error or any other
  exception is recorded, and the rank moves on. Failed jobs are retried by the next launch.
- Each rank appends its records to `index.rank{r}.jsonl` as it goes (nothing is lost in a crash);
  at the end the records are all-gathered and rank 0 writes `index.jsonl` and `summary.json`
  atomically. With a live LLM, ranks share the read-through cache file; concurrent puts can lose
  an entry (never corrupt the file), and every job keeps its layout in layout.json.

Glossary: r (rank), W (world size: number of processes), k (job position in the pending list).

Usage: torchrun --nproc-per-node N batch.py --prompts FILE|benchmark --out DIR [--seeds 0,500] [knobs of lvd.py]
       python batch.py ...   (one process, no torch.distributed)
"""
import argparse
import dataclasses
import datetime
import gc
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist

import evaluate
import lvd
import planner


RELEASED_GPT4 = planner.EXAMPLES_PATH.parent / "benchmark_gpt-4-1106-preview.json"  # the paper's layouts (§7)


class BatchError(Exception):
    """A bad prompts file, seed list, output folder or layout cache; the CLI prints it."""


# -----------------------------------------------------------------------------
# jobs

@dataclasses.dataclass(frozen=True)
class Job:
    index: int          # prompt index (0…499 for the benchmark)
    prompt: str
    offset: int         # seed offset (§7.4: 0 for run 0, 500 for run 1)
    sample_index: int   # k-th occurrence of this prompt -> k-th cached reply (§2.7)

    @property
    def seed(self):
        return self.index + self.offset   # §5: prompt_index + seed_offset

    @property
    def name(self):
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:60] or "video"  # as lvd.run_name
        return f"{self.index:04d}_{slug}_s{self.seed}"


def read_prompts(path):
    """Non-empty lines of a UTF-8 file, '#' comment lines skipped, normalised as the planner does."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"--prompts {path}: cannot read the prompts file: {e}") from None
    prompts = [planner.normalise_prompt(s) for s in lines if s.strip() and not s.lstrip().startswith("#")]
    if not prompts:
        raise BatchError(f"--prompts {path}: no prompts (one per line; '#' lines are comments)")
    return prompts


def make_jobs(source, offsets, limit=None):
    """Jobs for `source` ('benchmark' or a prompts file), seed offset by seed offset, in prompt order."""
    prompts = [i.prompt for i in evaluate.benchmark_instances()] if source == "benchmark" else read_prompts(source)
    seen, items = {}, []
    for index, p in enumerate(prompts):
        items.append((index, p, seen.get(p, 0)))
        seen[p] = seen.get(p, 0) + 1
    items = evaluate.select(items, limit)
    return [Job(i, p, off, k) for off in offsets for i, p, k in items]


def parse_seeds(text):
    try:
        offsets = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise BatchError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,500") from None
    if not offsets or len(set(offsets)) != len(offsets) or min(offsets) < 0:
        raise BatchError(f"--seeds {text!r}: expected distinct non-negative integers, e.g. 0,500")
    return offsets


# -----------------------------------------------------------------------------
# layouts: a read-only cache (the official format or ours), then the planner (caches, examples, LLM)

class Layouts:
    def __init__(self, args):
        self.args, self.extra, self.key = args, None, (None, None)
        if args.layout_cache:
            try:
                self.extra, self.key = evaluate.open_cache(args.layout_cache, args.llm_model)
            except (OSError, ValueError) as e:   # CacheError is a ValueError
                raise BatchError(f"--layout-cache {args.layout_cache}: {e}") from None
        try:
            self.cache = planner.LayoutCache(args.llm_cache)
        except planner.CacheError as e:
            raise BatchError(f"--llm-cache: {e}") from None

    def get(self, job):
        """The job's Layout, or a planner error (PlannerError, LayoutError, CacheError)."""
        template, model = self.key
        reply = self.extra.get(job.prompt, job.sample_index, model, template) if self.extra else None
        if reply is not None:
            return planner.parse_layout(reply, job.prompt)
        a = self.args
        return planner.plan(job.prompt, a.llm_base_url, a.llm_model, cache=self.cache,
                            sample_index=job.sample_index, run_dir=a.out)


# -----------------------------------------------------------------------------
# one job

def run_job(pipe, job, args, guidance, layouts, rank, world):
    """Plan (if guided), generate and save one job; return its index record. Never raises an Exception."""
    rec = dict(job=job.name, index=job.index, prompt=job.prompt, seed=job.seed, seed_offset=job.offset,
               sample_index=job.sample_index, rank=rank, status="done", t_start=time.time())
    timings, t0, failure = {}, time.perf_counter(), None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", planner.LayoutWarning)
        try:
            layout = None
            if guidance is not None:
                try:
                    layout = layouts.get(job)
                except (planner.PlannerError, planner.LayoutError, planner.CacheError) as e:
                    failure = ("bad layout", f"{type(e).__name__}: {e}")
            timings["plan_s"] = time.perf_counter() - t0
            if failure is None:
                info = {}
                # cuDNN's algorithm timing and attention kernels: on unless --no-cudnn-benchmark, --no-cudnn-attention
                with lvd.cudnn_benchmark(args.cudnn_benchmark is not False), \
                        lvd.cudnn_attention(args.cudnn_attention is not False):
                    frames = lvd.generate(pipe, job.prompt, layout, args.frames, args.height, args.width,
                                          args.steps, args.cfg, args.negative_prompt, job.seed, args.solver,
                                          guidance, vae_slice=args.vae_slice, info=info, fast=args.fast,
                                          memory=args.checkpointing)
                timings.update(denoise_s=info["denoise_s"], decode_s=info["decode_s"])
                settings = {k: v for k, v in vars(args).items() if k != "seeds"}
                settings.update(prompt=job.prompt, seed=job.seed, index=job.index, seed_offset=job.offset,
                                sample_index=job.sample_index, rank=rank, world_size=world, dtype=str(args.dtype),
                                final_prompt=info.get("final_prompt"), prompt_suffixes=info.get("prompt_suffixes"),
                                guidance_params=dataclasses.asdict(guidance) if guidance is not None else None,
                                guidance_history=info.get("guidance_history"), versions=lvd.versions(),
                                timings_s=timings)
                del info  # it holds the guidance object and its attention maps: free them before saving
                t = time.perf_counter()
                lvd.save_run(args.out, job.name, frames, settings, layout)
                timings["save_s"] = time.perf_counter() - t
        except torch.OutOfMemoryError as e:
            failure = ("out of memory", str(e).split("\n")[0][:300])
        except Exception as e:  # noqa: BLE001 -- isolate the job, record it, go on
            failure = ("error", f"{type(e).__name__}: {e}"[:500])
    if failure is not None:
        rec.update(status="failed", failure=failure[0], reason=failure[1])
        gc.collect()                      # the traceback held the job's tensors until here
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    timings["total_s"] = time.perf_counter() - t0
    rec.update(t_end=time.time(), timings_s={k: round(v, 4) for k, v in timings.items()})
    if caught:
        rec["warnings"] = [str(w.message) for w in caught]
    return rec


# -----------------------------------------------------------------------------
# torch.distributed and the output folder

def init_distributed(args):
    """-> (rank, W). Under torchrun (RANK, WORLD_SIZE set): NCCL on CUDA, one GPU per local rank; else gloo."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = args.device.startswith("cuda")
    if cuda:
        if args.device == "cuda":
            if local >= torch.cuda.device_count():
                raise BatchError(f"local rank {local} has no GPU: {torch.cuda.device_count()} visible")
            args.device = f"cuda:{local}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=args.dist_timeout))
    return dist.get_rank(), dist.get_world_size()


def broadcast(obj, world):
    """rank 0's `obj` on every rank."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj, world):
    """[obj of rank 0, …, obj of rank W-1] on every rank."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def scan(out, jobs):
    """Names of finished jobs (folder with run.json); removes the temp folders of jobs a killed run left."""
    names, done = {j.name for j in jobs}, set()
    for entry in os.listdir(out):
        path = os.path.join(out, entry)
        if entry.startswith(".") and entry[1:].rsplit(".", 1)[0] in names and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)          # lvd.save_run's ".{name}.XXXXXXXX"
        elif entry in names and os.path.isfile(os.path.join(path, "run.json")):
            done.add(entry)
    return done


def skipped_record(out, job, rank):
    rec = dict(job=job.name, index=job.index, prompt=job.prompt, seed=job.seed, seed_offset=job.offset,
               sample_index=job.sample_index, rank=rank, status="skipped", reason="already finished")
    try:
        with open(os.path.join(out, job.name, "run.json"), encoding="utf-8") as fh:
            rec["timings_s"] = json.load(fh).get("timings_s")   # of the launch that made it
    except (OSError, ValueError):
        pass
    return rec


def append_jsonl(path, rec):
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_atomic(path, text):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# -----------------------------------------------------------------------------
# the run

def run(args, jobs, guidance, layouts, rank, world):
    t_launch = time.time()
    launch = broadcast(dict(done=sorted(scan(args.out, jobs)), id=datetime.datetime.now().isoformat(
        timespec="seconds")) if rank == 0 else None, world)
    done = set(launch["done"])
    pending = [j for j in jobs if j.name not in done]
    mine = pending[rank::world]                              # pending job k -> rank k % W
    records = [skipped_record(args.out, j, rank) for j in jobs if j.name in done] if rank == 0 else []
    print(f"batch: rank {rank}/{world} on {args.device}: {len(mine)} of {len(pending)} pending jobs "
          f"({len(done)} of {len(jobs)} finished earlier)", file=sys.stderr, flush=True)
    state = dict(rank=rank, world=world, host=socket.gethostname(), device=args.device, jobs=len(mine),
                 t_launch=t_launch, launch=launch["id"])
    pipe, load_error = None, None
    if mine:
        t = time.perf_counter()
        try:
            pipe = lvd.load_pipeline(args.model_dir, args.device, args.dtype, args.model)
        except (lvd.LVDError, torch.OutOfMemoryError) as e:
            load_error = f"{type(e).__name__}: {e}"
            print(f"batch: rank {rank}: error: {load_error}", file=sys.stderr, flush=True)
        state.update(load_s=time.perf_counter() - t, t_loaded=time.time())
    rank_file = os.path.join(args.out, f"index.rank{rank}.jsonl")
    for n, job in enumerate(mine):
        if load_error is not None:
            rec = dict(job=job.name, index=job.index, prompt=job.prompt, seed=job.seed, rank=rank,
                       status="failed", failure="model load", reason=load_error)
        elif os.path.isfile(os.path.join(args.out, job.name, "run.json")):   # finished since the scan
            rec = skipped_record(args.out, job, rank)
        else:
            rec = run_job(pipe, job, args, guidance, layouts, rank, world)
        rec["launch"] = launch["id"]
        append_jsonl(rank_file, rec)
        records.append(rec)
        took = rec.get("timings_s", {}).get("total_s", 0.0) if rec["status"] != "skipped" else 0.0
        print(f"batch: rank {rank}: [{n + 1}/{len(mine)}] {job.name}: {rec['status']} {took:.1f} s"
              + (f" ({rec['failure']}: {rec['reason'][:200]})" if rec["status"] == "failed" else ""),
              file=sys.stderr, flush=True)
    state["t_end"] = time.time()
    gathered = all_gather((records, state), world)
    if rank == 0:
        order = {j.name: i for i, j in enumerate(jobs)}
        merged = sorted((r for recs, _ in gathered for r in recs), key=lambda r: order[r["job"]])
        write_atomic(os.path.join(args.out, "index.jsonl"), "".join(json.dumps(r, default=str) + "\n" for r in merged))
        counts = {s: sum(r["status"] == s for r in merged) for s in ("done", "skipped", "failed")}
        summary = dict(launch=launch["id"], world=world, jobs=len(jobs), **counts, ranks=[s for _, s in gathered],
                       args={k: v for k, v in vars(args).items()})
        write_atomic(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1, default=str))
        print(f"batch: {len(jobs)} jobs: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} "
              f"failed; wrote {os.path.join(args.out, 'index.jsonl')}" + (" (a new launch retries the failed jobs)"
                                                                            if counts["failed"] else ""))
    return 0


# -----------------------------------------------------------------------------
# CLI

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="batch.py", description=__doc__.split("\n")[0],
                                 formatter_class=lvd.HelpFormatter)
    ap.add_argument("--prompts", required=True, help="a prompts file (one per line) or 'benchmark' (§7.1's 500)")
    ap.add_argument("--out", required=True, help="output folder: one folder per job, index.jsonl, summary.json")
    ap.add_argument("--seeds", help="seed offsets, comma-separated; seed = prompt index + offset "
                    "(default: 0,500 for the benchmark, else 0)")
    ap.add_argument("--limit", type=int, help="only N prompts, spread evenly over the list")
    ap.add_argument("--layout-cache", help="read-only layout cache tried first: the official {prompt: [reply, ...]} "
                    "format or ours (choose the model with --llm-model if it holds several); for the benchmark, "
                    "the released GPT-4 layouts shipped in data/layouts/ unless 'none'")
    ap.add_argument("--dist-timeout", type=float, default=360.0, help="minutes a rank waits for the others")
    ap.add_argument("--model", choices=sorted(lvd.MODELS), default="modelscope")
    ap.add_argument("--model-dir", help="diffusers-layout weights folder (default: models/<model>)")
    for k in ("frames", "height", "width"):
        ap.add_argument("--" + k, type=int, help="default: the model's preset")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cfg", type=float, default=9.0, help="classifier-free guidance scale")
    ap.add_argument("--negative-prompt", default=lvd.NEGATIVE_PROMPT)
    ap.add_argument("--solver", choices=["dpm", "ddim"], default="dpm")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="'cuda' means one GPU per local rank")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                    help="default: float16 on CUDA, else float32")
    ap.add_argument("--vae-slice", type=int, default=1, help="frames decoded at a time")
    g = ap.add_argument_group("guidance (lvd-method.md §4.5-§6)")
    g.add_argument("--guidance", choices=["weak", "benchmark", "off"],
                   help="preset (default: benchmark for the benchmark, else weak); 'off' needs no layouts")
    lvd.add_knob_args(g)
    p = ap.add_argument_group("planner (used for prompts missing from --layout-cache)")
    p.add_argument("--llm-base-url", default=os.environ.get("LVD_LLM_BASE_URL"))
    p.add_argument("--llm-model", default=None)
    p.add_argument("--llm-cache", default=os.path.join("cache", "layouts.json"), help="read-through layout cache")
    args = ap.parse_args(argv)
    bench = args.prompts == "benchmark"
    args.seeds = args.seeds or ("0,500" if bench else "0")
    args.guidance = args.guidance or ("benchmark" if bench else "weak")
    if args.layout_cache is None and bench:
        args.layout_cache = str(RELEASED_GPT4)
    elif args.layout_cache in ("none", ""):
        args.layout_cache = None
    preset = lvd.MODELS[args.model]
    for k in ("frames", "height", "width"):
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    if args.height % 8 or args.width % 8 or min(args.height, args.width, args.frames, args.steps) <= 0:
        ap.error("--height/--width must be positive multiples of 8; --frames and --steps positive")
    if (args.limit is not None and args.limit < 1) or args.dist_timeout <= 0:
        ap.error("--limit and --dist-timeout must be positive")
    bad_device = lvd.check_device(args.device)  # plain 'cuda' (one GPU per local rank) is checked per rank at start
    if bad_device:
        ap.error(bad_device)
    args.model_dir = args.model_dir or lvd.default_dest(args.model)
    args.dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        jobs = make_jobs(args.prompts, parse_seeds(args.seeds), args.limit)
        guidance = lvd.guidance_params(args)
        layouts = Layouts(args) if guidance is not None else None
        os.makedirs(args.out, exist_ok=True)
        rank, world = init_distributed(args)
    except (BatchError, ValueError, OSError) as e:
        print(f"batch: error: {e}", file=sys.stderr)
        return 1
    try:
        return run(args, jobs, guidance, layouts, rank, world)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())

"""batch.py (issue 8): jobs and seeds, released layouts for the benchmark, isolated failures, and two gloo
ranks under torchrun on the tiny checkpoint: killed, restarted, and byte-identical to one rank.

Oracles: lvd-method.md §5/§7.4 (seed = prompt index + seed offset; offsets 0 and 500), §2.7 (the k-th
occurrence of a prompt reads the k-th reply of the released cache, read here with json), the file
system (run.json mtimes, PNG bytes of an independent one-process run).
"""
import filecmp
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import batch
import evaluate
import lvd
import planner

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
EXAMPLES = [e["prompt"] for e in json.loads((ROOT / "data" / "layouts" / "examples.json").read_text())["entries"]]
PROMPTS = EXAMPLES[:5]  # the bird/car example (index 2) has a box clipped to under a pixel
SIZE = ["--frames", "2", "--height", "32", "--width", "32", "--steps", "3", "--device", "cpu"]


def write_prompts(path, prompts):
    path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def finished(out):
    """Finished job folders -> run.json's mtime. A kill can land while lvd.save_run writes its temporary
    ".{name}.XXXXXXXX" folder (run.json already inside, not yet renamed): that one is not finished."""
    return {d: os.stat(os.path.join(out, d, "run.json")).st_mtime_ns for d in os.listdir(out)
            if not d.startswith(".") and os.path.isfile(os.path.join(out, d, "run.json"))}


# -----------------------------------------------------------------------------
# jobs, seeds, layouts

def test_benchmark_jobs_follow_the_official_seeds():
    jobs = batch.make_jobs("benchmark", batch.parse_seeds("0,500"))
    assert len(jobs) == 1000 and len({j.name for j in jobs}) == 1000
    assert [(j.index, j.seed) for j in jobs[:2]] == [(0, 0), (1, 1)]
    assert [(j.index, j.seed) for j in jobs[500:502]] == [(0, 500), (1, 501)]     # run 1: offset 500 (§7.4)
    # numeracy 0-4 is one prompt five times: sample indices 0..4 (§2.7), in both runs; attribution 100 is new
    assert [j.sample_index for j in jobs[:6]] == [0, 1, 2, 3, 4, 0]
    assert [j.sample_index for j in jobs[500:505]] == [0, 1, 2, 3, 4] and jobs[100].sample_index == 0
    assert jobs[0].name == "0000_a-realistic-lively-video-of-a-scene-with-one-moving-car_s0"
    assert len(batch.make_jobs("benchmark", [0], limit=10)) == 10


def test_prompts_file_jobs(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a comment\nA bear walks.\n\n  A cat sleeps  \nA bear walks\n", encoding="utf-8")
    jobs = batch.make_jobs(str(f), [0, 7])
    assert [(j.index, j.prompt, j.seed, j.sample_index) for j in jobs] == [
        (0, "A bear walks", 0, 0), (1, "A cat sleeps", 1, 0), (2, "A bear walks", 2, 1),
        (0, "A bear walks", 7, 0), (1, "A cat sleeps", 8, 0), (2, "A bear walks", 9, 1)]
    for bad in ("0,0", "x", "-1", ""):
        with pytest.raises(batch.BatchError, match="--seeds"):
            batch.parse_seeds(bad)
    with pytest.raises(batch.BatchError, match="--prompts .*nope"):
        batch.make_jobs(str(tmp_path / "nope"), [0])


def test_scan_finds_finished_jobs_and_removes_temp_folders(tmp_path):
    a, b, c = batch.make_jobs("benchmark", [0], limit=3)
    (tmp_path / a.name).mkdir()
    (tmp_path / a.name / "run.json").write_text("{}")
    (tmp_path / b.name).mkdir()                                   # no run.json: not finished
    (tmp_path / f".{c.name}.k2j4_x9q").mkdir()                    # what a killed lvd.save_run leaves
    (tmp_path / ".other.abc").mkdir()                             # not ours: kept
    assert batch.scan(str(tmp_path), [a, b, c]) == {a.name}
    assert sorted(os.listdir(tmp_path)) == sorted([".other.abc", a.name, b.name])


def test_the_shipped_gpt4_layouts_are_the_released_ones():
    path = SHARED / "data" / "lvd-llm-cache" / "benchmark_gpt-4-1106-preview.json"
    if not path.exists():
        pytest.skip(f"../shared not present (user clone): {path} is needed for this test")
    assert batch.RELEASED_GPT4.read_bytes() == path.read_bytes()
    released = json.loads(batch.RELEASED_GPT4.read_text(encoding="utf-8"))
    assert len(released) == 184 and sum(map(len, released.values())) == 500


@pytest.mark.filterwarnings("ignore::planner.LayoutWarning")
def test_benchmark_layouts_from_the_official_cache(tmp_path):
    path = batch.RELEASED_GPT4  # the default layout cache of --prompts benchmark
    released = json.loads(path.read_text(encoding="utf-8"))
    args = batch.parse_args(["--prompts", "benchmark", "--out", str(tmp_path), "--llm-cache", str(tmp_path / "c.json")])
    assert args.layout_cache == str(path)
    assert batch.parse_args(["--prompts", "benchmark", "--out", "x", "--layout-cache", "none"]).layout_cache is None
    assert args.guidance == "benchmark" and args.seeds == "0,500"
    layouts = batch.Layouts(args)
    jobs = batch.make_jobs("benchmark", [500])
    for k in (0, 3, 4, 120, 250, 499):               # instance k: its prompt's (occurrence)-th released reply
        job = jobs[k]
        occurrence = [i.prompt for i in evaluate.benchmark_instances()][:k].count(job.prompt)
        want = planner.parse_layout(released[job.prompt][occurrence], job.prompt)
        assert layouts.get(job) == want, k
    assert layouts.get(jobs[1]) != layouts.get(jobs[0])    # the same prompt, a different sample


# -----------------------------------------------------------------------------
# failures stay in their job (one process, in this one)

def test_failures_are_recorded_and_the_rank_moves_on(tiny_model_dir, tmp_path, monkeypatch, capsys):
    for var in ("OPENAI_API_KEY", "LVD_LLM_BASE_URL", "LVD_LLM_MODEL", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    bear, car = PROMPTS[0], PROMPTS[4]
    prompts = write_prompts(tmp_path / "p.txt", ["a purple giraffe juggling", car, bear])
    real = lvd.generate

    def generate(pipe, prompt, *a, **k):
        if prompt == car:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(pipe, prompt, *a, **k)

    monkeypatch.setattr(lvd, "generate", generate)
    out = tmp_path / "out"
    argv = ["--prompts", prompts, "--out", str(out), "--model-dir", tiny_model_dir,
            "--llm-cache", str(tmp_path / "cache.json"), *SIZE]
    assert batch.main(argv) == 0
    index = read_jsonl(out / "index.jsonl")
    assert [(r["index"], r["status"], r.get("failure")) for r in index] == [
        (0, "failed", "bad layout"), (1, "failed", "out of memory"), (2, "done", None)]
    assert "LLMNotConfigured" in index[0]["reason"] and "out of memory" in index[1]["reason"]
    assert read_jsonl(out / "index.rank0.jsonl") == [{k: v for k, v in r.items()} for r in index]
    assert sorted(finished(out)) == [index[2]["job"]]
    assert "1 done, 0 skipped, 2 failed" in capsys.readouterr().out
    # a new launch retries the failures and skips the finished job
    assert batch.main(argv) == 0
    assert [r["status"] for r in read_jsonl(out / "index.jsonl")] == ["failed", "failed", "skipped"]


def test_lvd_py_with_prompts_is_the_batch_mode(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["--prompts", write_prompts(tmp_path / "p.txt", PROMPTS[:1]), "--out", str(out), "--guidance", "off",
            "--model-dir", tiny_model_dir, *SIZE]
    assert lvd.main(argv) == 0
    (rec,) = read_jsonl(out / "index.jsonl")
    assert rec["status"] == "done" and rec["job"] == batch.make_jobs(str(tmp_path / "p.txt"), [0])[0].name


def test_bad_input_is_one_line(tmp_path, capsys):
    assert batch.main(["--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("batch: error: --prompts") and "Traceback" not in err
    with pytest.raises(SystemExit):
        batch.parse_args(["--prompts", "benchmark", "--out", str(tmp_path), "--height", "30"])


# -----------------------------------------------------------------------------
# two gloo ranks under torchrun: killed, restarted, and the same bytes as one rank

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid):
    """The pids of pid's children, grandchildren, … (Linux /proc; torchrun starts its ranks in new sessions)."""
    parents = {}
    for d in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except (OSError, ValueError):
            continue
        if d.isdigit():
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))   # field 4: ppid
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def batch_cmd(ranks, prompts, out, model_dir, llm_cache):
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port())] if ranks else [sys.executable])
    return launch + [str(ROOT / "batch.py"), "--prompts", prompts, "--out", str(out), "--seeds", "0,100",
                     "--model-dir", model_dir, "--llm-cache", llm_cache, *SIZE]


def env():
    e = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "LVD_LLM_BASE_URL", "RANK", "WORLD_SIZE")}
    return {**e, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def test_two_ranks_resume_after_kill_and_match_one_rank(tiny_model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.txt", PROMPTS)
    names = {j.name for j in batch.make_jobs(prompts, [0, 100])}
    assert len(names) == 10
    two, one, cache = tmp_path / "two", tmp_path / "one", str(tmp_path / "cache.json")

    # launch 1: SIGKILL torchrun and both ranks as soon as the first job folder is complete
    proc = subprocess.Popen(batch_cmd(2, prompts, two, tiny_model_dir, cache), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (two.is_dir() and finished(two)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:     # the agent and the ranks (own sessions) at once
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log = proc.communicate()[0].decode(errors="replace")
    before = finished(two)
    assert 1 <= len(before) < len(names), f"kill did not land mid-run ({len(before)} finished):\n{log[-3000:]}"
    assert not (two / "index.jsonl").exists()            # rank 0 never got to the end

    # launch 2: the same command completes the run without redoing the finished jobs
    r = subprocess.run(batch_cmd(2, prompts, two, tiny_model_dir, cache), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    index = read_jsonl(two / "index.jsonl")
    assert sorted(rec["job"] for rec in index) == sorted(names)          # each job once
    assert {rec["job"]: rec["status"] for rec in index} == {n: "skipped" if n in before else "done" for n in names}
    assert {rec["rank"] for rec in index if rec["status"] == "done"} == {0, 1}
    after = finished(two)
    assert set(after) == names and all(after[n] == before[n] for n in before)   # run.json untouched
    done = [rec["job"] for f in ("index.rank0.jsonl", "index.rank1.jsonl") for rec in read_jsonl(two / f)
            if rec["status"] == "done"]                   # both launches, as the ranks went
    assert sorted(done) == sorted(names)                  # every job done exactly once, over the two launches
    assert not [d for d in os.listdir(two) if d.startswith(".")]         # the killed run's temp folder is gone

    # one process, no torch.distributed: byte-identical frames
    r = subprocess.run(batch_cmd(0, prompts, one, tiny_model_dir, cache), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(rec["status"] == "done" and rec["rank"] == 0 for rec in read_jsonl(one / "index.jsonl"))
    for n in names:
        pngs = sorted(os.listdir(one / n / "frames"))
        assert pngs == ["0000.png", "0001.png"] and sorted(os.listdir(two / n / "frames")) == pngs
        for f in pngs:
            assert filecmp.cmp(one / n / "frames" / f, two / n / "frames" / f, shallow=False), (n, f)
        assert filecmp.cmp(one / n / "video.gif", two / n / "video.gif", shallow=False), n
    seeds = {rec["job"]: rec["seed"] for rec in read_jsonl(one / "index.jsonl")}
    assert sorted(seeds.values()) == [0, 1, 2, 3, 4, 100, 101, 102, 103, 104]

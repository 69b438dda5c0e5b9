"""bench.py --smoke: every measurement of the GPU benchmark runs (tiny model, CPU) and lands in the table, so a
session with a GPU does not spend its minutes finding a broken code path. The numbers of a smoke run mean nothing."""
import importlib.util
import os
import py_compile
from pathlib import Path

import bench


def bench_cli_script(name="bench_cli"):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(bench.__file__).parent / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_smoke_run_fills_every_row(tmp_path, one_thread):
    out = tmp_path / "bench.md"
    bench.main(["--smoke", "--out", str(out)])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()
            if line.startswith("| 2x32x32")]
    got = {(r[1], r[2]): r for r in rows}
    want = [("CFG UNet step (batch 2)", "lvd reference"), ("CFG UNet step (batch 2)", "lvd fast (CUDA graph)"),
            ("CFG UNet step (batch 2)", "lvd fast (CUDA graph + fused kernels)"),
            ("guidance pass (fwd+bwd, batch 1)", "official approach (full forward, graph kept)"),
            ("guidance pass (fwd+bwd, batch 1)", "lvd reference (truncated, 6 explicit maps)"),
            ("guidance pass (fwd+bwd, batch 1)", "lvd memory mode only --checkpointing cheap"),
            ("guidance pass (fwd+bwd, batch 1)", "lvd memory mode only --checkpointing full"),
            ("guidance pass (fwd+bwd, batch 1)", "lvd fast (CUDA graph) --checkpointing off"),
            ("guidance pass (fwd+bwd, batch 1)", "lvd fast (CUDA graph) --checkpointing cheap"),
            ("guidance pass (fwd+bwd, batch 1)", "lvd fast (CUDA graph) --checkpointing full"),
            ("guidance pass (fwd+bwd, batch 1)", "lvd fast (CUDA graph + fused kernels) --checkpointing off"),
            ("guidance pass (fwd+bwd, batch 1)", "lvd fast (CUDA graph + fused kernels) --checkpointing cheap"),
            ("guidance pass (fwd+bwd, batch 1)", "lvd fast (CUDA graph + fused kernels) --checkpointing full"),
            ("guided video (2 steps, 10 passes, decode)", "lvd reference"),
            ("guided video (2 steps, 10 passes, decode)", "lvd fast --checkpointing off"),
            ("guided video (2 steps, 10 passes, decode)", "lvd fast --checkpointing cheap (the default)"),
            ("guided video (2 steps, 10 passes, decode)", "lvd fast --checkpointing full"),
            ("unguided video (2 steps, decode)", "lvd reference"), ("unguided video (2 steps, decode)", "lvd fast"),
            ("CFG UNet step (batch 2)", "diffusers UNet3DConditionModel"),
            ("guidance pass (fwd+bwd, batch 1)", "official approach on diffusers UNet3DConditionModel"),
            ("unguided video (2 steps, decode)", "diffusers TextToVideoSDPipeline")]
    assert sorted(got) == sorted(want)
    for key, r in got.items():
        value = r[3] if r[3] else r[6]  # ms, or seconds for whole videos
        assert float(value) > 0, key
    assert "10 guidance passes" in got[("guided video (2 steps, 10 passes, decode)", "lvd fast --checkpointing off")][7]


def test_bench_cli_smoke(tmp_path):
    """scripts/bench_cli.py --smoke runs the CLI as a user does (tiny model, CPU) and fills every row of its table."""
    script = bench_cli_script()
    out = tmp_path / "cli.md"
    assert script.main(["--smoke", "--out", str(out)]) == 0
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()
            if line.startswith("| modelscope")]
    assert [r[1] for r in rows] == ["guided, defaults, kernel cache empty", "guided, defaults, kernel cache filled",
                                    "guided, --no-fast", "--guidance off"]
    for r in rows:  # plan, load, denoise, its first step, decode, save, the rest
        wall, (plan, load, denoise, first, decode, save) = float(r[2]), [float(v) for v in r[3:9]]
        assert wall > 0 and load > 0 and denoise > 0 and plan + load + denoise + decode + save <= wall, r
        assert 0 < first <= denoise + 0.05, r  # denoise (run.json's, unrounded) less steps 2.. as the bar times them
    assert "`python lvd.py --help`:" in out.read_text()


def test_bench_notebook_smoke(tmp_path, one_thread):
    """scripts/bench_notebook.py --smoke loads once and times each generate call (tiny model, CPU: no GPU column)."""
    script = bench_cli_script("bench_notebook")
    out = tmp_path / "nb.md"
    assert script.main(["--smoke", "--calls", "3", "--out", str(out)]) == 0
    text = out.read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    assert rows[0][:2] == ["call", "wall s"] and [r[0] for r in rows[2:]] == ["1 (first: set-up)", "2", "3 (profiled)"]
    assert all(float(r[1]) > 0 for r in rows[2:])
    assert "`load_pipeline` once (" in text and "64×64×2 video (2 steps) 3 times" in text


def test_bench_cli_reads_torch_bytecode_only_where_python_would_use_it(tmp_path):
    """bench_cli gives the runs a bytecode cache unless torch's own .pyc would be read: a missing, stale (the source
    changed since) or foreign (another interpreter's magic number) .pyc counts as none."""
    script = bench_cli_script()
    src = tmp_path / "mod.py"
    src.write_text("x = 1\n")
    assert not script.usable_bytecode(str(src))  # none yet
    pyc = py_compile.compile(str(src), cfile=importlib.util.cache_from_source(str(src)))
    assert script.usable_bytecode(str(src))
    st = os.stat(src)
    os.utime(src, (st.st_atime, st.st_mtime + 10))  # the source changed after it was compiled
    assert not script.usable_bytecode(str(src))
    py_compile.compile(str(src), cfile=pyc)
    data = bytearray(Path(pyc).read_bytes())
    data[0] ^= 0xFF  # another interpreter's magic number
    Path(pyc).write_bytes(bytes(data))
    assert not script.usable_bytecode(str(src))

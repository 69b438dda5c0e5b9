"""bench.py --smoke: every measurement of the GPU benchmark runs (tiny model, CPU) and lands in the table, so a
session with a GPU does not spend its minutes finding a broken code path. The numbers of a smoke run mean nothing."""
import bench


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

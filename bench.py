"""Speed and memory of lvd on one GPU, against diffusers, at the real 1.7B config with random weights.

Usage (on a CUDA machine with diffusers importable):
    python bench.py --out results/bench.md [--sizes 16x256x256,24x320x576] [--runs 10] [--no-diffusers]
    python bench.py --smoke --out /tmp/bench.md     (every code path on the tiny model on the CPU; tests/test_bench.py)

Measures, per size (frames × height × width), in fp16:
  (a) the CFG UNet step (batch 2): the lvd reference (unet3d.py as it is), lvd fast (the fast layer, fast/: a CUDA
      graph and channels-last; then also the fused kernels, which is what --fast does; `--compile`: torch.compile of
      the reference), diffusers' UNet3DConditionModel;
  (b) one guidance pass (cond-only forward + backward to the latents): the lvd reference (truncated after the last
      guided layer, explicit probabilities only in the six guided layers), the fast layer's memory modes alone
      (--checkpointing cheap and full, eager), fast without and with the fused kernels in each mode (with the error
      against the reference), and the official
      approach (full forward, graph kept), both on lvd's UNet and on diffusers' UNet3DConditionModel with the
      official explicit-probability processor in the six layers (scripts/official_guidance.py; the official code
      runs a copy of diffusers' model, so the latter is the official implementation's cost);
  (c) a whole guided video: 40 steps, 10 × 5 guidance passes (threshold forced below zero), VAE decode;
  (d) an unguided video: lvd against diffusers' TextToVideoSDPipeline with DPMSolverMultistepScheduler;
  (e) peak GPU memory of each.
Timings use CUDA events, warm-up runs and the median of `--runs` runs; FLOPs come from torch's FlopCounterMode.
The table is printed and written to `--out` with the GPU name and the date.
"""
import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import tempfile
import time
import types

import torch

import attention
import fast
import lvd
import planner
from outputs import code_commit, write_report
from text_encoder import CLIPTokenizer
from weights.make_tiny import make_tiny

DEMO_PROMPT = "A bear walks from the left to the right"
FAST = {False: "lvd fast (CUDA graph)", True: "lvd fast (CUDA graph + fused kernels)"}


def cuda_ms(fn, runs, warmup=2):
    """Median ms of fn() over `runs` runs (CUDA events), and (peak GiB allocated, of which above the resident models).
    Without CUDA (the --smoke run): wall-clock ms and no memory figures."""
    if torch.cuda.is_available():  # base and peak include the warm-up (a graph's memory is taken there)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
        return statistics.median(times), (None, None)
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    peak = torch.cuda.max_memory_allocated()
    return statistics.median(times), (peak / 2 ** 30, (peak - base) / 2 ** 30)


def wall_s(fn, warmup=True):
    """Seconds of one call of fn() (after one warm-up call), and (peak GiB, of which above the resident models)."""
    if warmup:
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    if not cuda:
        return time.perf_counter() - t, (None, None), out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return time.perf_counter() - t, (peak / 2 ** 30, (peak - base) / 2 ** 30), out


def rel_err(a, b):
    """Relative L2 error of a against b."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def flops(fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def throughput(fl, ms, peak):
    """'163 TFLOP/s, 21% of bf16 peak' (no percentage without a measured peak)."""
    return f"{fl / ms / 1e9:.0f} TFLOP/s" + (f", {100 * fl / ms / 1e9 / peak:.0f}% of bf16 peak" if peak else "")


def matmul_peak_tflops():
    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms, _ = cuda_ms(lambda: a @ b, 10, warmup=3)
    return 2 * 8192 ** 3 / ms / 1e9


def lvd_rows(pipe, layout, f, h, w, args, peak, row):
    """(a)-(d) for lvd at one size, with only lvd's models resident."""
    size = f"{f}x{h}x{w}"
    x = torch.randn(1, 4, f, h // 8, w // 8, device=pipe.device, dtype=pipe.dtype)
    text = lvd.encode_text(pipe, [lvd.NEGATIVE_PROMPT, DEMO_PROMPT])
    t = torch.tensor(999, device=pipe.device)
    fast.remove(pipe.unet)  # the reference rows: the modules as unet3d.py writes them
    setup = "cuDNN's set-up" + (" and algorithm timing" if torch.backends.cudnn.benchmark else "")
    with torch.no_grad():  # (a) the CFG UNet step, as generate runs it: one latent, [negative, positive]
        first_s = wall_s(lambda: pipe.unet(x, t, text), warmup=False)[0]  # this size's first call: its set-up
        fl2 = flops(lambda: pipe.unet(x, t, text))  # the reference repeats the latent, as diffusers
        base_ms, gib = cuda_ms(lambda: pipe.unet(x, t, text), args.runs)
        row(size, "CFG UNet step (batch 2)", "lvd reference", base_ms, gib,
            extra=f"{throughput(fl2, base_ms, peak)}; first call {first_s:.2f} s ({setup})")
        y_ref = pipe.unet(x, t, text)
        for fused in (False, True):  # the fast layer: CUDA graphs, channels-last, then also the fused kernels
            fast.apply(pipe.unet, kernels="auto" if fused else None)
            fl = flops(lambda: pipe.unet(x, t, text))  # the text-free prefix once
            graphed = fast.Graphed(lambda x, t, text: pipe.unet(x, t, text))
            ms, gib = cuda_ms(lambda: graphed(x, t, text), args.runs)
            err = rel_err(graphed(x, t, text), y_ref)
            row(size, "CFG UNet step (batch 2)", FAST[fused], ms, gib,
                extra=f"{throughput(fl, ms, peak)}, {base_ms / ms:.2f}x the reference; {fl / 1e12:.2f} TFLOP run "
                      f"(the text-free prefix once; {fl2 / 1e12:.2f} on the repeated latent); rel. error to the "
                      f"reference {err:.1e}")
            del graphed
        fast.remove(pipe.unet)
        if args.compile:
            compiled = torch.compile(pipe.unet, dynamic=False)
            ms, gib = cuda_ms(lambda: compiled(x, t, text), args.runs, warmup=3)
            row(size, "CFG UNet step (batch 2)", "lvd reference, torch.compile", ms, gib,
                extra=f"{throughput(fl2, ms, peak)}, {base_ms / ms:.2f}x the reference")
    # (b) one guidance pass
    params = attention.preset("benchmark")
    guide, final_prompt = attention.guidance_for_layout(pipe, DEMO_PROMPT, layout, f, h, w, params)
    guide.cond = lvd.encode_text(pipe, [final_prompt])
    masks = {p: m.to(pipe.device) for p, m in guide.masks.items()}

    def official():  # full forward, graph kept, then the same energy and gradient
        store = attention.AttentionStore(attention.GUIDED_LAYERS, truncate=False)
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            pipe.unet(z, t, guide.cond, store=store)
            loss = attention.energy(store.maps, masks, guide.token_positions, params)
            return torch.autograd.grad(params.loss_scale * loss, z)[0]
    first_s = wall_s(official, warmup=False)[0]  # the first backward at this size: its set-up
    ms_off, gib = cuda_ms(official, args.runs)
    row(size, "guidance pass (fwd+bwd, batch 1)", "official approach (full forward, graph kept)", ms_off, gib,
        extra=f"first call {first_s:.2f} s ({setup})")
    g_ref = guide.loss_and_grad(x, t)[1]

    def pass_row(label, note=""):
        ms, gib = cuda_ms(lambda: guide.loss_and_grad(x, t), args.runs)
        note = (f"{ms_off / ms:.2f}x faster than the official approach" if ms < ms_off else
                f"{ms_off / ms:.2f}x the official speed ({ms / ms_off:.2f}x its time)") + note
        row(size, "guidance pass (fwd+bwd, batch 1)", label, ms, gib, extra=note)
    pass_row("lvd reference (truncated, 6 explicit maps)")
    for mode in ("cheap", "full"):  # the memory modes alone: no graph, no kernels, NCHW
        fast.apply(pipe.unet, memory=mode, kernels=None, channels_last=False)
        pass_row(f"lvd memory mode only --checkpointing {mode}")
    for fused in (False, True):
        graphed = fast.graph_guidance(guide)
        for mode in ("off", "cheap", "full"):
            fast.apply(pipe.unet, memory=mode, kernels="auto" if fused else None)
            graphed.reset()  # a new graph for what the pass now runs
            err = rel_err(guide.loss_and_grad(x, t)[1], g_ref)
            pass_row(FAST[fused] + f" --checkpointing {mode}", f"; gradient rel. error to the reference {err:.1e}")
        graphed.reset()
        guide.run_pass = guide._pass
    fast.remove(pipe.unet)
    del guide
    if args.no_video:
        return
    n = args.steps
    videos = [("lvd reference", None, False), ("lvd fast --checkpointing off", "off", True),
              ("lvd fast --checkpointing cheap (the default)", "cheap", True),
              ("lvd fast --checkpointing full", "full", True)]
    forced = dataclasses.replace(params, loss_threshold=-1.0)
    for label, mode, on in videos:  # (c) 10 x 5 passes forced; no warm-up: each video captures its own graphs
        info = {}
        s, gib, _ = wall_s(lambda: lvd.generate(pipe, DEMO_PROMPT, layout, f, h, w, n, guidance=forced, info=info,
                                                fast=on, memory=mode), warmup=False)
        row(size, f"guided video ({n} steps, {5 * min(n, 10)} passes, decode)", label, s=s, gib=gib,
            extra=f"{len(info['guidance_history'])} guidance passes; decode {info['decode_s']:.2f} s")
    for label, on in (("lvd reference", False), ("lvd fast", True)):
        info = {}  # (d) an unguided video
        s, gib, _ = wall_s(lambda: lvd.generate(pipe, DEMO_PROMPT, None, f, h, w, n, info=info, fast=on),
                           warmup=False)
        row(size, f"unguided video ({n} steps, decode)", label, s=s, gib=gib,
            extra=f"{info['denoise_s'] / n * 1e3:.1f} ms/step; decode {info['decode_s']:.2f} s")
    fast.remove(pipe.unet)


def diffusers_rows(model_dir, sizes, layout, args, peak, row):
    """(a), (b) and (d) for diffusers, loaded after lvd's measurements (so memory figures stay separate)."""
    from diffusers import DPMSolverMultistepScheduler, TextToVideoSDPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
    import official_guidance
    # guidance_for_layout needs only a tokenizer here: the same masks and token positions as lvd's rows
    lvd_tokens = types.SimpleNamespace(tokenizer=CLIPTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer")),
                                       unet=None, schedule=None)
    half = args.dtype == torch.float16
    ref = TextToVideoSDPipeline.from_pretrained(model_dir, variant="fp16" if half else None,
                                                torch_dtype=args.dtype).to(args.device)
    ref.scheduler = DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ref.vae.enable_slicing()  # frame-by-frame decoding, as the official LVD code and lvd do
    for f, h, w in sizes:
        size = f"{f}x{h}x{w}"
        x = torch.randn(2, 4, f, h // 8, w // 8, device=args.device, dtype=args.dtype)
        text = torch.cat(ref.encode_prompt(DEMO_PROMPT, args.device, 1, True, lvd.NEGATIVE_PROMPT)[::-1])
        t = torch.tensor(999, device=args.device)
        with torch.no_grad():
            fl = flops(lambda: ref.unet(x, t, encoder_hidden_states=text).sample)
            ms, gib = cuda_ms(lambda: ref.unet(x, t, encoder_hidden_states=text).sample, args.runs)
        row(size, "CFG UNet step (batch 2)", "diffusers UNet3DConditionModel", ms, gib,
            extra=throughput(fl, ms, peak))
        # (b) the official guidance pass on diffusers' UNet (explicit maps in the six layers, full forward, graph kept)
        params = attention.preset("benchmark")
        guide, final = attention.guidance_for_layout(lvd_tokens, DEMO_PROMPT, layout, f, h, w, params)
        masks = {p: m.to(args.device) for p, m in guide.masks.items()}
        cond = ref.encode_prompt(final, args.device, 1, False)[0]
        maps = official_guidance.install(ref.unet)
        ms, gib = cuda_ms(lambda: official_guidance.official_pass(ref.unet, maps, x[:1], t, cond, masks,
                                                                  guide.token_positions, params), args.runs)
        row(size, "guidance pass (fwd+bwd, batch 1)", "official approach on diffusers UNet3DConditionModel", ms, gib)
        ref.unet.set_attn_processor(AttnProcessor2_0())
        del maps
        if args.no_video:
            continue
        call = lambda out: ref(DEMO_PROMPT, negative_prompt=lvd.NEGATIVE_PROMPT, num_frames=f, height=h, width=w,
                               num_inference_steps=args.steps, output_type=out)
        s_lat, _, _ = wall_s(lambda: call("latent"))
        s, gib, _ = wall_s(lambda: call("np"))
        row(size, f"unguided video ({args.steps} steps, decode)", "diffusers TextToVideoSDPipeline", s=s, gib=gib,
            extra=f"{s_lat / args.steps * 1e3:.1f} ms/step; " + (
                f"decode {s - s_lat:.2f} s (the difference of two runs)" if s > s_lat else
                f"decode not resolved: the run without it took {s_lat - s:.2f} s longer (run-to-run noise)"))
    del ref
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model-dir", help="a full-size model folder; made with random weights when missing")
    ap.add_argument("--sizes", default="16x256x256,24x320x576", help="frames x height x width, comma-separated")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40, help="denoising steps of the whole-video measurements")
    ap.add_argument("--out", default="results/bench.md")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--no-lvd", action="store_true", help="only diffusers' rows (to join with a run of lvd's rows)")
    ap.add_argument("--no-video", action="store_true", help="skip the whole-video measurements (c), (d)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile of the UNet (slow to compile)")
    ap.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.backends.cudnn.benchmark for the whole run, lvd and diffusers alike (the steady "
                         "state of a batch, batch.py's default; fast.cudnn_benchmark)")
    ap.add_argument("--smoke", action="store_true", help="check this script: the tiny model on the CPU, fp32, "
                    "one run, 2x32x32 (its numbers mean nothing)")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    args.device, args.dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.float16)
    if args.smoke:
        args.sizes, args.runs, args.steps = "2x32x32", 1, 2
        model_dir = args.model_dir or make_tiny(tempfile.mkdtemp(prefix="lvd-bench-smoke-"), seed=0, fp16_variants=True)
    else:
        model_dir = args.model_dir or os.path.join(tempfile.gettempdir(), "lvd-full-random")
    if not os.path.isdir(model_dir):
        t = time.perf_counter()
        make_tiny(model_dir, seed=0, fp16_variants=True, full=True, device="cuda")
        print(f"made random full-size model folder in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    peak = matmul_peak_tflops()
    rows = []
    commit = code_commit()

    def row(size, what, impl, ms=None, gib=(None, None), s=None, extra=""):
        rows.append((size, what, impl, ms, gib[0], gib[1], s, extra))
        print(f"{size} | {what} | {impl} | {ms} ms | {gib} GiB | {s} s | {extra}", file=sys.stderr, flush=True)

    layout = planner.plan(DEMO_PROMPT)  # the shipped example layout (no LLM needed)
    if not args.no_lvd:
        pipe = lvd.load_pipeline(model_dir, args.device, args.dtype)
        for f, h, w in sizes:
            if torch.cuda.is_available():  # what the peaks below stand on: the models, and nothing left over
                print(f"{f}x{h}x{w}: {torch.cuda.memory_allocated() / 2**30:.3f} GiB allocated before its rows",
                      file=sys.stderr, flush=True)
            lvd_rows(pipe, layout, f, h, w, args, peak, row)
        del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not args.no_diffusers:
        diffusers_rows(model_dir, sizes, layout, args, peak, row)

    fmt = lambda v, p: "" if v is None else f"{v:.{p}f}"
    where = "CPU smoke run of the tiny model (numbers mean nothing)" if args.smoke else torch.cuda.get_device_name()
    lines = [f"# lvd benchmark: {where}, {datetime.date.today()}, commit {commit}",
             "", f"torch {torch.__version__}; {str(args.dtype)[6:]}; {'tiny' if args.smoke else 'real 1.7B'} config, "
             f"random weights; median of "
             f"{args.runs} runs (CUDA events); cudnn.benchmark {args.cudnn_benchmark}; measured bf16 matmul peak "
             f"{peak or 0:.0f} TFLOP/s. Peak GiB is all memory "
             "allocated by PyTorch (models included); 'above models' excludes the resident weights.", "",
             "| size (f×h×w) | what | implementation | ms | peak GiB | above models GiB | s | notes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows.sort(key=lambda r: [s[0] for s in sizes].index(int(r[0].split("x")[0])))
    lines += [f"| {a} | {b} | {c} | {fmt(d, 1)} | {fmt(e, 2)} | {fmt(e2, 2)} | {fmt(g, 2)} | {x} |"
              for a, b, c, d, e, e2, g, x in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(args.out, text)


if __name__ == "__main__":
    main()

"""LVD: plan a dynamic scene layout with an LLM, then sample a video guided by it. The CLI and the pipeline.

What to read: `lvd-method.md` §1 (the two stages), §3.1 (the prompt the text encoder sees), §4.1 (where
guidance sits in the loop), §5 (sampling defaults); `modelscope-architecture.md` §10 (pipeline flow).

Official implementation: generation/lvd.py and models/controllable_pipeline_text_to_video_synth.py in
TonyLianLong/LLM-groundedVideoDiffusion @22d90d2; `TextToVideoSDPipeline.__call__` in diffusers.

Differences:
- Initial noise is drawn on the CPU in float32 from `torch.Generator().manual_seed(seed)`, then moved
  to the device and dtype. The same seed therefore gives the same starting latents on every device and
  dtype; the videos then differ only by the device's arithmetic (bit-identical only on the same device,
  dtype and torch build). The official code draws fp16 noise on CUDA, which no CPU can reproduce.
- The sampler is a function (`sampler.py`); LVD's guidance is its `before_step` hook (`attention.py`).
- Outputs are written to a temporary folder that is renamed into place at the end, so a crash leaves
  no half-written run. The negative prompt and the frame count have working defaults per model.

Usage: python lvd.py --prompt "A bear walks from the left to the right"   (see --help)
"""
import argparse
import dataclasses
import os
import sys
import time

import torch

import planner
import sampler
from cli_options import (GUIDANCE_KNOBS, HelpFormatter, Progress, add_knob_args,  # noqa: F401 (batch.py)
                         check_device, check_writable, cudnn_attention, cudnn_benchmark, guidance_params)
from outputs import draw_boxes, run_name, save_gif, save_run, versions  # noqa: F401 (lvd.save_run etc.)
from text_encoder import CLIPTextEncoder, CLIPTokenizer
from unet3d import UNet3D
from vae import VAEDecoder
from weights.checkpoint import CheckpointError
from weights.download import DownloadError, default_dest, download_command

NEGATIVE_PROMPT = "dull, gray, unrealistic, colorless, blurry, low-quality, weird, abrupt"  # §5, every method
MODELS = {  # per-model presets (§5): output size, frames, steps, CFG scale, negative prompt
    "modelscope": dict(height=256, width=256, frames=16, steps=40, cfg_scale=9.0, negative_prompt=NEGATIVE_PROMPT),
    "zeroscope": dict(height=320, width=576, frames=24, steps=40, cfg_scale=9.0, negative_prompt=NEGATIVE_PROMPT),
    # the toy model (scripts/train_toy.py): its native size, half the steps, trained with "" as the empty prompt
    "toy": dict(height=128, width=128, frames=8, steps=20, cfg_scale=5.0, negative_prompt=""),
}


TOY_LAYOUTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "layouts", "toy.json")


class LVDError(Exception):
    """A problem the user can fix (missing weights, out of memory, bad layout); the CLI prints it."""


# -----------------------------------------------------------------------------
# loading

@dataclasses.dataclass
class Pipeline:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextEncoder
    unet: UNet3D
    vae: VAEDecoder
    schedule: "sampler.NoiseSchedule"
    device: torch.device
    dtype: torch.dtype


def load_pipeline(model_dir, device="cpu", dtype=torch.float32, model="modelscope"):
    """Load tokenizer, text encoder, UNet, VAE decoder and noise schedule from a diffusers-layout folder."""
    variant = "fp16" if dtype == torch.float16 else "fp32"
    if not os.path.isdir(model_dir):
        raise LVDError(f"toy model folder {model_dir!r} not found; it ships with the repository (models/toy), "
                       f"or train it with: python scripts/train_toy.py {model_dir}" if model == "toy" else
                       f"model folder {model_dir!r} not found. Download the weights with:\n  "
                       f"{download_command(model, variant, model_dir)}\n(or run lvd.py with --download)")
    device = torch.device(device)
    sub = lambda name: os.path.join(model_dir, name)
    try:
        return Pipeline(
            tokenizer=CLIPTokenizer.from_pretrained(sub("tokenizer")),
            text_encoder=CLIPTextEncoder.from_pretrained(sub("text_encoder"), device, dtype),
            unet=UNet3D.from_pretrained(sub("unet"), device, dtype),
            vae=VAEDecoder.from_pretrained(sub("vae"), device, dtype),
            schedule=sampler.NoiseSchedule.from_config(sub(os.path.join("scheduler", "scheduler_config.json"))),
            device=device, dtype=dtype)
    except (CheckpointError, FileNotFoundError, OSError) as e:
        raise LVDError(f"{e}\nTo (re-)download the weights: {download_command(model, variant, model_dir)}") from None


# -----------------------------------------------------------------------------
# generation

@torch.no_grad()
def encode_text(pipe, prompts):
    """list[str] -> (b, 77, d) last hidden states, in the pipeline's dtype."""
    ids = pipe.tokenizer(prompts).to(pipe.device)
    return pipe.text_encoder(ids).to(pipe.dtype)


def initial_noise(seed, frames, height, width, device, dtype):
    """Seeded N(0, 1) latents (1, 4, f, h/8, w/8), drawn on the CPU in float32 (same on every device)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((1, 4, frames, height // 8, width // 8), generator=gen).to(device, dtype)


def generate(pipe, prompt, layout=None, frames=16, height=256, width=256, steps=40, cfg_scale=9.0,
             negative_prompt=NEGATIVE_PROMPT, seed=0, solver="dpm", guidance=None, latents=None,
             vae_slice=1, on_step=None, info=None, fast=None, memory=None, on_stage=None):
    """Sample one video. Returns uint8 frames (f, H, W, 3).

    layout:   a planner.Layout; with `guidance` (attention.GuidanceParams) LVD's energy guidance runs.
    latents:  optional initial noise (1, 4, f, H/8, W/8); else drawn from `seed` (see initial_noise).
    on_step:  callable(info dict {'i', 't', 'x', 'x0_pred'}) after each solver step (progress, notebooks).
    on_stage: callable(str) as each stage starts (the CLI's progress lines).
    info:     optional dict filled with what was run (final prompt, added suffixes, guidance history).
    fast:     the fast layer (fast/): the CFG step and the guidance pass replayed from CUDA graphs, fused Triton
              kernels where Triton runs, channels-last activations (UNet and VAE); same results up to rounding.
              None: on for CUDA. False: the reference modules as they are. The graphs are kept on the UNet for the
              next call (one of the same shape replays at once); `fast.release_graphs(pipe.unet)` frees them.
    memory:   what the guidance pass keeps for its backward: 'off', 'cheap' or 'full' (fast/memory.py); same
              gradient. None: 'cheap' with `fast`, else 'off' (the reference).
    """
    if height % 8 or width % 8:
        raise LVDError(f"height and width must be multiples of 8, got {height}x{width}")
    info = {} if info is None else info
    if latents is None:
        latents = initial_noise(seed, frames, height, width, pipe.device, pipe.dtype)
    fast = latents.is_cuda if fast is None else fast
    stage = on_stage or (lambda name: None)
    if fast:
        stage("fast layer: CUDA graphs and Triton kernels (compiled on a first run, then cached on disk)")
    layer = use_fast_layer(pipe, fast, memory)
    graphs = layer.graphs(pipe.unet) if fast else None  # kept for the next call; one memory pool
    if fast:  # a graph's first call builds the Triton kernels it lacks (fast/precompile.py)
        graphs.on_compile = lambda n: stage(f"Triton kernels: {n} variants, compiled in parallel on a machine's "
                                            "first run, else read from the disk cache")
    before_step, final_prompt = None, prompt
    if layout is not None and guidance is not None:
        import attention  # the guidance machinery, only needed for guided runs
        before_step, final_prompt = attention.guidance_for_layout(pipe, prompt, layout, frames, height, width, guidance)
        if fast:
            graphs.guidance_pass(before_step)  # the kept graph where the masks and tokens are the same
        info.update(guidance=before_step, guidance_history=before_step.history, prompt_suffixes=before_step.suffixes)
    info["final_prompt"] = final_prompt
    text = encode_text(pipe, [negative_prompt, final_prompt])  # (2, 77, d): negative first (§10)
    cond = text[1:]
    if before_step is not None:
        before_step.cond = cond

    def cfg_unet(x, t, text):  # one latent, two text rows (the fast UNet runs the text-free prefix once)
        with torch.no_grad():
            return pipe.unet(x, t, text)
    step_unet = graphs.cfg_step() if fast else cfg_unet  # the fast layer: the same call, from a kept CUDA graph

    def eps_fn(x, t):  # classifier-free guidance as one UNet call, batch 2
        t = torch.as_tensor(t, device=x.device)
        eps_u, eps_c = step_unet(x, t, text).chunk(2)  # (2, 4, f, h, w) -> 2 × (1, 4, f, h, w)
        return eps_u + cfg_scale * (eps_c - eps_u)

    run = sampler.dpm_solver_pp_2m if solver == "dpm" else sampler.ddim
    guided = min(steps, guidance.max_index_step) if before_step is not None else 0
    stage(f"denoising: {steps} steps" + (f", LVD guidance on the first {guided}" if guided else ""))
    t = time.perf_counter()
    x0 = run(eps_fn, latents, pipe.schedule, steps, before_step=before_step, callback=on_step)
    if x0.is_cuda:  # the steps' GPU work, not only their launches (replayed graphs run ahead), ends in their timer
        torch.cuda.synchronize(x0.device)
    info["denoise_s"], t = time.perf_counter() - t, time.perf_counter()
    info["latents"] = x0
    stage("decoding")
    try:
        frames_u8 = decode(pipe, x0, vae_slice)
    except torch.OutOfMemoryError:
        if not fast:
            raise
        layer.release_graphs(pipe.unet)  # the kept graphs' memory, then once more
        frames_u8 = decode(pipe, x0, vae_slice)
    info["decode_s"] = time.perf_counter() - t
    return frames_u8


def use_fast_layer(pipe, fast, memory=None):
    """Plug the fast layer into the pipeline's UNet (fast.apply) and VAE decoder (fast.apply_vae), or take it out,
    as `generate`'s `fast` and `memory` say. -> the fast package, or None where the reference runs as it is (then the
    fast layer is not even imported)."""
    memory = ("cheap" if fast else "off") if memory is None else memory
    if not fast and memory in ("off", False):
        for model, reference in ((pipe.unet, UNet3D), (pipe.vae, VAEDecoder)):
            if type(model) is not reference:  # the fast layer was applied by an earlier call
                import fast as layer
                layer.remove(model)
        return None
    import fast as layer
    layer.apply(pipe.unet, memory=memory, kernels="auto" if fast else None, channels_last=bool(fast))
    if fast:
        layer.apply_vae(pipe.vae)
    elif type(pipe.vae) is not VAEDecoder:
        layer.remove(pipe.vae)
    return layer


@torch.no_grad()
def decode(pipe, latents, slice_size=1):
    """(1, 4, f, h, w) latents -> uint8 frames (f, 8h, 8w, 3), decoded `slice_size` frames at a time."""
    video = pipe.vae.decode_video(latents, slice_size)  # (1, 3, f, H, W) in [-1, 1]
    video = (video[0].float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)  # 3 f H W -> f H W 3
    return (video * 255).to(torch.uint8).cpu().numpy()  # truncation, as diffusers' export_to_video


# -----------------------------------------------------------------------------
# CLI

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="lvd.py", description="LLM-grounded Video Diffusion: text -> layout -> video.",
                                 formatter_class=HelpFormatter,
                                 epilog="Batch mode: `[torchrun --nproc-per-node N] lvd.py --prompts FILE|benchmark "
                                        "--out DIR` runs batch.py (see `python batch.py --help`).")
    ap.add_argument("--prompt", required=True, help="what the video shows")
    ap.add_argument("--model", choices=sorted(MODELS), default="modelscope",
                    help="ModelScope 1.7B (256x256, 16 frames), its Zeroscope v2 576w fine-tune (576x320, 24), or "
                         "the toy model trained on moving shapes (128x128, 8; in the repository, runs on a CPU)")
    ap.add_argument("--model-dir", help="diffusers-layout weights folder (default: models/<model>)")
    ap.add_argument("--download", action="store_true", help="download missing weights first")
    ap.add_argument("--layout", help="a layout JSON file (skips the LLM)")
    ap.add_argument("--frames", type=int, help="default: 16 (modelscope) / 24 (zeroscope) / 8 (toy)")
    ap.add_argument("--height", type=int, help="default: 256 (modelscope) / 320 (zeroscope) / 128 (toy)")
    ap.add_argument("--width", type=int, help="default: 256 (modelscope) / 576 (zeroscope) / 128 (toy)")
    ap.add_argument("--steps", type=int, help="denoising steps (default: 40; toy 20)")
    ap.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: 9; toy 5)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initial noise (drawn on the CPU)")
    ap.add_argument("--negative-prompt", help="default: LVD's fixed negative prompt (toy: the empty prompt)")
    ap.add_argument("--solver", choices=["dpm", "ddim"], default="dpm", help="DPM-Solver++ 2M, or DDIM (use 50 steps)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default: float16 on CUDA, else float32")
    ap.add_argument("--vae-slice", type=int, default=1, help="frames decoded at a time (lower = less memory)")
    ap.add_argument("--out", default="outputs", help="output root; each run gets its own folder")
    g = ap.add_argument_group("guidance (lvd-method.md §4.5-§6)")
    g.add_argument("--guidance", choices=["weak", "benchmark", "off"], default="weak",
                   help="preset; 'off' is the plain ModelScope/Zeroscope baseline")
    add_knob_args(g)
    g.add_argument("--save-attention", action="store_true", help="write attention-map grids per object")
    p = ap.add_argument_group("planner (LLM over HTTP; any OpenAI-compatible server)")
    p.add_argument("--llm-base-url", default=os.environ.get("LVD_LLM_BASE_URL"),
                   help="e.g. http://127.0.0.1:8000/v1 (env LVD_LLM_BASE_URL; default: OpenAI's API)")
    p.add_argument("--llm-model", default=None, help=f"default: {planner.DEFAULT_MODEL}")
    p.add_argument("--llm-cache", default=os.path.join("cache", "layouts.json"), help="layout cache file")
    args = ap.parse_args(argv)
    preset = MODELS[args.model]
    for k, key in (("frames",) * 2, ("height",) * 2, ("width",) * 2, ("steps",) * 2, ("cfg", "cfg_scale"),
                   ("negative_prompt",) * 2):
        if getattr(args, k) is None:
            setattr(args, k, preset[key])
    if args.model == "toy" and args.download:
        ap.error("--download: the toy model ships with the repository (models/toy); nothing to download")
    if args.height % 8 or args.width % 8 or min(args.height, args.width, args.frames, args.steps) <= 0:
        ap.error("--height/--width must be positive multiples of 8; --frames and --steps positive")
    bad_device = check_device(args.device)
    if bad_device:
        ap.error(bad_device)
    args.model_dir = args.model_dir or default_dest(args.model)
    args.dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    return args


def get_layout(args):
    import planner
    if args.layout:
        return planner.Layout.load(args.layout)
    cache = planner.LayoutCache(args.llm_cache)
    return planner.plan(args.prompt, base_url=args.llm_base_url, model=args.llm_model, cache=cache, run_dir=args.out,
                        examples=layout_examples(args.model))


def layout_examples(model):
    """The shipped layouts of a model's demo prompts: the toy world's, or the released GPT-4 examples."""
    return TOY_LAYOUTS if model == "toy" else planner.EXAMPLES_PATH


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--prompts" or a.startswith("--prompts=") for a in argv):  # batch mode: batch.py's CLI
        import batch
        return batch.main(argv)
    args = parse_args(argv)
    unwritable = check_writable(args.out)
    if unwritable:
        print(f"lvd: error: {unwritable}", file=sys.stderr)
        return 1
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("\nlvd: interrupted; nothing was written for this run (caches are written atomically)", file=sys.stderr)
        return 130


def prepare_fast_layer(args):
    """A started thread running `fast.prepare()` (Triton's import, driver and first kernel: about 0.7 s) where the
    run will use the fast layer on CUDA, else None. The CLI starts it before loading the weights: it overlaps
    with the reading of the files instead of following it."""
    if args.fast is False or torch.device(args.device).type != "cuda":
        return None
    import threading

    def prepare():
        import fast
        fast.prepare()
    thread = threading.Thread(target=prepare, name="lvd-prepare-fast-layer", daemon=True)
    thread.start()
    return thread


def _main(args):
    timings, t0 = {}, time.perf_counter()
    try:
        guidance = guidance_params(args)
        progress = Progress(args.steps, min(args.steps, guidance.max_index_step) if guidance else 0)
        layout = None
        if guidance is not None or args.layout:
            progress.stage("planning the layout" + (f" (from {args.layout})" if args.layout else ""))
            layout = get_layout(args)
            print(layout.summary(), file=sys.stderr)
        timings["plan_s"] = time.perf_counter() - t0
        if args.download:
            from weights.download import download
            download(model=args.model, variant="fp16" if args.dtype == torch.float16 else "fp32", dest=args.model_dir)
        t = time.perf_counter()
        progress.stage(f"loading the model from {args.model_dir}")
        preparing = prepare_fast_layer(args)  # Triton's set-up in a thread, while the weights load
        pipe = load_pipeline(args.model_dir, args.device, args.dtype, args.model)
        timings["load_s"] = time.perf_counter() - t
        if preparing is not None:
            preparing.join()
        t, info = time.perf_counter(), {}
        with cudnn_benchmark(bool(args.cudnn_benchmark)), cudnn_attention(bool(args.cudnn_attention)):
            frames = generate(pipe, args.prompt, layout, args.frames, args.height, args.width, args.steps, args.cfg,
                              args.negative_prompt, args.seed, args.solver, guidance, vae_slice=args.vae_slice,
                              on_step=progress, info=info, fast=args.fast, memory=args.checkpointing,
                              on_stage=progress.stage)
        timings.update(denoise_s=info["denoise_s"], decode_s=info["decode_s"])
    except (LVDError, DownloadError, planner.PlannerError, planner.LayoutError, planner.CacheError, ValueError) as e:
        print(f"lvd: error: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print("lvd: error: out of GPU memory. Lower it with fewer --frames, a smaller --height/--width, --dtype float16, "
              "--vae-slice 1, --checkpointing full, or --guidance off.", file=sys.stderr)
        return 1
    settings = {k: v for k, v in vars(args).items()}
    settings.update(dtype=str(args.dtype), final_prompt=info.get("final_prompt"), versions=versions(),
                    prompt_suffixes=info.get("prompt_suffixes"),
                    guidance_params=dataclasses.asdict(guidance) if guidance is not None else None,
                    guidance_history=info.get("guidance_history"), timings_s=timings)
    extra = None
    if args.save_attention and info.get("guidance") is not None and info["guidance"].last_maps:
        from outputs import save_attention_grid
        g = info["guidance"]
        extra = lambda folder: save_attention_grid(g.last_maps, g.masks, g.token_positions, g.names,
                                                   os.path.join(folder, "attention"))
    t = time.perf_counter()
    progress.stage("saving")
    try:
        folder = save_run(args.out, run_name(args.prompt, args.seed), frames, settings, layout, extra)
    except OSError as e:  # e.g. the disk filled up while sampling; save_run leaves no half folder
        print(f"lvd: error: could not write the run folder under {args.out}: {e}", file=sys.stderr)
        return 1
    timings["save_s"] = time.perf_counter() - t
    print(f"lvd: wrote {folder}  (" + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in timings.items()) + ")")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is written: skip the interpreter's teardown (CUDA context, graphs, modules; ~0.7 s)

"""The command line's shared parts: the guidance knobs and memory flags (lvd.py and batch.py), the help format,
the device and output checks, the guidance parameters from the flags, and the progress lines.

What to read: `lvd-method.md` §6 (the presets and their knobs); README "Usage".

Official implementation: generation/lvd.py's argparse in TonyLianLong/LLM-groundedVideoDiffusion @22d90d2.
"""
import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time

import torch


class Progress:
    """Progress on stderr: `stage(name)` prints one line per stage with the seconds since the start; as the
    sampler's callback it draws the denoising bar, the guided steps marked 'G' (LVD's energy guidance runs
    before them) and the others '#'."""

    def __init__(self, total, guided=0, stream=None):
        self.total, self.guided, self.stream = total, guided, stream or sys.stderr
        self.t0 = self.start = self.last = time.perf_counter()

    def stage(self, name):
        self.last = time.perf_counter()  # the next step's time counts from here
        self.stream.write(f"[{self.last - self.t0:6.1f} s] {name}\n")
        self.stream.flush()

    def __call__(self, info):
        now = time.perf_counter()
        i = info["i"] + 1
        if i == 1:
            self.start = self.last
        done = "".join("G" if k * self.total < 24 * self.guided else "#" for k in range(int(24 * i / self.total)))
        label = "denoising, guided" if i <= self.guided else "denoising"
        self.stream.write(f"\r{label:<17} [{done:<24}] {i}/{self.total}  {now - self.last:.2f} s/step")
        if i == self.total:
            self.stream.write(f"  ({now - self.start:.1f} s)\n")
        self.stream.flush()
        self.last = now


GUIDANCE_KNOBS = ["loss_scale", "loss_threshold", "max_iter", "max_index_step", "fg_top_p", "bg_top_p",
                  "fg_weight", "bg_weight", "com_loss_scale"]
KNOB_TEXT = dict(loss_scale="s, the latent step size", loss_threshold="τ: guidance stops once the energy is below it",
                 max_iter="guidance iterations per step", max_index_step="guided steps, from the first",
                 fg_top_p="ρ_fg, top fraction of in-box attention", bg_top_p="ρ_bg, top fraction outside the box",
                 fg_weight="weight of the in-box term", bg_weight="weight of the outside term",
                 com_loss_scale="λ of the centre-of-mass terms (0 = off)")


def knob_help(knob):
    """'what it is (preset values)', e.g. 'guidance iterations per step (weak: 1; benchmark: 5)'."""
    import attention
    values = []
    for name, preset in attention.PRESETS.items():
        v = preset[knob]
        values.append(f"{name}: " + ("/".join(f"{x:g}" for x in v.values()) + " " + "/".join(v)
                                     if isinstance(v, dict) else f"{v:g}"))
    return f"{KNOB_TEXT[knob]} ({'; '.join(values)})"


def add_knob_args(group):
    """The guidance knobs (each overrides the preset's value), --checkpointing and --fast; shared with batch.py."""
    for knob in GUIDANCE_KNOBS:
        group.add_argument("--" + knob.replace("_", "-"), type=float, help=knob_help(knob))
    group.add_argument("--checkpointing", nargs="?", const="full", choices=["off", "cheap", "full"],
                       help="memory of the guidance pass, same result: 'off' keeps every activation; 'cheap' "
                            "recomputes norms and activations in the backward; 'full' (the flag alone) checkpoints "
                            "every block (guided 576x320x24 on an H200: 7.7 GiB instead of 16.8, +22%% time). "
                            "Default: cheap with --fast, off without (the reference as it is)")
    group.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                       help="the fast layer (fast/): CUDA graphs, fused Triton kernels, channels-last activations; "
                            "the same video up to fp16 rounding. --no-fast runs the reference modules (default: on "
                            "for CUDA)")
    group.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None,
                       help="let cuDNN time its convolution algorithms at each new shape and keep the fastest "
                            "(fast.cudnn_benchmark): UNet calls about 1.5%% faster after a one-off cost on the "
                            "first calls of a size (default: on for batches, --prompts; off for one video)")
    group.add_argument("--cudnn-attention", action=argparse.BooleanOptionalAction, default=None,
                       help="cuDNN's kernels for the attention (torch's scaled_dot_product_attention picks them on "
                            "recent GPUs): up to 2%% faster than flash attention in the fast path's steps at "
                            "256x256x16, but cuDNN builds a graph for each shape in each thread on its first calls: "
                            "about 1.5 s of one 256x256x16 video on an H100 (default: on for batches, --prompts; off "
                            "for one video)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds '(default: X)' where there is a default to show and the help text does not already give it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)".strip()


def check_device(device):
    """A one-line message if torch cannot use `device` on this machine, else None."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
    if d.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: CUDA is not available to this torch build on this machine; use --device cpu"
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible"
    if d.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {device}: MPS is not available on this machine"
    return None


def guidance_params(args):
    import attention
    params = attention.preset(args.guidance, args.model)
    if params is None:
        return None
    overrides = {k: getattr(args, k) for k in GUIDANCE_KNOBS if getattr(args, k) is not None}
    for k in ("max_iter", "max_index_step"):
        if k in overrides:
            overrides[k] = int(overrides[k])
    return dataclasses.replace(params, **overrides)


@contextlib.contextmanager
def cudnn_benchmark(enabled):
    """fast.cudnn_benchmark where asked for; nothing (and no import of the fast layer) otherwise."""
    if not enabled:
        yield
        return
    from fast import cudnn_benchmark as benchmark
    with benchmark(True):
        yield


@contextlib.contextmanager
def cudnn_attention(enabled):
    """Inside the block, torch's scaled_dot_product_attention without its cuDNN backend unless `enabled` (then
    torch's own choice); restored after. Flash or memory-efficient attention take its place: kernels chosen per
    process, with no per-shape set-up (cuDNN's graphs are built per shape and per thread, and cached per thread)."""
    switch = getattr(torch.backends.cuda, "enable_cudnn_sdp", None)  # absent where torch has no cuDNN attention
    if enabled or switch is None:
        yield
        return
    old = torch.backends.cuda.cudnn_sdp_enabled()
    switch(False)
    try:
        yield
    finally:
        switch(old)


def check_writable(folder):
    """A one-line message if run folders cannot be written under `folder`, else None (checked before sampling)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"--out {folder}: cannot write there ({e.strerror or e})"
    return None

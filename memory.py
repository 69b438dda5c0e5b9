"""What the guidance pass keeps for its backward: the memory modes of the LVD guidance forward.

What to read: `lvd-method.md` §4.6 (the guidance pass: a cond-only UNet forward whose graph is kept, then
∇_z of the energy) and §10.15 (the official code keeps the whole fp16 graph, with no memory savings);
results/perf-notes.md (what each mode keeps, counted by scripts/saved_activations.py).

Official implementation: none; the official `latent_backward_guidance` (models/pipelines.py) runs a plain
forward. Every piece here gives the same gradient (tests/test_memory.py, tests/test_guidance.py).

Three tools, for a pass whose weights are frozen (only the latents need a gradient):
- `Conv2d`, `Conv3d`: nn.Conv2d/Conv3d (same parameters, same keys) whose autograd node keeps no input. The
  gradient of a convolution with respect to its input needs only the weight; PyTorch's own node keeps the
  input too (for the weight gradient). Always on: no extra work.
- `recompute(fn, x, cheap)`: for cheap elementwise and normalisation work (GroupNorm → SiLU, GEGLU's gate):
  keeps only x and recomputes fn in the backward ('cheap' mode).
- `run_maybe_checkpointed`: activation checkpointing of whole blocks ('full' mode).

Glossary: x (an activation), w (a frozen weight), g (the gradient arriving from above).
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as _checkpoint


class _ConvKeepsNoInput(torch.autograd.Function):
    """y = conv(x; w, b) with w, b frozen; backward: ∂L/∂x = convᵀ(g; w), from the weight alone."""

    @staticmethod
    def forward(ctx, x, conv):
        ctx.conv, ctx.shape = conv, x.shape
        return conv._conv_forward(x, conv.weight, conv.bias)  # nn.ConvNd's own forward (zeros padding)

    @staticmethod
    def backward(ctx, g):
        c = ctx.conv
        shape_only = g.new_empty(1).expand(ctx.shape)  # read for its shape only, as torch.nn.grad.conv2d_input does
        gx = torch.ops.aten.convolution_backward(g, shape_only, c.weight, None, c.stride, c.padding, c.dilation,
                                                 False, [0] * len(c.stride), c.groups, (True, False, False))[0]
        return gx, None


def conv_keeping_no_input(conv, x):
    """conv(x); when a graph is built for x alone (frozen weights), the node keeps no input (see above)."""
    frozen = not conv.weight.requires_grad and (conv.bias is None or not conv.bias.requires_grad)
    if frozen and conv.padding_mode == "zeros" and torch.is_grad_enabled() and x.requires_grad:
        return _ConvKeepsNoInput.apply(x, conv)
    return conv._conv_forward(x, conv.weight, conv.bias)


class Conv2d(nn.Conv2d):
    def forward(self, x):
        return conv_keeping_no_input(self, x)


class Conv3d(nn.Conv3d):
    def forward(self, x):
        return conv_keeping_no_input(self, x)


def run_maybe_checkpointed(fn, ckpt, *args):
    """fn(*args); with `ckpt` (and grad on) under activation checkpointing: the activations inside fn are
    recomputed in the backward instead of kept (the LVD guidance pass, `lvd-method.md` §10.15)."""
    if ckpt and torch.is_grad_enabled():
        # eval mode has no randomness, and reading the CUDA RNG state is not allowed inside a CUDA-graph capture
        return _checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


def checkpoint_mode(checkpoint):
    """False/'off': keep every activation; 'cheap': recompute only norms and activations (below); True/'full':
    checkpoint every resnet+temporal conv and every transformer. -> (full, cheap)."""
    mode = {False: "off", True: "full", None: "off"}.get(checkpoint, checkpoint)
    if mode not in ("off", "cheap", "full"):
        raise ValueError(f"checkpointing must be 'off', 'cheap' or 'full', got {checkpoint!r}")
    return mode == "full", mode == "cheap"


class _Recompute(torch.autograd.Function):
    """y = fn(x) keeping only x for the backward, which recomputes fn. For frozen weights only (no weight grads)."""

    @staticmethod
    def forward(ctx, fn, x):
        ctx.fn = fn
        ctx.save_for_backward(x)
        return fn(x)  # autograd records nothing inside a Function's forward

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            y = ctx.fn(x)
        return None, torch.autograd.grad(y, x, grad)[0]


def recompute(fn, x, cheap):
    """fn(x), where fn is cheap elementwise or normalisation work (GroupNorm -> SiLU, GEGLU's gate). With `cheap`
    (and a graph being built) its output is not kept for the backward but recomputed there from x: the guidance
    pass's 'cheap' memory mode. Same values and gradients (tested); inference only."""
    if cheap and torch.is_grad_enabled() and x.requires_grad:
        return _Recompute.apply(fn, x)
    return fn(x)

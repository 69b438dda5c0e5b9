"""What the guidance pass keeps for its backward (the memory modes of the LVD guidance forward), and the
channels-last memory layout of the UNet's activations.

What to read: `lvd-method.md` §4.6 (the guidance pass: a cond-only UNet forward whose graph is kept, then
∇_z of the energy) and §10.15 (the official code keeps the whole fp16 graph, with no memory savings);
results/perf-notes.md (what each mode keeps, counted on 2026-12-01 by a script since removed).

Official implementation: none; the official `latent_backward_guidance` (models/pipelines.py) runs a plain
forward. Every piece here gives the same gradient (tests/test_memory.py, tests/test_guidance.py).

Three tools, for a pass whose weights are frozen (only the latents need a gradient):
- `Conv2d`, `Conv3d`: nn.Conv2d/Conv3d (same parameters, same keys) whose autograd node keeps no input. The
  gradient of a convolution with respect to its input needs only the weight; PyTorch's own node keeps the
  input too (for the weight gradient). Always on: no extra work.
- `recompute(fn, x, cheap)`: for cheap elementwise and normalisation work (GroupNorm → SiLU, GEGLU's gate):
  keeps only x and recomputes fn in the backward ('cheap' mode).
- `run_maybe_checkpointed`: activation checkpointing of whole blocks ('full' mode).

The layout (for speed, any pass): `GroupNorm` / `group_norm` normalise a channels-last tensor ((b f) h w c or
b f h w c in memory) without copying it to NCHW, which PyTorch's CUDA GroupNorm does; `memory_format(x)` names a
tensor's layout, and the convolutions' input gradient keeps it (tests/test_layout.py); the reference's
`frames_to_batch` and `batch_to_frames` fold a video's frames into the batch and back, as views in that layout.

`fast.apply` swaps these classes in for the UNet's nn.Conv2d, nn.Conv3d and nn.GroupNorm (same parameters, keys).

Glossary: x (an activation), w (a frozen weight), g (the gradient arriving from above).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from unet_transformers import batch_to_frames, frames_to_batch  # noqa: F401 (the folds: views in channels-last too)


class _ConvKeepsNoInput(torch.autograd.Function):
    """y = conv(x; w, b) with w, b frozen; backward: ∂L/∂x = convᵀ(g; w), from the weight alone."""

    @staticmethod
    def forward(ctx, x, conv, bias):
        ctx.conv, ctx.shape, ctx.format = conv, x.shape, memory_format(x)
        return conv._conv_forward(x, conv.weight, bias)  # nn.ConvNd's own forward (zeros padding)

    @staticmethod
    def backward(ctx, g):
        c = ctx.conv
        # read for its shape and layout only: an expanded one-element tensor (torch.nn.grad.conv2d_input's) reads as
        # NCHW, and cuDNN then converts g to NCHW and back to the weight's channels-last (two copies of g)
        shape_only = torch.empty(ctx.shape, dtype=g.dtype, device=g.device, memory_format=ctx.format)
        gx = torch.ops.aten.convolution_backward(g, shape_only, c.weight, None, c.stride, c.padding, c.dilation,
                                                 False, [0] * len(c.stride), c.groups, (True, False, False))[0]
        return gx.contiguous(memory_format=ctx.format), None, None  # x's layout (a no-op where cuDNN gave it)


def conv_keeping_no_input(conv, x, bias=True):
    """conv(x); when a graph is built for x alone (frozen weights), the node keeps no input (see above). With
    bias=False the bias is left out, for the caller to fold into its next op (PyTorch adds a convolution's bias in
    a separate pass over the output)."""
    b = conv.bias if bias else None
    frozen = not conv.weight.requires_grad and (conv.bias is None or not conv.bias.requires_grad)
    if frozen and conv.padding_mode == "zeros" and torch.is_grad_enabled() and x.requires_grad:
        y = _ConvKeepsNoInput.apply(x, conv, b)
    else:
        y = conv._conv_forward(x, conv.weight, b)
    # x's layout: a no-op on cuDNN and oneDNN; the CPU's plain conv3d (one thread, batch < 16, (3,1,1)) gives NCDHW
    return y.contiguous(memory_format=memory_format(x))


class Conv2d(nn.Conv2d):
    def forward(self, x, bias=True):
        return conv_keeping_no_input(self, x, bias)


class Conv3d(nn.Conv3d):
    def forward(self, x, bias=True):
        return conv_keeping_no_input(self, x, bias)


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


# -----------------------------------------------------------------------------
# the channels-last layout

def memory_format(x):
    """torch.channels_last (4-D) or channels_last_3d (5-D) for a tensor in that layout and not also contiguous,
    else torch.contiguous_format."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim)
    if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        return fmt
    return torch.contiguous_format


def group_norm(x, groups, weight, bias, eps):
    """F.group_norm(x, groups, weight, bias, eps) for x (n, c, *spatial); a channels-last x stays channels-last.

    Channels-last: the statistics over a (n, s, G, c/G) view, accumulated in fp32 (Welford, as torch's own
    GroupNorm; for an fp16 x the std and mean are then rounded to fp16: on an H200 the error equalled torch
    2.11's fp16 GroupNorm's), then y = x * scale + shift with per-(n, c) scale and shift in fp32, in one pass
    that reads x and writes y.
    Any other layout goes to F.group_norm (the reference, tests/test_layout.py).
    """
    n, c = x.shape[:2]
    xt = x.movedim(1, -1)  # n c *s -> n *s c, a view
    if not xt.is_contiguous():
        return F.group_norm(x, groups, weight, bias, eps)
    v = xt.view(n, -1, groups, c // groups)  # n *s (G c/G) -> n s G c/G
    std, mean = torch.std_mean(v, dim=(1, 3), correction=0, keepdim=True)  # (n, 1, G, 1); std: an fp16 var overflows
    root_eps = std.new_full((1,), eps ** 0.5, dtype=torch.promote_types(x.dtype, torch.float32))
    hyp = torch.hypot(std, root_eps)  # sqrt(var + eps), fp32
    scale = hyp.reciprocal() if weight is None else weight.view(groups, -1) / hyp  # (n, 1, G, c/G)
    shift = -mean * scale if bias is None else torch.addcmul(bias.view(groups, -1), mean, scale, value=-1)
    if torch.is_grad_enabled():  # autograd has no out=: an fp32 intermediate for an fp16 x
        y = torch.addcmul(shift, v, scale).to(x.dtype)
    else:  # computed in fp32, written in x's dtype
        y = torch.addcmul(shift, v, scale, out=torch.empty_like(v))
    return y.view(xt.shape).movedim(-1, 1)  # n s G c/G -> n *s c -> n c *s, channels-last again


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, same keys) through `group_norm`: channels-last in, channels-last out.
    With `fused` (a fused.Kernels, set by fast.apply) a channels-last x goes through the fused kernel."""
    fused = None

    def forward(self, x, keep=False):
        """GroupNorm(x); with `keep` -> (x, GroupNorm(x)): x to read for a residual add (`fused.Kernels.group_norm`)."""
        y = None if self.fused is None else self.fused.group_norm(self, x, keep=keep)
        if y is None:
            y = group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            return (x, y) if keep else y
        return y

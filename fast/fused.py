"""Fused kernels for the UNet's memory-bound work: GroupNorm (+ SiLU, + a broadcast add), LayerNorm, GEGLU's gate,
residual adds that take the bias of the convolution before them, and the temporal transformers' attention over
the frames on in-place tokens.

What to read: results/perf-notes.md (2026-12-01: after CUDA graphs and channels-last, a third of the 576×320×24 CFG
step's kernel time was eager GroupNorm, SiLU, GEGLU, LayerNorm and bias adds, each a separate pass over memory at
0.2–1 TB/s); modelscope-architecture.md §4.5-§4.9 (where these ops sit); kernels.py and kernels_rows.py (the Triton kernels).

Official implementation: none; diffusers and the official LVD code run nn.GroupNorm, F.silu, nn.LayerNorm and
diffusers' GEGLU (models/activations.py) eagerly. Same values: the functions below are that math in plain
PyTorch, computed in fp32 and rounded once to the input's dtype; kernels.py computes the same and is tested
against them, and they against the eager modules (tests/test_fused.py).

How: `fast.apply(unet)` gives one `Kernels` to every GroupNorm, LayerNorm and GEGLU module of the UNet (not the VAE);
their forward then calls `_Norm` / `_GEGLU`, autograd Functions for frozen weights whose backward is a kernel too
and which keep only the input and the (n, groups) statistics (what the 'cheap' memory mode keeps by hand).
With the kernels on, the resnets and temporal convolutions run their convolutions without bias and fold it into
the next fused op: the next GroupNorm's add (with the time embedding) or the residual add (`Kernels.add`); the
temporal transformers keep their (b, f, h·w, c) tokens in place and attend over f through `Kernels.frame_attention`
(kernels_attention.py; `frame_attention` below is its math through `attention.attend`, results/perf-notes.md,
2026-12-02).
Backends: 'triton' (kernels.py, kernels_rows.py: the fast path, where `available()`: CUDA and Triton, which torch's CUDA wheels
ship) and 'torch' (this file's math: the reference). Measured against torch.compile of the same functions
(dynamic shapes): slower than eager at 576×320×24 (results/perf-notes.md), hence hand-written kernels.

Shapes: a channels-last (n, c, *s) activation is an (n, s, c) tensor in memory; the functions take that view.
"""
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import attend

log = logging.getLogger(__name__)


def available():
    """True where the Triton kernels can run: CUDA, Triton (which torch's CUDA wheels ship), and one small kernel
    compiles and runs on this GPU (else a warning, and the eager modules run: --fast keeps its CUDA graphs)."""
    if not torch.cuda.is_available():
        return False
    try:
        from fast import kernels_rows  # imports triton
    except ImportError:
        return False
    try:
        kernels_rows.geglu_fwd(torch.zeros(1, 2, device="cuda"))  # compiled once per process, then cached
    except Exception as e:  # noqa: BLE001 (a Triton or driver failure on this GPU: run eagerly instead)
        log.warning("fused kernels off, Triton failed on this GPU: %s: %s", type(e).__name__, e)
        return False
    return True


# -----------------------------------------------------------------------------
# the math, in plain PyTorch (the 'torch' backend, and the reference for kernels.py)

def _acc(x):
    """The dtype the math runs in: fp32 for fp16/bf16/fp32 inputs, float64 for float64 (the tests' oracle)."""
    return torch.promote_types(x.dtype, torch.float32)


def group_stats(v, groups):
    """Per-(n, group) mean and variance of v (n, s, c), from the per-channel ones: the reduction runs over s with
    the channels contiguous (coalesced reads), then, exactly (equal counts per channel), mean = mean_c(mean_c) and
    var = mean_c(var_c) + mean_c((mean_c − mean)²) within each group. -> (mean, var), each (n, 1, G, 1)."""
    n, s, c = v.shape
    var_c, mean_c = torch.var_mean(v, dim=1, correction=0, keepdim=True)  # (n, 1, c)
    var_c, mean_c = var_c.view(n, 1, groups, c // groups), mean_c.view(n, 1, groups, c // groups)
    mean = mean_c.mean(dim=-1, keepdim=True)
    return mean, var_c.mean(dim=-1, keepdim=True) + (mean_c - mean).square().mean(dim=-1, keepdim=True)


def group_mean(v, groups):
    """Mean of v (n, s, G, c/G) over s and each group, as in `group_stats` (over s first). -> (n, 1, G, 1)."""
    return v.mean(dim=1, keepdim=True).mean(dim=-1, keepdim=True)


def norm_forward(x, weight, bias, add, groups: int, eps: float, silu: bool):
    """Group normalisation of x (n, s, c) over s and each group of c / groups channels, in fp32 (float64 for a
    float64 x), then SiLU if `silu`; `add` (n, 1, c), if not None, is added to x first. LayerNorm: groups = 0 (over
    c alone, per row). -> (y (n, s, c) in x's dtype, mean, rstd: (n, 1, G, 1), or (n, s, 1, 1) for LayerNorm)."""
    n, s, c = x.shape
    f = _acc(x)
    v = x.to(f) if add is None else x.to(f) + add.to(f)
    if groups:
        mean, var = group_stats(v, groups)
    else:
        var, mean = torch.var_mean(v.view(n, s, 1, c), dim=-1, correction=0, keepdim=True)
    k = groups or 1
    rstd = torch.rsqrt(var + eps)
    z = (v.view(n, s, k, c // k) - mean) * rstd * weight.to(f).view(k, -1) + bias.to(f).view(k, -1)
    y = F.silu(z) if silu else z
    return y.view(n, s, c).to(x.dtype), mean, rstd  # n s G c/G -> n s c


def norm_backward(g, x, weight, bias, add, mean, rstd, groups: int, silu: bool):
    """∂L/∂x of `norm_forward` for frozen weight and bias, from g = ∂L/∂y (n, s, c), recomputing x̂ from x:
    ∂L/∂x = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ · x̂)), ĝ = w · ∂L/∂z, the means over each group (or row)."""
    n, s, c = x.shape
    k, f = groups or 1, _acc(x)
    v = (x.to(f) if add is None else x.to(f) + add.to(f)).view(n, s, k, c // k)
    w = weight.to(f).view(k, -1)
    xhat = (v - mean) * rstd
    gz = g.to(f).view(n, s, k, c // k)
    if silu:  # SiLU'(z) = σ(z) · (1 + z · (1 − σ(z)))
        z = xhat * w + bias.to(f).view(k, -1)
        sig = torch.sigmoid(z)
        gz = gz * sig * (1 + z * (1 - sig))
    ghat = gz * w
    mean_of = (lambda t: group_mean(t, groups)) if groups else (lambda t: t.mean(dim=-1, keepdim=True))
    gx = rstd * (ghat - mean_of(ghat) - xhat * mean_of(ghat * xhat))
    return gx.view(n, s, c).to(x.dtype)


def geglu_forward(h):
    """GEGLU's gate: h (..., 2·inner) -> value · GELU(gate), value the first half (exact GELU), in fp32."""
    value, gate = h.to(_acc(h)).chunk(2, dim=-1)
    return (value * F.gelu(gate)).to(h.dtype)


def geglu_backward(g, h):
    """∂L/∂h of `geglu_forward`: [g · GELU(gate), g · value · GELU'(gate)], GELU'(u) = Φ(u) + u · φ(u)."""
    value, gate = h.to(_acc(h)).chunk(2, dim=-1)
    cdf = 0.5 * (1 + torch.erf(gate * 0.5 ** 0.5))
    pdf = torch.exp(-0.5 * gate * gate) * (2 * math.pi) ** -0.5
    g = g.to(value.dtype)
    return torch.cat([g * gate * cdf, g * value * (cdf + gate * pdf)], dim=-1).to(h.dtype)


def add_forward(a, b, bias):
    """a + b + bias for a, b (n, s, c) and bias (c,), in fp32, rounded once: a residual add that takes the bias of
    the convolution before it (which PyTorch would add in a pass of its own)."""
    f = _acc(a)
    return (a.to(f) + b.to(f) + bias.to(f)).to(a.dtype)


def _with_residual(gx, residual):
    """gx + residual (the gradient of a residual path that read the same x), in fp32, rounded once."""
    return gx if residual is None else (gx.to(_acc(gx)) + residual.to(_acc(gx))).to(gx.dtype)


def _group_norm_backward(g, x, weight, bias, add, mean, rstd, groups, silu, residual=None):
    return _with_residual(norm_backward(g, x, weight, bias, add, mean, rstd, groups, silu), residual)


def _layer_norm_forward(x, weight, bias, eps, add=None):
    """LayerNorm of x (1, R, c) [+ add (c,)] as `norm_forward` (groups = 0)."""
    return norm_forward(x, weight, bias, None if add is None else add.view(1, 1, -1), 0, eps, False)


def _layer_norm_backward(g, x, weight, bias, mean, rstd, add=None, residual=None):
    """∂L/∂x of `_layer_norm_forward`, plus `residual` (another path's gradient for x) where given."""
    gx = norm_backward(g, x, weight, bias, None if add is None else add.view(1, 1, -1), mean, rstd, 0, False)
    return _with_residual(gx, residual)


def add_linear(x, a, linear, in_place=False):
    """x + a·Wᵀ for `linear` (nn.Linear, its bias left out: the caller carries it), in one matrix product
    (cuBLAS's C + A·B epilogue) instead of the product and an add: x (..., d), a (..., k) -> (..., d).
    With `in_place` and no graph being built (the CFG step), written into x: an out-of-place addmm first copies x
    to its output (a device-to-device copy of the whole activation; results/perf-notes.md, 2026-12-03)."""
    d = linear.out_features
    x2, a2 = x.reshape(-1, d), a.reshape(-1, a.shape[-1])  # ... d -> (...) d, a view of a contiguous x
    if in_place and x.is_contiguous() and not (torch.is_grad_enabled() and (x.requires_grad or a.requires_grad)):
        return x2.addmm_(a2, linear.weight.t()).view(x.shape)
    return torch.addmm(x2, a2, linear.weight.t()).view(x.shape)


def folded(module, name, fn):
    """The `Folded` of fn kept on `module` under `name`, made on first use (`fast.remove` drops it)."""
    value = module.__dict__.get(name)
    if value is None:
        value = module.__dict__[name] = Folded(fn)
    return value


class Folded:
    """A tensor computed from frozen parameters (biases folded into another op), recomputed when any of them
    changes (a weight load gives new storage or bumps the in-place version counter). Recomputed values are
    written into the first one where the shape, dtype and device allow, so a CUDA graph that read it stays valid."""

    def __init__(self, fn):
        self.fn, self.key, self.value = fn, None, None

    def __call__(self, *params):
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        if key != self.key:
            with torch.no_grad():
                v = self.fn(*params)
                old = self.value
                if old is not None and (old.shape, old.dtype, old.device) == (v.shape, v.dtype, v.device):
                    v = old.copy_(v)
            self.key, self.value = key, v
        return self.value


def frame_attention(q, k, v, heads, store=None, path=None):
    """The temporal transformer's attention: q, k, v (b, f, p, n·e), tokens in the channels-last order, attended
    over f at each (b, p), per head: the tokens folded to (b p) f (n e) for `attention.attend` (SDPA, or the
    probabilities captured where `store` wants `path`). -> (b, f, p, n·e)."""
    b, f, p, d = q.shape
    q, k, v = (t.transpose(1, 2).reshape(b * p, f, d) for t in (q, k, v))  # b f p d -> (b p) f d
    return attend(q, k, v, heads, store, path).view(b, p, f, d).transpose(1, 2)  # (b p) f d -> b f p d


class _Norm(torch.autograd.Function):
    """y = norm(x) with frozen weights through k.gn / k.gn_bwd (or k.ln / k.ln_bwd); keeps x and the statistics.
    With `keep`: -> (y, x), x for a residual path, whose gradient the backward kernel adds to its own."""

    @staticmethod
    def forward(ctx, x, weight, bias, add, groups, eps, silu, k, keep=False):
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            raise ValueError("fused norms are for frozen weights (inference and latent guidance) only")
        xc = x.contiguous()
        if groups:
            y, mean, rstd = k.gn(xc, weight, bias, add, groups, eps, silu)
        else:
            y, mean, rstd = k.ln(xc, weight, bias, eps, add)
        ctx.save_for_backward(xc, weight, bias, add, mean, rstd)
        ctx.groups, ctx.silu, ctx.k = groups, silu, k
        return (y, x) if keep else y

    @staticmethod
    def backward(ctx, g, g_x=None):
        x, weight, bias, add, mean, rstd = ctx.saved_tensors
        g = g.contiguous()
        r = None if g_x is None else g_x.contiguous()
        if ctx.groups:
            gx = ctx.k.gn_bwd(g, x, weight, bias, add, mean, rstd, ctx.groups, ctx.silu, r)
        else:
            gx = ctx.k.ln_bwd(g, x, weight, bias, mean, rstd, add, r)
        return gx, None, None, None, None, None, None, None, None


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, k):
        h = h.contiguous()
        ctx.save_for_backward(h)
        ctx.k = k
        return k.geglu_fwd(h)

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        return ctx.k.geglu_bwd(g.contiguous(), h), None


class _Add(torch.autograd.Function):
    """y = a + b + bias (frozen bias): ∂L/∂a = ∂L/∂b = g; keeps nothing."""

    @staticmethod
    def forward(ctx, a, b, bias, k):
        if ctx.needs_input_grad[2]:
            raise ValueError("fused adds are for frozen biases (inference and latent guidance) only")
        return k.add_fwd(a, b, bias)

    @staticmethod
    def backward(ctx, g):
        return g, g, None, None


class _FrameAttention(torch.autograd.Function):
    """o = frame_attention(q, k, v) through kernels_attention.py from one joined product qkv (b, f, p, 3·n·e),
    q | k | v along the last dim; keeps qkv (the backward recomputes P) and gives ∂L/∂qkv packed, as the kernel
    writes it (three gradients would be concatenated after, a copy per layer)."""

    @staticmethod
    def forward(ctx, qkv, heads, kernels):
        if kernels.rows_apart(*qkv.chunk(3, dim=-1)) is None:  # else read in place (rows 3·D apart)
            qkv = qkv.contiguous()
        ctx.save_for_backward(qkv)
        ctx.heads, ctx.kernels = heads, kernels
        return kernels.frame_attention_fwd(*qkv.chunk(3, dim=-1), heads)

    @staticmethod
    def backward(ctx, g):
        (qkv,) = ctx.saved_tensors
        dqkv = ctx.kernels.frame_attention_bwd(g.contiguous(), *qkv.chunk(3, dim=-1), ctx.heads, packed=True)
        return dqkv, None, None


class Kernels:
    """The fused functions for the modules of one model (`fast.apply`): backend 'triton' (kernels.py, the fast
    path) or 'torch' (the same math in plain PyTorch above: the reference, and what runs without Triton)."""

    def __init__(self, backend="triton"):
        if backend == "triton":
            from fast import kernels, kernels_attention, kernels_rows
            self.gn, self.gn_bwd = kernels.group_norm_fwd, kernels.group_norm_bwd
            self.ln, self.ln_bwd = kernels_rows.layer_norm_fwd, kernels_rows.layer_norm_bwd
            self.geglu_fwd, self.geglu_bwd = kernels_rows.geglu_fwd, kernels_rows.geglu_bwd
            self.add_fwd = kernels_rows.add_bias
            self.frames = kernels_attention
        elif backend == "torch":
            self.gn, self.gn_bwd = norm_forward, _group_norm_backward
            self.ln, self.ln_bwd = _layer_norm_forward, _layer_norm_backward
            self.geglu_fwd, self.geglu_bwd = geglu_forward, geglu_backward
            self.add_fwd = add_forward
            self.frames = None
        else:
            raise ValueError(f"Kernels: backend must be 'triton' or 'torch', got {backend!r}")
        self.backend = backend
        self.reference = Kernels("torch") if backend == "triton" else self

    def _for(self, x):
        """The functions for x's device: Triton's kernels need a CUDA tensor; a CPU one gets the 'torch' math."""
        return self if x.is_cuda else self.reference

    def group_norm(self, norm, x, silu=False, add=None, keep=False):
        """[SiLU](GroupNorm `norm`(x [+ add])) for a channels-last x (n, c, *s); add (n, c) broadcast over s.
        -> (n, c, *s), channels-last; with `keep`, (x, y) as `layer_norm`. Another layout, or groups not a power
        of 2 (the group counts the kernel tests cover): None (run the eager path)."""
        n, c = x.shape[:2]
        xt = x.movedim(1, -1)  # n c *s -> n *s c, a view
        groups = norm.num_groups
        if not xt.is_contiguous() or groups & (groups - 1):
            return None
        add = None if add is None else add.reshape(n, 1, c)
        y = _Norm.apply(xt.view(n, -1, c), norm.weight, norm.bias, add, groups, norm.eps, silu, self._for(x), keep)
        back = lambda t: t.view(xt.shape).movedim(-1, 1)  # noqa: E731 (n s c -> n *s c -> n c *s, channels-last)
        return (back(y[1]), back(y[0])) if keep else back(y)

    def layer_norm(self, norm, x, add=None, keep=False):
        """nn.LayerNorm `norm` (over the last dim) of x (..., c) [+ add (c,)]. With `keep`: -> (x, y), x to read
        for the residual add (whose gradient then joins the norm's backward kernel instead of a separate add)."""
        c = x.shape[-1]
        y = _Norm.apply(x.reshape(1, -1, c), norm.weight, norm.bias, add, 0, norm.eps, False, self._for(x), keep)
        if keep:  # (1, R, c) twice -> x's shape
            return y[1].view(x.shape), y[0].view(x.shape)
        return y.view(x.shape)

    def geglu(self, h):
        return _GEGLU.apply(h, self._for(h))

    def in_place_frames(self, f, e):
        """True where a temporal transformer should keep its tokens in place (b, f, h·w, c) for `frame_attention`:
        the Triton kernels apply to f frames and head width e, or the 'torch' math (the reference) runs."""
        return self.frames is None or self.frames.supports(f, e)

    def frame_attention(self, qkv, heads):
        """`frame_attention` of a self-attention's joined product qkv (b, f, p, 3·n·e) (q | k | v: attention over f);
        the Triton kernel where it applies."""
        frames = self._for(qkv).frames
        d = qkv.shape[-1] // 3
        if frames is None or not frames.supports(qkv.shape[1], d // heads):
            return frame_attention(*qkv.split(d, dim=-1), heads)
        return _FrameAttention.apply(qkv, heads, frames)

    def add(self, a, b, bias):
        """a + b + bias (c,) for a, b (n, c, *s) of one shape; channels-last in one fused pass, else eagerly."""
        n, c = a.shape[:2]
        at, bt = a.movedim(1, -1), b.movedim(1, -1)  # n c *s -> n *s c, views
        if not (at.is_contiguous() and bt.is_contiguous() and a.shape == b.shape):
            return a + b + bias.view(c, *[1] * (a.dim() - 2))
        y = _Add.apply(at.view(n, -1, c), bt.view(n, -1, c), bias, self._for(a))
        return y.view(at.shape).movedim(-1, 1)  # n s c -> n *s c -> n c *s, channels-last


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, same keys); through the fused kernel when `fused` holds a `Kernels`."""
    fused = None

    def forward(self, x, add=None, keep=False):
        """LayerNorm(x [+ add (c,)]); with `keep` -> (x, LayerNorm(...)) (`Kernels.layer_norm`)."""
        if self.fused is not None:
            return self.fused.layer_norm(self, x, add, keep)
        y = super().forward(x if add is None else x + add.to(x.dtype))
        return (x, y) if keep else y

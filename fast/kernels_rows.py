"""Triton kernels for fused.py, row-wise and elementwise: LayerNorm (optionally of x + a per-channel add), GEGLU's
gate, forward and backward (frozen weights: the backward gives ∂L/∂x only), and a residual add with a folded bias.

What to read: fused.py (the same math in plain PyTorch, `_layer_norm_forward`, `_layer_norm_backward`,
`geglu_forward`, `geglu_backward`, `add_forward`: the reference these kernels are tested against,
tests/test_fused.py); kernels.py (the GroupNorm kernels and the index helpers used here); results/perf-notes.md.

Official implementation: none (diffusers and the official LVD code run nn.LayerNorm and GEGLU eagerly, each a
separate pass over memory). Imported only where Triton is (fused.available()); on the CPU the tests run these
kernels in Triton's interpreter (TRITON_INTERPRET=1).

Layout: LayerNorm works on rows of an (R, c) tensor, one program per BLOCK_R rows, a row's c channels padded to a
power of two; GEGLU and the add are flat elementwise passes. Everything is computed in fp32 and rounded once.

Glossary: R (LayerNorm / GEGLU rows), c (channels), I (GEGLU inner width).
"""
import torch
import triton
import triton.language as tl

from fast.kernels import _FLAT, _offsets, _rows, _wide

_TILE = 8192  # elements per program-tile in the LayerNorm kernels


@triton.jit
def _add_bias(a_ptr, b_ptr, bias_ptr, y_ptr, total, C, BLOCK: tl.constexpr, I64: tl.constexpr):
    """y = a + b + bias, bias per channel (the convolution bias folded into a residual add)."""
    o = _offsets(BLOCK, I64)
    m = o < total
    y = tl.load(a_ptr + o, mask=m, other=0.0).to(tl.float32) + tl.load(b_ptr + o, mask=m, other=0.0).to(tl.float32) \
        + tl.load(bias_ptr + o % C, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + o, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _layer_row(x_ptr, add_ptr, offs, cols, cm, mask, HAS_ADD: tl.constexpr):
    """The (BLOCK_R, C_PAD) tile of x [+ add (C,)] in fp32, zeros outside."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        x += tl.load(add_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    return tl.where(mask, x, 0.0)


@triton.jit(do_not_specialize=["R"])
def _layer_norm_fwd(x_ptr, add_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, R, C, eps, HAS_ADD: tl.constexpr,
                    C_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    rows, cols, cm, mask, offs = _rows(R, C, C_PAD, BLOCK_R)
    x = _layer_row(x_ptr, add_ptr, offs, cols, cm, mask, HAS_ADD)
    mean = tl.sum(x, axis=1) / C
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    y = d * rstd[:, None] * tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :] \
        + tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=rows < R)
    tl.store(rstd_ptr + rows, rstd, mask=rows < R)


@triton.jit(do_not_specialize=["R"])
def _layer_norm_bwd(x_ptr, add_ptr, g_ptr, r_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, R, C,
                    HAS_ADD: tl.constexpr, HAS_R: tl.constexpr, C_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """dx = LayerNorm's ∂L/∂x from g [+ r, the gradient of a residual path that also reads x]."""
    rows, cols, cm, mask, offs = _rows(R, C, C_PAD, BLOCK_R)
    rstd = tl.load(rstd_ptr + rows, mask=rows < R, other=0.0)[:, None]
    x = _layer_row(x_ptr, add_ptr, offs, cols, cm, mask, HAS_ADD)
    xhat = tl.where(mask, (x - tl.load(mean_ptr + rows, mask=rows < R, other=0.0)[:, None]) * rstd, 0.0)
    ghat = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) \
        * tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    m1 = tl.sum(ghat, axis=1)[:, None] / C
    m2 = tl.sum(ghat * xhat, axis=1)[:, None] / C
    dx = rstd * (ghat - m1 - xhat * m2)
    if HAS_R:
        dx += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_halves(h_ptr, total, I, BLOCK: tl.constexpr, I64: tl.constexpr):
    """This program's BLOCK flat (R, I) indices o, their mask, h's value-half index, and the value and gate."""
    o = _offsets(BLOCK, I64)
    m = o < total
    src = (o // I) * 2 * I + o % I  # (R, I) index -> the value half of row r of h (R, 2I)
    value = tl.load(h_ptr + src, mask=m, other=0.0).to(tl.float32)
    return o, m, src, value, tl.load(h_ptr + src + I, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _geglu_fwd(h_ptr, y_ptr, total, I, BLOCK: tl.constexpr, I64: tl.constexpr):
    o, m, _, value, gate = _geglu_halves(h_ptr, total, I, BLOCK, I64)
    y = value * 0.5 * gate * (1 + tl.erf(gate * 0.7071067811865476))
    tl.store(y_ptr + o, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _geglu_bwd(h_ptr, g_ptr, dh_ptr, total, I, BLOCK: tl.constexpr, I64: tl.constexpr):
    o, m, src, value, gate = _geglu_halves(h_ptr, total, I, BLOCK, I64)
    g = tl.load(g_ptr + o, mask=m, other=0.0).to(tl.float32)
    cdf = 0.5 * (1 + tl.erf(gate * 0.7071067811865476))
    pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327  # 1/√(2π)
    tl.store(dh_ptr + src, (g * gate * cdf).to(dh_ptr.dtype.element_ty), mask=m)
    tl.store(dh_ptr + src + I, (g * value * (cdf + gate * pdf)).to(dh_ptr.dtype.element_ty), mask=m)


# -----------------------------------------------------------------------------
# launchers: the same signatures and results as fused._layer_norm_forward / _layer_norm_backward, geglu_forward /
# geglu_backward, add_forward

def _ln_blocks(c):
    c_pad = triton.next_power_of_2(c)
    return c_pad, max(1, _TILE // 2 // c_pad)


def layer_norm_fwd(x, weight, bias, eps, add=None):
    """x (1, R, c) contiguous, add (c,) or None (added to every row first) -> (y, mean (R,), rstd (R,))."""
    rows, c = x.shape[1], x.shape[2]
    c_pad, block_r = _ln_blocks(c)
    y = torch.empty_like(x)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _layer_norm_fwd[(triton.cdiv(rows, block_r),)](x, x if add is None else add, y, weight, bias, mean, rstd, rows,
                                                    c, eps, HAS_ADD=add is not None, C_PAD=c_pad,
                                                    BLOCK_R=block_r, num_warps=4)
    return y, mean, rstd


def layer_norm_bwd(g, x, weight, bias, mean, rstd, add=None, residual=None):
    """∂L/∂x of layer_norm_fwd from g (1, R, c) contiguous, plus `residual` (1, R, c) (the gradient of another
    path that read x) where given."""
    rows, c = x.shape[1], x.shape[2]
    c_pad, block_r = _ln_blocks(c)
    dx = torch.empty_like(x)
    _layer_norm_bwd[(triton.cdiv(rows, block_r),)](x, x if add is None else add, g, g if residual is None else residual,
                                                    dx, weight, mean, rstd, rows, c, HAS_ADD=add is not None,
                                                    HAS_R=residual is not None, C_PAD=c_pad, BLOCK_R=block_r,
                                                    num_warps=4)
    return dx


def add_bias(a, b, bias):
    """a + b + bias for a, b (n, s, c) contiguous, bias (c,)."""
    y = torch.empty_like(a)
    total = a.numel()
    _add_bias[(triton.cdiv(total, _FLAT),)](a, b, bias, y, total, a.shape[-1], BLOCK=_FLAT, I64=_wide(a),
                                            num_warps=4)
    return y


def geglu_fwd(h):
    """h (..., 2I) contiguous -> (..., I)."""
    inner = h.shape[-1] // 2
    y = h.new_empty(*h.shape[:-1], inner)
    total = y.numel()
    _geglu_fwd[(triton.cdiv(total, _FLAT),)](h, y, total, inner, BLOCK=_FLAT, I64=_wide(h), num_warps=4)
    return y


def geglu_bwd(g, h):
    inner = h.shape[-1] // 2
    dh = torch.empty_like(h)
    total = g.numel()
    _geglu_bwd[(triton.cdiv(total, _FLAT),)](h, g, dh, total, inner, BLOCK=_FLAT, I64=_wide(h), num_warps=4)
    return dh

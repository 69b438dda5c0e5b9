"""Triton kernels for fused.py: GroupNorm (+ SiLU) on channels-last activations, LayerNorm and GEGLU's gate, forward
and backward (frozen weights: the backward gives ∂L/∂x only).

What to read: fused.py (the same math in plain PyTorch, `norm_forward`, `norm_backward`, `geglu_forward`,
`geglu_backward`: the reference these kernels are tested against, tests/test_fused.py); results/perf-notes.md.

Official implementation: none (diffusers and the official LVD code run nn.GroupNorm, F.silu, nn.LayerNorm and
GEGLU eagerly, each a separate pass over memory). Imported only where Triton is (fused.available()); on the CPU the
tests run these kernels in Triton's interpreter (TRITON_INTERPRET=1).

Layout: a channels-last (n, c, *s) activation is x (n, s, c) in memory, channels contiguous. GroupNorm's statistics
are two-level: a program reads BLOCK_S rows × all channels (coalesced) and writes, per group, its chunk's mean and
sum of squared deviations (M2); `group_stats` merges the chunks exactly (Chan et al.'s parallel variance) in fp32.
The apply kernels are flat elementwise passes with per-(n, c) scale and shift vectors, so the broadcast add (the
resnet's time embedding) and the affine parameters fold into them. Everything is computed in fp32 and rounded once.

Glossary: n (samples), s (positions per sample), c (channels), G (groups, a power of 2), CG (channels per group),
K (row chunks per sample), R (LayerNorm / GEGLU rows), I (GEGLU inner width).
"""
import torch
import triton
import triton.language as tl

_TILE = 8192  # elements per program in the reduction kernels
_FLAT = 2048  # elements per program in the elementwise kernels
_PROGRAMS = 1024  # about this many programs in a GroupNorm reduction grid (the H200 has 132 SMs)
_BLOCK_K = 64  # chunks merged at a time


@triton.jit
def _tile(ptr, n, r0, S, C, CG, G: tl.constexpr, CG_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Rows [r0, r0 + BLOCK_S) of sample n as a (BLOCK_S, G, CG_PAD) fp32 tile (zeros outside), and its mask."""
    rows = r0 + tl.arange(0, BLOCK_S)
    j = tl.arange(0, CG_PAD)
    ch = tl.arange(0, G)[:, None] * CG + j[None, :]  # (G, CG_PAD) channel index
    mask = (rows[:, None, None] < S) & (j[None, None, :] < CG)
    x = tl.load(ptr + n.to(tl.int64) * S * C + rows[:, None, None] * C + ch[None, :, :], mask=mask, other=0.0)
    return x.to(tl.float32), mask


@triton.jit
def _per_channel(ptr, n, C, CG, G: tl.constexpr, CG_PAD: tl.constexpr):
    """A per-(n, c) (or, with n = 0, per-c) vector as a (G, CG_PAD) fp32 tile."""
    j = tl.arange(0, CG_PAD)
    ch = tl.arange(0, G)[:, None] * CG + j[None, :]
    return tl.load(ptr + n * C + ch, mask=j[None, :] < CG, other=0.0).to(tl.float32)


@triton.jit
def _store_per_channel(ptr, v, n, C, CG, G: tl.constexpr, CG_PAD: tl.constexpr):
    j = tl.arange(0, CG_PAD)
    tl.store(ptr + n * C + tl.arange(0, G)[:, None] * CG + j[None, :], v, mask=j[None, :] < CG)


@triton.jit
def _silu_grad(g, z):
    """∂L/∂z from g = ∂L/∂SiLU(z): SiLU'(z) = σ(z)·(1 + z·(1 − σ(z)))."""
    sig = tl.sigmoid(z)
    return g * sig * (1 + z * (1 - sig))


@triton.jit
def _flat(total, SC, C, BLOCK: tl.constexpr):
    """This program's BLOCK flat indices o into an (n, s, c) tensor, their mask, and their per-(n, c) index."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return o, o < total, (o // SC) * C + o % C


@triton.jit
def _rows(R, C, C_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's BLOCK_R rows of an (R, C) tensor: rows, columns, column mask, tile mask, tile offsets."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, C_PAD)
    cm = cols < C
    return rows, cols, cm, (rows[:, None] < R) & cm[None, :], rows[:, None].to(tl.int64) * C + cols[None, :]


@triton.jit
def _chunk_stats(x_ptr, add_ptr, mean_ptr, m2_ptr, S, C, CG, K, ITERS, HAS_ADD: tl.constexpr, G: tl.constexpr,
                 CG_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (n, k): ITERS blocks of BLOCK_S rows of sample n, merged one by one (Chan) -> per group the
    chunk's mean and M2."""
    n, k = tl.program_id(0), tl.program_id(1)
    count = tl.zeros([G], dtype=tl.float32)
    mean = tl.zeros([G], dtype=tl.float32)
    m2 = tl.zeros([G], dtype=tl.float32)
    for it in range(ITERS):
        r0 = (k * ITERS + it) * BLOCK_S
        x, mask = _tile(x_ptr, n, r0, S, C, CG, G, CG_PAD, BLOCK_S)
        if HAS_ADD:
            x = tl.where(mask, x + _per_channel(add_ptr, n, C, CG, G, CG_PAD)[None], 0.0)
        nb = (tl.minimum(tl.maximum(S - r0, 0), BLOCK_S) * CG).to(tl.float32)
        mb = tl.sum(tl.sum(x, axis=2), axis=0) / tl.maximum(nb, 1.0)  # (G,)
        d = tl.where(mask, x - mb[None, :, None], 0.0)
        total = count + nb
        frac = tl.where(total > 0, nb / tl.maximum(total, 1.0), 0.0)
        delta = mb - mean
        mean = mean + delta * frac
        m2 = m2 + tl.sum(tl.sum(d * d, axis=2), axis=0) + delta * delta * count * frac
        count = total
    out = (n * K + k) * G + tl.arange(0, G)
    tl.store(mean_ptr + out, mean)
    tl.store(m2_ptr + out, m2)


@triton.jit
def _group_affine(mean_k_ptr, m2_k_ptr, w_ptr, b_ptr, add_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, S, C, CG,
                  K, ROWS, eps, HAS_ADD: tl.constexpr, G: tl.constexpr, CG_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program n: merge the K chunks (each ROWS rows) exactly -> mean, rstd (n, G), and per (n, c) the scale
    and shift with z = x·scale + shift = w·((x + add) − mean)·rstd + b."""
    n = tl.program_id(0)
    g = tl.arange(0, G)
    total = (S * CG).to(tl.float32)
    acc = tl.zeros([G], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        cnt = (tl.minimum(tl.maximum(S - kk * ROWS, 0), ROWS) * CG).to(tl.float32)
        m = tl.load(mean_k_ptr + (n * K + kk)[:, None] * G + g[None, :], mask=(kk < K)[:, None], other=0.0)
        acc += tl.sum(cnt[:, None] * m, axis=0)
    mean = acc / total
    acc = tl.zeros([G], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        cnt = (tl.minimum(tl.maximum(S - kk * ROWS, 0), ROWS) * CG).to(tl.float32)
        offs = (n * K + kk)[:, None] * G + g[None, :]
        m = tl.load(mean_k_ptr + offs, mask=(kk < K)[:, None], other=0.0)
        q = tl.load(m2_k_ptr + offs, mask=(kk < K)[:, None], other=0.0)
        acc += tl.sum(q + cnt[:, None] * (m - mean[None, :]) * (m - mean[None, :]), axis=0)
    rstd = 1 / tl.sqrt(acc / total + eps)
    tl.store(mean_ptr + n * G + g, mean)
    tl.store(rstd_ptr + n * G + g, rstd)
    scale = rstd[:, None] * _per_channel(w_ptr, 0, C, CG, G, CG_PAD)
    shift = _per_channel(b_ptr, 0, C, CG, G, CG_PAD) - mean[:, None] * scale
    if HAS_ADD:
        shift += _per_channel(add_ptr, n, C, CG, G, CG_PAD) * scale
    _store_per_channel(scale_ptr, scale, n, C, CG, G, CG_PAD)
    _store_per_channel(shift_ptr, shift, n, C, CG, G, CG_PAD)


@triton.jit
def _backward_vectors(mean_ptr, rstd_ptr, w_ptr, b_ptr, add_ptr, n, C, CG, HAS_ADD: tl.constexpr, G: tl.constexpr,
                      CG_PAD: tl.constexpr):
    """Per channel of sample n (G, CG_PAD): r, q with x̂ = x·r + q; scale, shift with z = x·scale + shift; w."""
    r = tl.load(rstd_ptr + n * G + tl.arange(0, G))[:, None] + tl.zeros([G, CG_PAD], dtype=tl.float32)
    mean = tl.load(mean_ptr + n * G + tl.arange(0, G))[:, None]
    q = -mean * r
    if HAS_ADD:
        q += _per_channel(add_ptr, n, C, CG, G, CG_PAD) * r
    w = _per_channel(w_ptr, 0, C, CG, G, CG_PAD)
    return r, q, r * w, q * w + _per_channel(b_ptr, 0, C, CG, G, CG_PAD), w


@triton.jit
def _chunk_grad_sums(x_ptr, g_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, add_ptr, s1_ptr, s2_ptr, S, C, CG, K, ITERS,
                     HAS_ADD: tl.constexpr, SILU: tl.constexpr, G: tl.constexpr, CG_PAD: tl.constexpr,
                     BLOCK_S: tl.constexpr):
    """Program (n, k): per group, Σ ĝ and Σ ĝ·x̂ over its ITERS blocks, ĝ = w·∂L/∂z."""
    n, k = tl.program_id(0), tl.program_id(1)
    r, q, scale, shift, w = _backward_vectors(mean_ptr, rstd_ptr, w_ptr, b_ptr, add_ptr, n, C, CG, HAS_ADD, G,
                                              CG_PAD)
    s1 = tl.zeros([G], dtype=tl.float32)
    s2 = tl.zeros([G], dtype=tl.float32)
    for it in range(ITERS):
        r0 = (k * ITERS + it) * BLOCK_S
        x, mask = _tile(x_ptr, n, r0, S, C, CG, G, CG_PAD, BLOCK_S)
        gz, _ = _tile(g_ptr, n, r0, S, C, CG, G, CG_PAD, BLOCK_S)
        if SILU:
            gz = _silu_grad(gz, x * scale[None] + shift[None])
        ghat = gz * w[None]  # zero outside the mask (gz is)
        xhat = x * r[None] + q[None]
        s1 += tl.sum(tl.sum(ghat, axis=2), axis=0)
        s2 += tl.sum(tl.sum(ghat * xhat, axis=2), axis=0)
    out = (n * K + k) * G + tl.arange(0, G)
    tl.store(s1_ptr + out, s1)
    tl.store(s2_ptr + out, s2)


@triton.jit
def _grad_coefficients(s1_ptr, s2_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, c3_ptr,
                       c4_ptr, S, C, CG, K, HAS_ADD: tl.constexpr, G: tl.constexpr, CG_PAD: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """Program n: m1 = mean(ĝ), m2 = mean(ĝ·x̂) per group; ∂L/∂x = r·(ĝ − m1 − x̂·m2) = ∂L/∂z·scale + x·c3 + c4."""
    n = tl.program_id(0)
    g = tl.arange(0, G)
    a1 = tl.zeros([G], dtype=tl.float32)
    a2 = tl.zeros([G], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        offs = (n * K + kk)[:, None] * G + g[None, :]
        a1 += tl.sum(tl.load(s1_ptr + offs, mask=(kk < K)[:, None], other=0.0), axis=0)
        a2 += tl.sum(tl.load(s2_ptr + offs, mask=(kk < K)[:, None], other=0.0), axis=0)
    total = (S * CG).to(tl.float32)
    m1, m2 = (a1 / total)[:, None], (a2 / total)[:, None]
    r, q, scale, shift, w = _backward_vectors(mean_ptr, rstd_ptr, w_ptr, b_ptr, add_ptr, n, C, CG, HAS_ADD, G,
                                              CG_PAD)
    _store_per_channel(scale_ptr, scale, n, C, CG, G, CG_PAD)
    _store_per_channel(shift_ptr, shift, n, C, CG, G, CG_PAD)
    _store_per_channel(c3_ptr, -r * r * m2, n, C, CG, G, CG_PAD)
    _store_per_channel(c4_ptr, -r * (m1 + q * m2), n, C, CG, G, CG_PAD)


@triton.jit
def _scale_shift(x_ptr, y_ptr, scale_ptr, shift_ptr, total, SC, C, SILU: tl.constexpr, BLOCK: tl.constexpr):
    """y = [SiLU](x·scale + shift), scale and shift per (n, c)."""
    o, m, vec = _flat(total, SC, C, BLOCK)
    z = tl.load(x_ptr + o, mask=m, other=0.0).to(tl.float32) * tl.load(scale_ptr + vec, mask=m, other=0.0) \
        + tl.load(shift_ptr + vec, mask=m, other=0.0)
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(y_ptr + o, z.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _norm_grad(x_ptr, g_ptr, dx_ptr, scale_ptr, shift_ptr, c3_ptr, c4_ptr, total, SC, C, SILU: tl.constexpr,
               BLOCK: tl.constexpr):
    """∂L/∂x = ∂L/∂z·scale + x·c3 + c4 (the GroupNorm input gradient, rearranged per (n, c))."""
    o, m, vec = _flat(total, SC, C, BLOCK)
    x = tl.load(x_ptr + o, mask=m, other=0.0).to(tl.float32)
    gz = tl.load(g_ptr + o, mask=m, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + vec, mask=m, other=0.0)
    if SILU:
        gz = _silu_grad(gz, x * scale + tl.load(shift_ptr + vec, mask=m, other=0.0))
    dx = gz * scale + x * tl.load(c3_ptr + vec, mask=m, other=0.0) + tl.load(c4_ptr + vec, mask=m, other=0.0)
    tl.store(dx_ptr + o, dx.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _layer_norm_fwd(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, R, C, eps, C_PAD: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    rows, cols, cm, mask, offs = _rows(R, C, C_PAD, BLOCK_R)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    y = d * rstd[:, None] * tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :] \
        + tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=rows < R)
    tl.store(rstd_ptr + rows, rstd, mask=rows < R)


@triton.jit
def _layer_norm_bwd(x_ptr, g_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, R, C, C_PAD: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    rows, cols, cm, mask, offs = _rows(R, C, C_PAD, BLOCK_R)
    rstd = tl.load(rstd_ptr + rows, mask=rows < R, other=0.0)[:, None]
    xhat = tl.where(mask, (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                           - tl.load(mean_ptr + rows, mask=rows < R, other=0.0)[:, None]) * rstd, 0.0)
    ghat = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) \
        * tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    m1 = tl.sum(ghat, axis=1)[:, None] / C
    m2 = tl.sum(ghat * xhat, axis=1)[:, None] / C
    tl.store(dx_ptr + offs, (rstd * (ghat - m1 - xhat * m2)).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_halves(h_ptr, total, I, BLOCK: tl.constexpr):
    """This program's BLOCK flat (R, I) indices o, their mask, h's value-half index, and the value and gate."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < total
    src = (o // I) * 2 * I + o % I  # (R, I) index -> the value half of row r of h (R, 2I)
    value = tl.load(h_ptr + src, mask=m, other=0.0).to(tl.float32)
    return o, m, src, value, tl.load(h_ptr + src + I, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _geglu_fwd(h_ptr, y_ptr, total, I, BLOCK: tl.constexpr):
    o, m, _, value, gate = _geglu_halves(h_ptr, total, I, BLOCK)
    y = value * 0.5 * gate * (1 + tl.erf(gate * 0.7071067811865476))
    tl.store(y_ptr + o, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _geglu_bwd(h_ptr, g_ptr, dh_ptr, total, I, BLOCK: tl.constexpr):
    o, m, src, value, gate = _geglu_halves(h_ptr, total, I, BLOCK)
    g = tl.load(g_ptr + o, mask=m, other=0.0).to(tl.float32)
    cdf = 0.5 * (1 + tl.erf(gate * 0.7071067811865476))
    pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327  # 1/√(2π)
    tl.store(dh_ptr + src, (g * gate * cdf).to(dh_ptr.dtype.element_ty), mask=m)
    tl.store(dh_ptr + src + I, (g * value * (cdf + gate * pdf)).to(dh_ptr.dtype.element_ty), mask=m)


# -----------------------------------------------------------------------------
# launchers: the same signatures and results as fused.norm_forward / norm_backward / geglu_forward / geglu_backward

def _chunks(n, s, groups, cg):
    """(CG_PAD, BLOCK_S, ITERS, K): tiles of about _TILE elements; each of the K programs per sample reads ITERS
    of them, so that the grid has about _PROGRAMS programs."""
    cg_pad = triton.next_power_of_2(cg)
    block_s = max(1, _TILE // (groups * cg_pad))
    blocks = triton.cdiv(s, block_s)
    iters = triton.cdiv(blocks, min(blocks, max(1, _PROGRAMS // n)))
    return cg_pad, block_s, iters, triton.cdiv(blocks, iters)


def group_norm_fwd(x, weight, bias, add, groups, eps, silu):
    """x (n, s, c) contiguous, add (n, 1, c) or None -> (y, mean (n, G), rstd (n, G))."""
    n, s, c = x.shape
    cg = c // groups
    cg_pad, block_s, iters, k = _chunks(n, s, groups, cg)
    f32 = dict(device=x.device, dtype=torch.float32)
    mean_k, m2_k = torch.empty(n, k, groups, **f32), torch.empty(n, k, groups, **f32)
    add = x if add is None else add.reshape(n, c).contiguous()  # x: an unused pointer when HAS_ADD is False
    const = dict(HAS_ADD=add is not x, G=groups, CG_PAD=cg_pad)
    _chunk_stats[(n, k)](x, add, mean_k, m2_k, s, c, cg, k, iters, BLOCK_S=block_s, num_warps=8, **const)
    mean, rstd = torch.empty(n, groups, **f32), torch.empty(n, groups, **f32)
    scale, shift = torch.empty(n, c, **f32), torch.empty(n, c, **f32)
    _group_affine[(n,)](mean_k, m2_k, weight, bias, add, mean, rstd, scale, shift, s, c, cg, k, iters * block_s, eps,
                        BLOCK_K=_BLOCK_K, num_warps=4, **const)
    y = torch.empty_like(x)
    total = x.numel()
    _scale_shift[(triton.cdiv(total, _FLAT),)](x, y, scale, shift, total, s * c, c, SILU=silu, BLOCK=_FLAT,
                                               num_warps=4)
    return y, mean, rstd


def group_norm_bwd(g, x, weight, bias, add, mean, rstd, groups, silu):
    """∂L/∂x of group_norm_fwd from g = ∂L/∂y (n, s, c) contiguous."""
    n, s, c = x.shape
    cg = c // groups
    cg_pad, block_s, iters, k = _chunks(n, s, groups, cg)
    f32 = dict(device=x.device, dtype=torch.float32)
    add = x if add is None else add.reshape(n, c).contiguous()
    const = dict(HAS_ADD=add is not x, G=groups, CG_PAD=cg_pad)
    s1_k, s2_k = torch.empty(n, k, groups, **f32), torch.empty(n, k, groups, **f32)
    _chunk_grad_sums[(n, k)](x, g, mean, rstd, weight, bias, add, s1_k, s2_k, s, c, cg, k, iters, SILU=silu,
                             BLOCK_S=block_s, num_warps=8, **const)
    scale, shift, c3, c4 = (torch.empty(n, c, **f32) for _ in range(4))
    _grad_coefficients[(n,)](s1_k, s2_k, mean, rstd, weight, bias, add, scale, shift, c3, c4, s, c, cg, k,
                             BLOCK_K=_BLOCK_K, num_warps=4, **const)
    dx = torch.empty_like(x)
    total = x.numel()
    _norm_grad[(triton.cdiv(total, _FLAT),)](x, g, dx, scale, shift, c3, c4, total, s * c, c, SILU=silu,
                                             BLOCK=_FLAT, num_warps=4)
    return dx


def _ln_blocks(c):
    c_pad = triton.next_power_of_2(c)
    return c_pad, max(1, _TILE // 2 // c_pad)


def layer_norm_fwd(x, weight, bias, eps):
    """x (1, R, c) contiguous -> (y, mean (R,), rstd (R,))."""
    rows, c = x.shape[1], x.shape[2]
    c_pad, block_r = _ln_blocks(c)
    y = torch.empty_like(x)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _layer_norm_fwd[(triton.cdiv(rows, block_r),)](x, y, weight, bias, mean, rstd, rows, c, eps, C_PAD=c_pad,
                                                    BLOCK_R=block_r, num_warps=4)
    return y, mean, rstd


def layer_norm_bwd(g, x, weight, bias, mean, rstd):
    rows, c = x.shape[1], x.shape[2]
    c_pad, block_r = _ln_blocks(c)
    dx = torch.empty_like(x)
    _layer_norm_bwd[(triton.cdiv(rows, block_r),)](x, g, dx, weight, mean, rstd, rows, c, C_PAD=c_pad,
                                                    BLOCK_R=block_r, num_warps=4)
    return dx


def geglu_fwd(h):
    """h (..., 2I) contiguous -> (..., I)."""
    inner = h.shape[-1] // 2
    y = h.new_empty(*h.shape[:-1], inner)
    total = y.numel()
    _geglu_fwd[(triton.cdiv(total, _FLAT),)](h, y, total, inner, BLOCK=_FLAT, num_warps=4)
    return y


def geglu_bwd(g, h):
    inner = h.shape[-1] // 2
    dh = torch.empty_like(h)
    total = g.numel()
    _geglu_bwd[(triton.cdiv(total, _FLAT),)](h, g, dh, total, inner, BLOCK=_FLAT, num_warps=4)
    return dh

"""Triton kernels for fused.py: GroupNorm (+ SiLU) on channels-last activations, forward and backward (frozen weights:
the backward gives ∂L/∂x only), and the index helpers the row-wise kernels (kernels_rows.py) share.

What to read: fused.py (the same math in plain PyTorch, `norm_forward`, `norm_backward`: the reference these
kernels are tested against, tests/test_fused.py); kernels_rows.py (LayerNorm, GEGLU, the bias-folding add);
results/perf-notes.md.

Official implementation: none (diffusers and the official LVD code run nn.GroupNorm and F.silu eagerly, each a
separate pass over memory). Imported only where Triton is (fused.available()); on the CPU the
tests run these kernels in Triton's interpreter (TRITON_INTERPRET=1).

Layout: a channels-last (n, c, *s) activation is x (n, s, c) in memory, channels contiguous. GroupNorm's statistics
are two-level, as `fused.group_stats`: a program reads tiles of BLOCK_S rows × BLOCK_C channels (coalesced,
vectorised, no padding of the 10-channel groups) and writes, per channel, its chunk's mean and sum of squared
deviations (M2), each lane running Welford's update; one program per (sample, group) then merges the chunks and
the group's channels exactly (Chan et al.'s parallel variance) in fp32.
Sizes that only bound loops and row masks (S, K, ITERS) and the per-group kernels' sizes are not specialised on
(`do_not_specialize`): each specialisation is one more compilation on a first run (fewer variants, same speed).
The apply kernels are flat elementwise passes with per-(n, c) scale and shift vectors, so the broadcast add (the
resnet's time embedding) and the affine parameters fold into them. Everything is computed in fp32 and rounded once.

Glossary: n (samples), s (positions per sample), c (channels), G (groups), CG (channels per group),
K (row chunks per sample).
"""
import torch
import triton
import triton.language as tl

_FLAT = 2048  # elements per program in the elementwise kernels
_BLOCK_S, _BLOCK_C = 32, 64  # the GroupNorm statistics' tiles: rows × channels (128 contiguous bytes in fp16)
_PROGRAMS = 1024  # about this many programs in a GroupNorm statistics grid (the H200 has 132 SMs)
_STATS_WARPS = 4  # warps per GroupNorm statistics program
_GRAD_BLOCK_S, _GRAD_PROGRAMS, _GRAD_WARPS = 16, 1024, 2  # the backward gradient sums (swept 2026-12-03, results/perf-notes.md)
_MERGE = 2048  # partials per tile in the merge kernels


@triton.jit
def _group_channels(g, CG, CG_PAD: tl.constexpr):
    """Group g's channel indices (CG_PAD,) and their mask."""
    j = tl.arange(0, CG_PAD)
    return g * CG + j, j < CG


@triton.jit
def _silu_grad(g, z):
    """∂L/∂z from g = ∂L/∂SiLU(z): SiLU'(z) = σ(z)·(1 + z·(1 − σ(z)))."""
    sig = tl.sigmoid(z)
    return g * sig * (1 + z * (1 - sig))


@triton.jit
def _offsets(BLOCK: tl.constexpr, I64: tl.constexpr):
    """This program's BLOCK flat indices: int32 where every offset of the tensors fits (`_wide`: the index math,
    a division and a remainder per element in the GroupNorm's kernels, is then cheaper), else int64."""
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    return pid * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _flat(total, SC, C, BLOCK: tl.constexpr, I64: tl.constexpr):
    """This program's BLOCK flat indices o into an (n, s, c) tensor, their mask, and their per-(n, c) index."""
    o = _offsets(BLOCK, I64)
    return o, o < total, (o // SC) * C + o % C


@triton.jit
def _rows(R, C, C_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's BLOCK_R rows of an (R, C) tensor: rows, columns, column mask, tile mask, tile offsets."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, C_PAD)
    cm = cols < C
    return rows, cols, cm, (rows[:, None] < R) & cm[None, :], rows[:, None].to(tl.int64) * C + cols[None, :]


@triton.jit
def _lanes(x_ptr, n, k, S, C, ITERS, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (n, k, cb)'s columns, their mask, and the row-block iterator's pieces: (cols, cm, base, r0s)."""
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C, x_ptr + n.to(tl.int64) * S * C, k * ITERS * BLOCK_S


@triton.jit
def _load_rows(base, r0, S, C, cols, cm, BLOCK_S: tl.constexpr):
    """Rows [r0, r0 + BLOCK_S) × cols of one sample as an fp32 (BLOCK_S, BLOCK_C) tile (zeros outside), and the
    rows' validity (BLOCK_S, 1)."""
    rows = r0 + tl.arange(0, BLOCK_S)
    valid = (rows < S)[:, None]
    x = tl.load(base + rows[:, None].to(tl.int64) * C + cols[None, :], mask=valid & cm[None, :], other=0.0)
    return x.to(tl.float32), valid


@triton.jit(do_not_specialize=["S", "K", "ITERS"])
def _chunk_stats(x_ptr, mean_ptr, m2_ptr, S, C, K, ITERS, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (n, k, cb): rows [k·ITERS·BLOCK_S, (k + 1)·ITERS·BLOCK_S) of sample n, channels
    [cb·BLOCK_C, (cb + 1)·BLOCK_C) -> per channel the chunk's mean and M2. Each lane (row slot, channel) runs
    Welford's update over the ITERS row blocks (no cross-thread work in the loop); the lanes are merged once at
    the end (Chan, by their counts)."""
    n, k = tl.program_id(0), tl.program_id(1)
    cols, cm, base, r0 = _lanes(x_ptr, n, k, S, C, ITERS, BLOCK_S, BLOCK_C)
    cnt = tl.zeros([BLOCK_S, 1], dtype=tl.float32)
    mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for it in range(ITERS):
        x, valid = _load_rows(base, r0 + it * BLOCK_S, S, C, cols, cm, BLOCK_S)
        cnt += valid.to(tl.float32)
        delta = x - mean
        mean += tl.where(valid, delta / tl.maximum(cnt, 1.0), 0.0)
        m2 += tl.where(valid, delta * (x - mean), 0.0)
    total = tl.maximum(tl.sum(cnt, axis=0), 1.0)  # (1,)
    chunk_mean = tl.sum(cnt * mean, axis=0) / total  # (BLOCK_C,)
    d = mean - chunk_mean[None, :]
    out = (n * K + k) * C + cols
    tl.store(mean_ptr + out, chunk_mean, mask=cm)
    tl.store(m2_ptr + out, tl.sum(m2 + cnt * d * d, axis=0), mask=cm)


@triton.jit
def _partials(ptr, n, kk, K, C, ch, cm):
    """Per-(n, k, c) partials of chunks kk (BLOCK_K,) and channels ch (CG_PAD,) as a fp32 tile, and its mask."""
    mask = (kk < K)[:, None] & cm[None, :]
    return tl.load(ptr + (n * K + kk)[:, None] * C + ch[None, :], mask=mask, other=0.0), mask


@triton.jit(do_not_specialize=["S", "C", "CG", "K", "ROWS", "AN"])
def _group_affine(mean_k_ptr, m2_k_ptr, w_ptr, b_ptr, add_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, S, C, CG,
                  K, ROWS, AN, eps, HAS_ADD: tl.constexpr, G: tl.constexpr, CG_PAD: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Program (n, g): merge the K chunks (each ROWS rows) of group g's CG channels exactly (Chan) -> its mean and
    rstd, and per channel the scale and shift with z = x·scale + shift = w·((x + add) − mean)·rstd + b."""
    n, g = tl.program_id(0), tl.program_id(1)
    ch, cm = _group_channels(g, CG, CG_PAD)
    a = tl.zeros([CG_PAD], dtype=tl.float32)
    if HAS_ADD:  # the add shifts each channel's mean
        a += tl.load(add_ptr + n * AN + ch, mask=cm, other=0.0).to(tl.float32)
    total = (S * CG).to(tl.float32)
    acc = tl.zeros([CG_PAD], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        cnt = (tl.minimum(tl.maximum(S - kk * ROWS, 0), ROWS)).to(tl.float32)[:, None]
        m, mask = _partials(mean_k_ptr, n, kk, K, C, ch, cm)
        acc += tl.sum(tl.where(mask, cnt * (m + a[None, :]), 0.0), axis=0)
    mean = tl.sum(acc, axis=0) / total
    acc = tl.zeros([CG_PAD], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        cnt = (tl.minimum(tl.maximum(S - kk * ROWS, 0), ROWS)).to(tl.float32)[:, None]
        m, mask = _partials(mean_k_ptr, n, kk, K, C, ch, cm)
        q, _ = _partials(m2_k_ptr, n, kk, K, C, ch, cm)
        d = m + a[None, :] - mean
        acc += tl.sum(tl.where(mask, q + cnt * d * d, 0.0), axis=0)
    rstd = 1 / tl.sqrt(tl.sum(acc, axis=0) / total + eps)
    tl.store(mean_ptr + n * G + g, mean)
    tl.store(rstd_ptr + n * G + g, rstd)
    scale = rstd * tl.load(w_ptr + ch, mask=cm, other=0.0).to(tl.float32)
    shift = tl.load(b_ptr + ch, mask=cm, other=0.0).to(tl.float32) + (a - mean) * scale
    tl.store(scale_ptr + n * C + ch, scale, mask=cm)
    tl.store(shift_ptr + n * C + ch, shift, mask=cm)


@triton.jit
def _channel_vectors(mean_ptr, rstd_ptr, w_ptr, b_ptr, add_ptr, n, cols, cm, AN, CG, G: tl.constexpr,
                     HAS_ADD: tl.constexpr):
    """`_backward_vectors` for the channels cols of sample n, as (1, BLOCK_C) rows: r, q, scale, shift, w."""
    grp = n * G + cols // CG
    r = tl.load(rstd_ptr + grp, mask=cm, other=0.0)
    q = -tl.load(mean_ptr + grp, mask=cm, other=0.0) * r
    if HAS_ADD:
        q += tl.load(add_ptr + n * AN + cols, mask=cm, other=0.0).to(tl.float32) * r
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    shift = q * w + tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    return r[None, :], q[None, :], (r * w)[None, :], shift[None, :], w[None, :]


@triton.jit(do_not_specialize=["S", "CG", "K", "ITERS", "AN"])
def _chunk_grad_sums(x_ptr, g_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, add_ptr, s1_ptr, s2_ptr, S, C, CG, K, ITERS,
                     AN, HAS_ADD: tl.constexpr, SILU: tl.constexpr, G: tl.constexpr, BLOCK_S: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """Program (n, k, cb), the tiles of `_chunk_stats`: per channel Σ ĝ and Σ ĝ·x̂ over the chunk, ĝ = w·∂L/∂z
    (summed per lane in the loop, over the lanes at the end)."""
    n, k = tl.program_id(0), tl.program_id(1)
    cols, cm, base, r0 = _lanes(x_ptr, n, k, S, C, ITERS, BLOCK_S, BLOCK_C)
    r, q, scale, shift, w = _channel_vectors(mean_ptr, rstd_ptr, w_ptr, b_ptr, add_ptr, n, cols, cm, AN, CG, G,
                                             HAS_ADD)
    gbase = g_ptr + n.to(tl.int64) * S * C
    s1 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for it in range(ITERS):
        x, valid = _load_rows(base, r0 + it * BLOCK_S, S, C, cols, cm, BLOCK_S)
        gz, _ = _load_rows(gbase, r0 + it * BLOCK_S, S, C, cols, cm, BLOCK_S)
        if SILU:
            gz = _silu_grad(gz, x * scale + shift)
        ghat = gz * w  # zero outside the mask (gz is)
        s1 += ghat
        s2 += ghat * (x * r + q)
    out = (n * K + k) * C + cols
    tl.store(s1_ptr + out, tl.sum(s1, axis=0), mask=cm)
    tl.store(s2_ptr + out, tl.sum(s2, axis=0), mask=cm)


@triton.jit(do_not_specialize=["S", "C", "CG", "K", "AN"])
def _grad_coefficients(s1_ptr, s2_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, add_ptr, scale_ptr, shift_ptr, c3_ptr,
                       c4_ptr, S, C, CG, K, AN, HAS_ADD: tl.constexpr, G: tl.constexpr, CG_PAD: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """Program (n, g): m1 = mean(ĝ), m2 = mean(ĝ·x̂) over group g; per channel, ∂L/∂x = r·(ĝ − m1 − x̂·m2)
    = ∂L/∂z·scale + x·c3 + c4 (x̂ = x·r + q, z = x·scale + shift)."""
    n, g = tl.program_id(0), tl.program_id(1)
    ch, cm = _group_channels(g, CG, CG_PAD)
    a1 = tl.zeros([CG_PAD], dtype=tl.float32)
    a2 = tl.zeros([CG_PAD], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a1 += tl.sum(_partials(s1_ptr, n, kk, K, C, ch, cm)[0], axis=0)
        a2 += tl.sum(_partials(s2_ptr, n, kk, K, C, ch, cm)[0], axis=0)
    total = (S * CG).to(tl.float32)
    m1, m2 = tl.sum(a1, axis=0) / total, tl.sum(a2, axis=0) / total
    r = tl.load(rstd_ptr + n * G + g)
    q = -tl.load(mean_ptr + n * G + g) * r + tl.zeros([CG_PAD], dtype=tl.float32)
    if HAS_ADD:
        q += tl.load(add_ptr + n * AN + ch, mask=cm, other=0.0).to(tl.float32) * r
    w = tl.load(w_ptr + ch, mask=cm, other=0.0).to(tl.float32)
    out = n * C + ch
    tl.store(scale_ptr + out, r * w, mask=cm)
    tl.store(shift_ptr + out, q * w + tl.load(b_ptr + ch, mask=cm, other=0.0).to(tl.float32), mask=cm)
    tl.store(c3_ptr + out, -r * r * m2 + tl.zeros([CG_PAD], dtype=tl.float32), mask=cm)
    tl.store(c4_ptr + out, -r * (m1 + q * m2), mask=cm)


@triton.jit
def _scale_shift(x_ptr, y_ptr, scale_ptr, shift_ptr, total, SC, C, SILU: tl.constexpr, BLOCK: tl.constexpr,
                 I64: tl.constexpr):
    """y = [SiLU](x·scale + shift), scale and shift per (n, c)."""
    o, m, vec = _flat(total, SC, C, BLOCK, I64)
    z = tl.load(x_ptr + o, mask=m, other=0.0).to(tl.float32) * tl.load(scale_ptr + vec, mask=m, other=0.0) \
        + tl.load(shift_ptr + vec, mask=m, other=0.0)
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(y_ptr + o, z.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _norm_grad(x_ptr, g_ptr, r_ptr, dx_ptr, scale_ptr, shift_ptr, c3_ptr, c4_ptr, total, SC, C, SILU: tl.constexpr,
               HAS_R: tl.constexpr, BLOCK: tl.constexpr, I64: tl.constexpr):
    """∂L/∂x = ∂L/∂z·scale + x·c3 + c4 (the GroupNorm input gradient, rearranged per (n, c)) [+ r, the gradient
    of a residual path that also reads x]."""
    o, m, vec = _flat(total, SC, C, BLOCK, I64)
    x = tl.load(x_ptr + o, mask=m, other=0.0).to(tl.float32)
    gz = tl.load(g_ptr + o, mask=m, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + vec, mask=m, other=0.0)
    if SILU:
        gz = _silu_grad(gz, x * scale + tl.load(shift_ptr + vec, mask=m, other=0.0))
    dx = gz * scale + x * tl.load(c3_ptr + vec, mask=m, other=0.0) + tl.load(c4_ptr + vec, mask=m, other=0.0)
    if HAS_R:
        dx += tl.load(r_ptr + o, mask=m, other=0.0).to(tl.float32)
    tl.store(dx_ptr + o, dx.to(dx_ptr.dtype.element_ty), mask=m)


# -----------------------------------------------------------------------------
# launchers: the same signatures and results as fused.norm_forward / norm_backward

def _wide(t):
    """True where a flat kernel over t needs int64 offsets (t, and its program-padded end, past 2³¹ − 1)."""
    return t.numel() + _FLAT >= 2 ** 31


def _chunks(n, s, c, groups, block_s, programs):
    """(BLOCK_C, BLOCK_S, ITERS, K, CG_PAD, BLOCK_K): the statistics kernels' grid is (n, K, c / BLOCK_C), each
    program ITERS tiles of block_s rows × BLOCK_C channels, about `programs` programs; the merge kernels' grid is
    (n, G), each program reading its group's (n, K, CG) partials in (BLOCK_K, CG_PAD) tiles."""
    block_c = min(_BLOCK_C, triton.next_power_of_2(c))
    blocks = triton.cdiv(s, block_s)
    iters = triton.cdiv(blocks, min(blocks, max(1, programs // (n * triton.cdiv(c, block_c)))))
    k = triton.cdiv(blocks, iters)
    cg_pad = triton.next_power_of_2(c // groups)
    return block_c, block_s, iters, k, cg_pad, max(1, min(triton.next_power_of_2(k), _MERGE // cg_pad))


def _per_sample(add, x):
    """add (n, 1, c) or None -> (its (n, c) view with unit channel stride, the stride between samples: 0 for a
    bias expanded over the samples, which is then not copied), or (x, 0): an unused pointer (HAS_ADD False)."""
    if add is None:
        return x, 0
    a = add.reshape(add.shape[0], add.shape[-1])  # n 1 c -> n c, a view (also of an expanded bias)
    a = a if a.stride(-1) == 1 else a.contiguous()
    return a, a.stride(0)


def group_norm_fwd(x, weight, bias, add, groups, eps, silu):
    """x (n, s, c) contiguous, add (n, 1, c) or None -> (y, mean (n, G), rstd (n, G))."""
    n, s, c = x.shape
    block_c, block_s, iters, k, cg_pad, block_k = _chunks(n, s, c, groups, _BLOCK_S, _PROGRAMS)
    f32 = dict(device=x.device, dtype=torch.float32)
    mean_k, m2_k = torch.empty(n, k, c, **f32), torch.empty(n, k, c, **f32)
    _chunk_stats[(n, k, triton.cdiv(c, block_c))](x, mean_k, m2_k, s, c, k, iters, BLOCK_S=block_s,
                                                   BLOCK_C=block_c, num_warps=_STATS_WARPS)
    add, an = _per_sample(add, x)
    mean, rstd = torch.empty(n, groups, **f32), torch.empty(n, groups, **f32)
    scale, shift = torch.empty(n, c, **f32), torch.empty(n, c, **f32)
    _group_affine[(n, groups)](mean_k, m2_k, weight, bias, add, mean, rstd, scale, shift, s, c, c // groups, k,
                        iters * block_s, an, eps, HAS_ADD=add is not x, G=groups, CG_PAD=cg_pad, BLOCK_K=block_k,
                        num_warps=4)
    y = torch.empty_like(x)
    total = x.numel()
    _scale_shift[(triton.cdiv(total, _FLAT),)](x, y, scale, shift, total, s * c, c, SILU=silu, BLOCK=_FLAT,
                                               I64=_wide(x), num_warps=4)
    return y, mean, rstd


def group_norm_bwd(g, x, weight, bias, add, mean, rstd, groups, silu, residual=None):
    """∂L/∂x of group_norm_fwd from g = ∂L/∂y (n, s, c) contiguous, plus `residual` (n, s, c) where given."""
    n, s, c = x.shape
    cg = c // groups
    block_c, block_s, iters, k, cg_pad, block_k = _chunks(n, s, c, groups, _GRAD_BLOCK_S, _GRAD_PROGRAMS)
    f32 = dict(device=x.device, dtype=torch.float32)
    add, an = _per_sample(add, x)
    s1_k, s2_k = torch.empty(n, k, c, **f32), torch.empty(n, k, c, **f32)
    _chunk_grad_sums[(n, k, triton.cdiv(c, block_c))](x, g, mean, rstd, weight, bias, add, s1_k, s2_k, s, c, cg, k,
                                                       iters, an, HAS_ADD=add is not x, SILU=silu, G=groups,
                                                       BLOCK_S=block_s, BLOCK_C=block_c, num_warps=_GRAD_WARPS)
    scale, shift, c3, c4 = (torch.empty(n, c, **f32) for _ in range(4))
    _grad_coefficients[(n, groups)](s1_k, s2_k, mean, rstd, weight, bias, add, scale, shift, c3, c4, s, c, cg, k, an,
                             HAS_ADD=add is not x, G=groups, CG_PAD=cg_pad, BLOCK_K=block_k, num_warps=4)
    dx = torch.empty_like(x)
    total = x.numel()
    _norm_grad[(triton.cdiv(total, _FLAT),)](x, g, g if residual is None else residual, dx, scale, shift, c3, c4,
                                             total, s * c, c, SILU=silu, HAS_R=residual is not None, BLOCK=_FLAT,
                                             I64=_wide(x), num_warps=4)
    return dx

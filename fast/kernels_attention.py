"""Triton kernels for the temporal transformer's attention: softmax(q·kᵀ/√e)·v over the f frames at each position,
forward and backward, read in place from the channels-last token order (b, f, p, n·e).

What to read: `fused.frame_attention` (the same math through PyTorch SDPA, the reference these kernels are tested
against, tests/test_fused.py); modelscope-architecture.md §4.7 (the temporal transformer: tokens are the f frames at
one pixel); results/perf-notes.md (2026-12-02: why a kernel of our own).

Official implementation: diffusers' TransformerTemporalModel permutes the activations to (b h w) f c, a copy in
and one out, and runs SDPA, whose flash kernels tile the 16- or 24-long sequences to 64 or 128. Deliberate
differences: no permute (the kernel gathers each sequence's rows, stride p·n·e apart, 128 contiguous bytes each),
and several sequences share one tile: a program takes PB = BLOCK // f positions × f frames as one BLOCK-row tile of
one head and masks the score matrix to its diagonal blocks (a row attends only to the rows of its own position).
The backward recomputes the probabilities in the tile (no log-sum-exp kept, the output not read):
dS = P ∘ (dP − rowsum(P ∘ dP)), dP = dO·vᵀ; it writes dq, dk, dv as three tensors or, for the joined qkv product
the UNet makes, packed as one d(q|k|v) (no concatenation after). Products accumulate in fp32; P is rounded to the
input's dtype before P·v, as in flash attention.

Glossary: b (batch), f (frames), p (positions h·w), n (heads), e (head width), D = n·e, PB (positions per tile).
"""
import triton
import triton.language as tl

_BLOCK = 64  # rows per tile: 2 positions × 24 frames, or 4 × 16


@triton.jit
def _tile(P, F, PB: tl.constexpr, BLOCK: tl.constexpr, E: tl.constexpr):
    """Program (tile, head)'s rows r = pp·f + i (position p0 + pp, frame i): their token rows (b, f, p) of a
    (b, f, p, ·) tensor, the head's columns, the rows' validity, and pp (the block-diagonal mask's key)."""
    tiles = tl.cdiv(P, PB)
    bi, p0 = tl.program_id(0) // tiles, (tl.program_id(0) % tiles) * PB
    r = tl.arange(0, BLOCK)
    pp, i = r // F, r % F
    valid = (pp < PB) & (p0 + pp < P)
    token = (bi * F + i).to(tl.int64) * P + p0 + pp
    return token[:, None], tl.program_id(1) * E + tl.arange(0, E)[None, :], valid, pp


@triton.jit
def _probs(q, k, pp, valid, scale):
    """softmax(q·kᵀ·scale) over the keys of each row's own position, fp32 (BLOCK, BLOCK); invalid rows are 0."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    s = tl.where((pp[:, None] == pp[None, :]) & valid[None, :], s, float("-inf"))
    mx = tl.where(valid, tl.max(s, axis=1), 0.0)
    e = tl.exp(s - mx[:, None])
    return e / tl.where(valid, tl.sum(e, axis=1), 1.0)[:, None]


@triton.jit
def _frames_fwd(q_ptr, k_ptr, v_ptr, o_ptr, P, D, S, F, scale, PB: tl.constexpr, BLOCK: tl.constexpr,
                E: tl.constexpr):
    token, col, valid, pp = _tile(P, F, PB, BLOCK, E)
    m, offs = valid[:, None], token * S + col  # q, k, v rows S apart (3·D: views of one qkv product), o's D
    q = tl.load(q_ptr + offs, mask=m, other=0.0)
    k = tl.load(k_ptr + offs, mask=m, other=0.0)
    v = tl.load(v_ptr + offs, mask=m, other=0.0)
    p = _probs(q, k, pp, valid, scale)
    o = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    tl.store(o_ptr + token * D + col, o.to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _frames_bwd(q_ptr, k_ptr, v_ptr, g_ptr, dq_ptr, dk_ptr, dv_ptr, P, D, S, GS, F, scale, PB: tl.constexpr,
                BLOCK: tl.constexpr, E: tl.constexpr):
    token, col, valid, pp = _tile(P, F, PB, BLOCK, E)
    m, offs_in = valid[:, None], token * S + col
    q = tl.load(q_ptr + offs_in, mask=m, other=0.0)
    k = tl.load(k_ptr + offs_in, mask=m, other=0.0)
    v = tl.load(v_ptr + offs_in, mask=m, other=0.0)
    g = tl.load(g_ptr + token * D + col, mask=m, other=0.0)  # ∂L/∂o, (b, f, p, D) contiguous
    p = _probs(q, k, pp, valid, scale)
    dv = tl.dot(tl.trans(p.to(g.dtype)), g, input_precision="ieee")
    dp = tl.dot(g, tl.trans(v), input_precision="ieee")
    ds = p * (dp - tl.sum(p * dp, axis=1)[:, None]) * scale  # ∂L/∂(q·kᵀ)
    dq = tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
    offs = token * GS + col  # the gradients' rows GS apart: D (three tensors) or 3·D (one packed d(q|k|v))
    tl.store(dq_ptr + offs, dq.to(dq_ptr.dtype.element_ty), mask=m)
    tl.store(dk_ptr + offs, dk.to(dk_ptr.dtype.element_ty), mask=m)
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=m)


# -----------------------------------------------------------------------------
# launchers: the same signature and result as fused.frame_attention

def supports(f, e):
    """True where the kernels apply: a head width that is a power of 2 (16 or more), f frames within one tile."""
    return e >= 16 and e & (e - 1) == 0 and f <= _BLOCK


def rows_apart(q, k, v):
    """The row stride S where q, k, v (b, f, p, D) are laid out as the kernels read them (tokens S apart, each row's
    D contiguous; S = D: contiguous, 3·D: views of one qkv product), else None."""
    b, f, p, d = q.shape
    s = q.stride(2)
    ok = all(t.shape == q.shape and t.stride() == (f * p * s, p * s, s, 1) for t in (q, k, v))
    return s if ok and s >= d else None


def _grid(q, heads, block, warps, s):
    b, f, p, d = q.shape
    pb = block // f
    return (b * triton.cdiv(p, pb), heads), dict(P=p, D=d, S=s, F=f, scale=(d // heads) ** -0.5, PB=pb, BLOCK=block,
                                                  E=d // heads, num_warps=warps)


def frame_attention_fwd(q, k, v, heads, block=_BLOCK, warps=4):
    """q, k, v (b, f, p, n·e), laid out as `rows_apart` says -> o (b, f, p, n·e) contiguous: attention over f
    at each (b, p), per head."""
    grid, args = _grid(q, heads, block, warps, rows_apart(q, k, v))
    o = q.new_empty(q.shape)
    _frames_fwd[grid](q, k, v, o, **args)
    return o


def frame_attention_bwd(g, q, k, v, heads, block=_BLOCK, warps=4, packed=False):
    """(∂L/∂q, ∂L/∂k, ∂L/∂v), each (b, f, p, n·e) contiguous, from g = ∂L/∂o (contiguous). `packed`: one
    (b, f, p, 3·n·e) tensor ∂L/∂(q|k|v) instead, the gradient of a joined qkv product (no concatenation after)."""
    grid, args = _grid(q, heads, block, warps, rows_apart(q, k, v))
    d = q.shape[-1]
    if packed:
        dqkv = q.new_empty(*q.shape[:-1], 3 * d)
        _frames_bwd[grid](q, k, v, g, *dqkv.split(d, dim=-1), GS=3 * d, **args)  # views: rows 3·D apart
        return dqkv
    dq, dk, dv = (q.new_empty(q.shape) for _ in range(3))
    _frames_bwd[grid](q, k, v, g, dq, dk, dv, GS=d, **args)
    return dq, dk, dv

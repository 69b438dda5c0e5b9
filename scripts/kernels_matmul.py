"""Triton matrix products for the transformer blocks' linear layers, with the op after them in the epilogue:
y = a·Wᵀ + bias, then + a residual (the block's `x + attn(...)`, `x + ff(...)`), or GEGLU's gate
(value · GELU(gate) of the two halves of `ff.net.0.proj`), so the product's output is written once and the separate
pass over memory (the residual add, or reading the 2I-wide projection back for the gate) is gone.

What to read: fused.py (`linear_forward`: the same math in plain PyTorch, the reference these kernels are tested
against, tests/test_fused.py); results/perf-notes.md (sixth session: what it measured against cuBLAS).

Official implementation: none (diffusers runs nn.Linear through cuBLAS, then the add, or GEGLU's GELU and product,
as separate kernels). Deliberate differences: GEGLU's projection is not rounded to fp16 before the gate (the gate
reads the fp32 accumulators), so its result differs from the eager one by about one fp16 rounding.

Layout: a (M, K) and W (N, K) contiguous, as nn.Linear keeps it (GEGLU: W (2N, K), value rows first); y (M, N).
A program computes a BLOCK_M × BLOCK_N tile of y (GEGLU: two accumulators, value and gate), over K in BLOCK_K steps
(K must be a multiple of BLOCK_K: `supports`); programs are ordered in groups of GROUP_M row tiles so the tiles of
W they share stay in L2. Out-of-range rows and columns are clamped on load and masked on store.

Glossary: M (tokens), K (input width), N (output width), I (GEGLU inner width, = N).
"""
import triton
import triton.language as tl

BIAS, RESIDUAL, GEGLU = 0, 1, 2  # the epilogues
_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


@triton.jit
def _linear(a_ptr, w_ptr, b_ptr, r_ptr, y_ptr, M, N, K, MODE: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * tiles_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m, pid_n = first_m + (pid % width) % size_m, (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a = a_ptr + (rm % M).to(tl.int64)[:, None] * K + rk[None, :]  # (BLOCK_M, BLOCK_K) of a
    w = w_ptr + (rn % N).to(tl.int64)[None, :] * K + rk[:, None]  # (BLOCK_K, BLOCK_N) of Wᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        x = tl.load(a)
        acc = tl.dot(x, tl.load(w), acc, input_precision="ieee")
        if MODE == 2:  # the gate's rows of W follow the value's N rows
            gate = tl.dot(x, tl.load(w + N * K), gate, input_precision="ieee")
        a += BLOCK_K
        w += BLOCK_K
    mn = rn < N
    acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    m = (rm < M)[:, None] & mn[None, :]
    if MODE == 1:
        acc += tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if MODE == 2:
        gate += tl.load(b_ptr + N + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
        acc = acc * (0.5 * gate * (1 + tl.erf(gate * 0.7071067811865476)))  # value · GELU(gate), exact GELU
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=m)


def supports(k, config=None):
    """True where the kernel applies: the input width a multiple of BLOCK_K."""
    return k % (config or _CONFIG)["BLOCK_K"] == 0


def linear(a, weight, bias, mode=BIAS, residual=None, out=None, config=None):
    """a (M, K), weight (N, K) (GEGLU: (2N, K)), bias likewise, residual (M, N) for RESIDUAL, all contiguous ->
    y (M, N): a·Wᵀ + bias [+ residual] or GEGLU's value · GELU(gate). `out` may be `residual` (in place)."""
    (m, k), n = a.shape, weight.shape[0] // (2 if mode == GEGLU else 1)
    cfg = dict(config or _CONFIG)
    y = a.new_empty(m, n) if out is None else out
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _linear[grid](a, weight, bias, y if residual is None else residual, y, m, n, k, MODE=mode, **cfg)
    return y

"""attention.py: capture equivalence, layer grids, box -> mask (§4.4 table), the energy on hand-built maps (§4.5).

Every expected number here is written out by hand from the formulas of `lvd-method.md`, never taken from
an earlier run of the code under test.
"""
import math

import pytest
import torch

import attention as A
from unet3d import UNet3D, UNet3DConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet3D(UNet3DConfig(block_out_channels=(64, 64, 128, 128), cross_attention_dim=32)).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# 1. the explicit-probability path equals SDPA

def test_attend_explicit_equals_sdpa_and_a_naive_reference():
    g = torch.Generator().manual_seed(1)
    b, q_len, l, n, e = 6, 64, 77, 2, 64
    q, k, v = (torch.randn(b, s, n * e, generator=g) for s in (q_len, l, l))
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    store = A.AttentionStore((path,))
    fused = A.attend(q, k, v, n)
    explicit = A.attend(q, k, v, n, store, path)
    assert (explicit - fused).abs().max() <= 2.5e-6  # measured 4.8e-7 (CPU, fp32); 2.5e-6 = 5x
    # naive reference, written independently: per head softmax(q kᵀ / √e) v
    qh, kh, vh = (t.reshape(b, -1, n, e) for t in (q, k, v))  # b l (n e) -> b l n e
    p_ref = torch.softmax(torch.einsum("bqne,blne->bnql", qh, kh) / math.sqrt(e), dim=-1)
    out_ref = torch.einsum("bnql,blne->bqne", p_ref, vh).reshape(b, q_len, n * e)  # b q n e -> b q (n e)
    assert (store.maps[path] - p_ref).abs().max() <= 1e-6  # measured 0 (CPU, fp32); 1e-6: fp32 round-off
    assert (explicit - out_ref).abs().max() <= 1e-5  # measured 0 (CPU, fp32); 1e-5: fp32 round-off
    assert A.AttentionStore(("other",)).wants(path) is False


def test_unet_output_unchanged_by_capture_and_maps_have_layer_grids(unet):
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(1, 4, 2, 10, 18, generator=g), torch.randn(1, 77, 32, generator=g)  # odd, non-square latent
    outs = {}
    hooks = [m.register_forward_hook(lambda m, i, o: outs.setdefault(m.path, []).append(o))
             for m in unet.modules() if getattr(m, "path", None) in A.GUIDED_LAYERS]
    store = A.AttentionStore(A.GUIDED_LAYERS)
    try:
        with torch.no_grad():
            plain = unet(x, 500, c)
            captured = unet(x, 500, c, store=store)
    finally:
        for hk in hooks:
            hk.remove()
    for path, (o_sdpa, o_explicit) in outs.items():  # each guided layer's output, SDPA vs explicit
        assert (o_explicit - o_sdpa).abs().max() <= 1.5e-6, path  # measured ≤ 2.4e-7 (CPU, fp32); 1.5e-6 = 6x
    # the UNet output: kernel round-off (~1e-7 per layer) accumulated over the downstream layers
    assert (captured - plain).abs().max() <= 1e-5 * plain.abs().max()  # measured 1.4e-6 of max|plain|; 1e-5 = 7x
    assert set(store.maps) == set(A.GUIDED_LAYERS)  # only the six materialise probabilities
    heads = {"down_blocks.1": 1, "down_blocks.2": 2, "up_blocks.1": 2, "up_blocks.2": 1}  # C / 64
    for path, p in store.maps.items():
        h, w = A.layer_grid(path, 10, 18)
        assert p.shape == (2, heads[".".join(path.split(".")[:2])], h * w, 77), path
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)  # measured 2.4e-7; 1e-5 = 40x
    # the UNet's own stride-2 convs give 10×18 -> 5×9 -> 3×5: ceil-halving
    assert A.layer_grid(A.GUIDED_LAYERS[0], 10, 18) == (5, 9)
    assert A.layer_grid(A.GUIDED_LAYERS[1], 10, 18) == (3, 5)


def test_truncated_forward_returns_none_after_the_last_guided_layer(unet):
    x, c = torch.randn(1, 4, 2, 16, 16), torch.randn(1, 77, 32)
    store = A.AttentionStore(A.GUIDED_LAYERS, truncate=True)
    with torch.no_grad():
        assert unet(x, 10, c, store=store) is None
    assert set(store.maps) == set(A.GUIDED_LAYERS)


def test_layer_grids_of_the_spec_table():
    # §4.3: ModelScope 256² (latent 32×32), 512² (64×64), Zeroscope (40×72)
    want = {(32, 32): [(16, 16), (8, 8)], (64, 64): [(32, 32), (16, 16)], (40, 72): [(20, 36), (10, 18)]}
    for latent, (g1, g2) in want.items():
        assert [A.layer_grid(p, *latent) for p in A.GUIDED_LAYERS] == [g1, g2, g2, g2, g2, g1]


# -----------------------------------------------------------------------------
# 7. box -> mask (§4.4 worked examples)

def _rows_cols(m):
    ys, xs = torch.nonzero(m, as_tuple=True)
    return (int(ys.min()), int(ys.max())), (int(xs.min()), int(xs.max())), int(m.sum())


def _corners(x, y, w, h):
    return (x / 512, y / 512, (x + w) / 512, (y + h) / 512)  # §3.2


@pytest.mark.parametrize("box, grid, rows, cols", [
    ((0, 256, 100, 100), (8, 8), (4, 5), (0, 1)),
    ((0, 256, 100, 100), (16, 16), (8, 10), (0, 2)),
    ((0, 256, 100, 100), (10, 18), (5, 6), (0, 3)),
    ((0, 256, 100, 100), (20, 36), (10, 13), (0, 6)),
    ((85, 256, 100, 100), (8, 8), (4, 5), (1, 2)),
    ((85, 256, 100, 100), (16, 16), (8, 10), (3, 5)),
    ((85, 256, 100, 100), (10, 18), (5, 6), (3, 6)),
    ((85, 256, 100, 100), (20, 36), (10, 13), (6, 12)),
    ((128, 0, 64, 64), (10, 18), (0, 0), (4, 5)),  # x0 = round(4.5) = 4: half to even
])
def test_box_mask_worked_examples(box, grid, rows, cols):
    m = A.box_mask(_corners(*box), *grid)
    assert m.dtype == torch.float32 and m.shape == grid
    assert _rows_cols(m) == (rows, cols, (rows[1] - rows[0] + 1) * (cols[1] - cols[0] + 1))


def test_box_mask_clamps_absent_and_layer_masks():
    m = A.box_mask((0.9, 0.9, 1.2, 1.1), 8, 8)  # beyond the frame: clamped
    assert _rows_cols(m) == ((7, 7), (7, 7), 1)
    assert A.box_mask((0, 0, 0, 0), 8, 8).sum() == 0  # absent frame
    for off in ((-0.6, 0.2, -0.1, 0.7), (0.2, -0.5, 0.7, -0.2), (1.1, 0.2, 1.5, 0.7)):  # wholly outside
        assert A.box_mask(off, 8, 8).sum() == 0, off
    boxes = [[_corners(0, 256, 100, 100), (0, 0, 0, 0)]]  # 1 object, 2 frames, absent in the second
    masks = A.layer_masks(boxes, (32, 32))
    assert set(masks) == set(A.GUIDED_LAYERS)
    assert masks[A.GUIDED_LAYERS[0]].shape == (1, 2, 16, 16) and masks[A.GUIDED_LAYERS[1]].shape == (1, 2, 8, 8)
    assert _rows_cols(masks[A.GUIDED_LAYERS[1]][0, 0]) == ((4, 5), (0, 1), 4)
    assert masks[A.GUIDED_LAYERS[0]][0, 1].sum() == 0
    with pytest.raises(ValueError, match="objects, frames, 4"):
        A.layer_masks([[0, 0, 1, 1]], (32, 32))


# -----------------------------------------------------------------------------
# 2. the energy on hand-built 4×4 maps (§4.5)

P1 = A.GuidanceParams(com_loss_scale=0.0)  # ρ 0.75 / 0.75, w 1 / 4, no CoM
L4 = "layer"  # a single hand-built layer: L divides by |O|·1


def _maps(*heads_per_frame, tokens=3, p=1):
    """frames of heads of 4×4 maps for token p -> (f, n, 16, tokens); other tokens zero."""
    a = torch.zeros(len(heads_per_frame), len(heads_per_frame[0]), 16, tokens, dtype=torch.float64)
    for fi, heads in enumerate(heads_per_frame):
        for hi, m in enumerate(heads):
            a[fi, hi, :, p] = torch.as_tensor(m, dtype=torch.float64).flatten()
    return a


RAMP = [[r * 4 + c for c in range(4)] for r in range(4)]  # value = flat index
UP = torch.tensor(RAMP, dtype=torch.float64) / 100
DOWN = (15 - torch.tensor(RAMP, dtype=torch.float64)) / 100
EDGE = torch.zeros(4, 4)
EDGE[0:2, 2:4] = 1  # rows 0-1, cols 2-3: touches the top and right edges; indices 2, 3, 6, 7


def test_energy_edge_box_two_heads_summed():
    a = _maps([UP, DOWN])
    masks = {L4: EDGE[None, None]}  # (O=1, f=1, 4, 4)
    # |m| = 4 -> k_fg = ⌊0.75·4⌋ = 3; k_bg = ⌊0.75·12⌋ = 9
    fg_up = 1 - (7 + 6 + 3) / 3 / 100  # in-box values 2, 3, 6, 7
    bg_up = (15 + 14 + 13 + 12 + 11 + 10 + 9 + 8 + 5) / 9 / 100  # out-of-box 0,1,4,5,8..15
    fg_down = 1 - (13 + 12 + 9) / 3 / 100  # 15 − index: 13, 12, 9, 8
    bg_down = (15 + 14 + 11 + 10 + 7 + 6 + 5 + 4 + 3) / 9 / 100
    want = 1 * (fg_up + fg_down) + 4 * (bg_up + bg_down)  # heads summed
    got = A.energy({L4: a}, masks, [[1]], P1)
    assert got.dtype == torch.float64 and abs(float(got) - want) < 1e-12  # float64: measured 0; 1e-12 ≫ 5x


def test_energy_empty_mask_and_sum_over_frames():
    a = _maps([UP], [UP])
    masks = {L4: torch.stack([EDGE, torch.zeros(4, 4)])[None]}  # frame 1 absent
    f0 = (1 - 16 / 300) + 4 * 97 / 900
    f1 = 1 + 4 * (15 + 14 + 13 + 12 + 11 + 10 + 9 + 8 + 7 + 6 + 5 + 4) / 12 / 100  # fg = 1, k_bg = ⌊0.75·16⌋ = 12
    # float64: measured 4.4e-16; 1e-12 = 2000x
    assert abs(float(A.energy({L4: a}, masks, [[1]], P1)) - (f0 + f1)) < 1e-12
    # gradient of the absent frame's fg term is zero: d/dA of frame 1 only comes from bg (weight 4/12 on top 12)
    a.requires_grad_(True)
    (g,) = torch.autograd.grad(A.energy({L4: a}, masks, [[1]], P1), a)
    g1 = g[1, 0, :, 1]
    # float64: measured 0; allclose's default rtol 1e-5 ≫ 5x
    assert torch.allclose(g1[4:], torch.full((12,), 4 / 12, dtype=torch.float64)) and (g1[:4] == 0).all()


def test_energy_two_objects_on_one_token_two_tokens_two_layers():
    a = _maps([UP])
    a[0, 0, :, 2] = DOWN.flatten()  # token 2 holds the DOWN map
    other = torch.zeros(4, 4)
    other[2:4, 0:2] = 1  # bottom-left box: indices 8, 9, 12, 13
    masks = {L4: torch.stack([EDGE, other])[:, None]}  # (O=2, f=1, 4, 4)
    e_edge_up = (1 - 16 / 300) + 4 * 97 / 900
    e_other_up = (1 - (13 + 12 + 9) / 300) + 4 * (15 + 14 + 11 + 10 + 7 + 6 + 5 + 4 + 3) / 900
    e_other_down = (1 - (7 + 6 + 3) / 300) + 4 * (15 + 14 + 13 + 12 + 11 + 10 + 9 + 8 + 5) / 900  # DOWN at 8,9,12,13 = 7,6,3,2
    # two objects on token 1 -> L = (E_edge + E_other) / 2
    # float64: measured 0; 1e-12 ≫ 5x
    assert abs(float(A.energy({L4: a}, masks, [[1], [1]], P1)) - (e_edge_up + e_other_up) / 2) < 1e-12
    # object 2 on tokens [1, 2] -> its energy is the mean over its tokens
    want = (e_edge_up + (e_other_up + e_other_down) / 2) / 2
    assert abs(float(A.energy({L4: a}, masks, [[1], [1, 2]], P1)) - want) < 1e-12  # float64: measured 0; 1e-12 ≫ 5x
    # two layers: the mean over layers (here the same layer twice, and one with both objects swapped)
    masks2 = {"x": masks[L4], "y": masks[L4].flip(0)}
    want2 = ((e_edge_up + e_other_up) + (e_other_up + e_edge_up)) / 4
    # float64: measured 0; 1e-12 ≫ 5x
    assert abs(float(A.energy({"x": a, "y": a}, masks2, [[1], [1]], P1)) - want2) < 1e-12
    assert float(A.energy({L4: a}, masks, [], P1)) == 0.0  # no objects: L = 0


def test_energy_top_p_and_weights():
    a = _maps([UP])
    p = A.GuidanceParams(fg_top_p=0.25, bg_top_p=0.25, fg_weight=1.0, bg_weight=2.0, com_loss_scale=0.0)
    # k_fg = max(1, ⌊0.25·4⌋) = 1; k_bg = ⌊0.25·12⌋ = 3
    want = (1 - 0.07) + 2 * (15 + 14 + 13) / 3 / 100
    # float64: measured 0; 1e-12 ≫ 5x
    assert abs(float(A.energy({L4: a}, {L4: EDGE[None, None]}, [[1]], p)) - want) < 1e-12


def _onehot(y, x):
    m = torch.zeros(4, 4)
    m[y, x] = 1
    return m


def test_energy_com_position_and_velocity():
    lam = 0.5
    p = A.GuidanceParams(com_loss_scale=lam)
    # frame 0: head 0 mass at (3, 0), head 1 at (0, 0); frame 1: both heads at (1, 1)
    a = _maps([_onehot(3, 0), _onehot(0, 0)], [_onehot(1, 1), _onehot(1, 1)])
    shifted = torch.zeros(4, 4)
    shifted[0:2, 1:3] = 1  # frame 1 box one column left: centre (0.5, 1.5); frame 0 (EDGE) centre (0.5, 2.5)
    masks = {L4: torch.stack([EDGE, shifted])[None]}
    pos0 = lam * (((3 - 0.5) ** 2 + (0 - 0.5) ** 2) / 2 + ((0 - 2.5) ** 2 + (0 - 2.5) ** 2) / 2)  # mean over heads
    pos1 = lam * ((1 - 0.5) ** 2 + (1 - 1.5) ** 2)
    # ΔA: head 0 (1−3, 1−0) = (−2, 1), head 1 (1, 1); Δm = (0, −1)
    vel0 = lam * (((-2 - 0) ** 2 + (1 - 0) ** 2) / 2 + ((1 - (-1)) ** 2 + (1 - (-1)) ** 2) / 2)
    terms = A.energy_terms({L4: a}, masks, [[1]], p)
    assert abs(float(terms["pos"]) - (pos0 + pos1)) < 1e-12  # float64: measured 0; 1e-12 ≫ 5x
    # float64: measured 0; 1e-12 ≫ 5x
    assert abs(float(terms["vel"]) - vel0) < 1e-12  # the last frame has f⁺ = f: no velocity term
    # box terms: frame 0 both heads out of the box: fg 1, bg 1/9 each; frame 1: (1,1) is outside `shifted`? no,
    # (1, 1) is inside rows 0-1, cols 1-2: |m| = 4, k_fg = 3 -> fg = 1 − 1/3, bg = 0
    box = 2 * (1 + 4 / 9) + 2 * (1 - 1 / 3)
    assert abs(float(terms["fg"] + terms["bg"]) - box) < 1e-12  # float64: measured 8.9e-16; 1e-12 = 1100x
    # float64: measured 1.8e-15; 1e-12 = 560x
    assert abs(float(A.energy({L4: a}, masks, [[1]], p)) - (box + pos0 + pos1 + vel0)) < 1e-12
    # the object absent in frame 1: no position term there and no velocity term at frame 0
    masks_gone = {L4: torch.stack([EDGE, torch.zeros(4, 4)])[None]}
    terms = A.energy_terms({L4: a}, masks_gone, [[1]], p)
    assert abs(float(terms["pos"]) - pos0) < 1e-12 and float(terms["vel"]) == 0.0  # float64: measured 0; 1e-12 ≫ 5x


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_energy_with_prepared_mask_terms_is_the_same(lam):
    """energy(..., prepared=mask_terms(...)) (the guidance pass's path) against the terms computed inline: the same
    value and gradient (the same ops on the same numbers), over two layers, two objects, an absent frame."""
    p = A.GuidanceParams(com_loss_scale=lam)
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(3, 2, 16, 5, generator=gen, dtype=torch.float64).softmax(-1).requires_grad_(True)
    other = torch.zeros(4, 4)
    other[1:4, 0:3] = 1
    masks = {"x": torch.stack([torch.stack([EDGE, other, torch.zeros(4, 4)]), torch.stack([other, other, EDGE])]),
             "y": torch.stack([torch.stack([other, EDGE, EDGE]), torch.stack([EDGE, torch.zeros(4, 4), other])])}
    prepared = A.mask_terms(masks, p, torch.float64)
    assert sorted(prepared) == ["x", "y"] and len(prepared["x"]) == 2 and ("my" in prepared["x"][0]) == (lam > 0)
    maps = {"x": a, "y": a.flip(0)}
    for got, want in zip(A.energy_terms(maps, masks, [[1], [2, 3]], p, prepared).values(),
                         A.energy_terms(maps, masks, [[1], [2, 3]], p).values()):
        assert got.dtype == torch.float64 and float(got) == float(want)
    (g,) = torch.autograd.grad(A.energy(maps, masks, [[1], [2, 3]], p, prepared), a)
    (g_ref,) = torch.autograd.grad(A.energy(maps, masks, [[1], [2, 3]], p), a)
    assert torch.equal(g, g_ref) and g.abs().sum() > 0


def test_energy_fp16_maps_fp32_accumulator_and_errors():
    a = torch.rand(2, 2, 16, 5).softmax(-1).half()
    masks = {L4: torch.stack([EDGE, EDGE])[None]}
    got = A.energy({L4: a}, masks, [[1, 2]], A.GuidanceParams())
    assert got.dtype == torch.float32
    # measured 6.8e-7 (fp16 maps, seeded by conftest); 1e-5 = 15x
    assert abs(float(got) - float(A.energy({L4: a.double()}, masks, [[1, 2]], A.GuidanceParams()))) < 1e-5
    with pytest.raises(ValueError, match="token positions"):
        A.energy({L4: a}, masks, [[7]], P1)
    with pytest.raises(ValueError, match="no masks"):
        A.energy({"other": a}, masks, [[1]], P1)
    with pytest.raises(ValueError, match="do not fit"):
        A.energy({L4: a}, masks, [[1], [2]], P1)


def test_presets():
    assert A.preset("off") is None
    b = A.preset("benchmark")
    assert (b.loss_scale, b.loss_threshold, b.max_iter, b.max_index_step) == (5.0, 200.0, 5, 10)
    assert (b.fg_top_p, b.bg_top_p, b.fg_weight, b.bg_weight, b.com_loss_scale) == (0.75, 0.75, 1.0, 4.0, 0.03)
    w, wz = A.preset("weak", "modelscope"), A.preset("weak", "zeroscope")
    assert (w.loss_scale, w.loss_threshold, w.max_iter, w.fg_top_p, w.bg_weight, w.com_loss_scale) == \
        (2.5, 250.0, 1, 0.25, 2.0, 0.0)
    assert wz.loss_threshold == 350.0
    with pytest.raises(ValueError, match="unknown preset"):
        A.preset("strong")
    with pytest.raises(ValueError, match="top_p"):
        A.GuidanceParams(fg_top_p=0.0)

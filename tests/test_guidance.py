"""The guidance step on a tiny random UNet: gradient (finite differences), the truncated pass gives the
official gradient, the update formula, descent, the loop's L_prev logic, the
attention grid and the pipeline glue (`lvd-method.md` §4.5-§4.6).

Oracles: central finite differences in float64; an untruncated, uncheckpointed forward with the energy and
torch.autograd written out in the test (the official recipe); hand-written loss sequences for the loop.
"""
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attention as A
from sampler import NoiseSchedule
from guidance_case import POSITIONS, SCHEDULE, guided_calls, official_loss_and_grad, tiny_unet
from guidance_case import setup as _setup

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


# -----------------------------------------------------------------------------
# 3. finite differences (float64)

def test_gradient_matches_central_finite_differences_float64(unet):
    net = copy.deepcopy(unet).double()
    x, cond, masks = _setup(3, 8, 8, torch.float64)
    params = A.GuidanceParams(loss_scale=1.0)  # benchmark energy (top-p 0.75, weights 1/4, CoM λ 0.03)
    guide = A.LatentGuidance(net, cond, masks, POSITIONS, None, params)
    loss, grad = guide.loss_and_grad(x, 999)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64

    def energy_at(z):
        store = A.AttentionStore(A.GUIDED_LAYERS, truncate=True)
        with torch.no_grad():
            net(z, 999, cond, store=store)
        return float(A.energy(store.maps, masks, POSITIONS, params))

    g = torch.Generator().manual_seed(7)
    directions = [grad / grad.norm()] + [v / v.norm() for v in (torch.randn(x.shape, generator=g, dtype=torch.float64)
                                                                for _ in range(2))]
    for idx in grad.flatten().abs().topk(2).indices:  # two single coordinates
        e = torch.zeros(x.numel(), dtype=torch.float64)
        e[idx] = 1
        directions.append(e.reshape(x.shape))
    eps, worst = 1e-4, 0.0
    for v in directions:
        fd = (energy_at(x + eps * v) - energy_at(x - eps * v)) / (2 * eps)  # central difference
        analytic = float((grad * v).sum())
        worst = max(worst, abs(fd - analytic) / abs(analytic))
    assert worst <= 1e-4, worst  # float64: measured 1.2e-8; 1e-4 = 8000x


# -----------------------------------------------------------------------------
# 4. truncated and checkpointed forwards give the official gradient; the update formula

def test_truncated_gradient_equals_the_full_forward(unet):
    """The truncated pass (stops after the last guided layer) gives the official gradient; the update formula.
    (The fast layer's memory modes give it too: tests/test_memory.py.)"""
    x, cond, masks = _setup(3, 16, 16)
    schedule = NoiseSchedule.from_config(SCHEDULE)
    t = 974
    params = A.GuidanceParams(loss_scale=5.0)
    ref_loss, ref_g = official_loss_and_grad(unet, x, t, cond, masks, params)
    scale = ref_g.abs().max()
    guide = A.LatentGuidance(unet, cond, masks, POSITIONS, schedule, params)
    (loss, g), calls = guided_calls(unet, lambda: guide.loss_and_grad(x, t))
    assert len(calls) == 6
    # fp32 sums in another order: measured 0 here (CPU), ~1e-7 earlier; 1e-6 = 10x
    assert abs(float(loss) - ref_loss) <= 1e-6 * ref_loss
    # measured 0 (CPU, fp32); 1e-6 of max|g|: fp32 round-off
    assert (g - ref_g).abs().max() <= 1e-6 * scale, float((g - ref_g).abs().max() / scale)
    # z ← z − √(1 − ᾱ_t)·∇(s·L), ᾱ from the training schedule (§4.6)
    x_new, measured = guide.step(x, t)
    alpha_bar = float(torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)[t])
    assert torch.allclose(x_new, x - math.sqrt(1 - alpha_bar) * ref_g, atol=1e-6 * scale)  # measured 0 (CPU, fp32)
    assert measured == pytest.approx(ref_loss, rel=1e-6)  # measured 0 (CPU, fp32)



# -----------------------------------------------------------------------------
# 5. the energy falls at a fixed t

def test_guidance_lowers_the_energy_each_iteration(unet):
    """loss_scale 200: the tiny random UNet's ∇L is ~1e-2, so the benchmark's s = 5 moves z by ~0.05 and lowers L
    by only ~5e-4 per iteration; s = 200 gives a clearly visible descent while each step stays small (~2 in
    norm against |z| ≈ 55), i.e. within the linear regime where a gradient step is a descent step."""
    x, cond, masks = _setup(3, 16, 16)
    params = A.GuidanceParams(loss_scale=200.0, loss_threshold=0.0, max_iter=4, max_index_step=1)
    guide = A.LatentGuidance(unet, cond, masks, POSITIONS, NoiseSchedule.from_config(SCHEDULE), params)
    x_out = guide(x, 0, 999)
    assert [h[:3] for h in guide.history] == [(0, 999, k) for k in range(4)]
    losses = [h[3] for h in guide.history] + [float(guide.loss_and_grad(x_out, 999)[0])]
    # measured drops ≥ 0.011 per iteration, 2000x L's fp32 noise (~5e-6)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 1e-2  # measured drop 0.064 (5.514 -> 5.450); 1e-2 = 6.4x under it
    assert guide(x_out, 1, 974) is x_out  # i ≥ max_index_step: no guidance


# -----------------------------------------------------------------------------
# the loop's control flow (§4.6), with scripted losses instead of a model

class Scripted(A.LatentGuidance):
    def __init__(self, losses, params):
        super().__init__(None, None, {p: None for p in A.GUIDED_LAYERS}, [], None, params)
        self.losses = list(losses)

    def step(self, x, t):
        return x + 1, self.losses.pop(0)


def test_loop_threshold_max_iter_and_l_prev_never_reset():
    p = A.GuidanceParams(loss_scale=5.0, loss_threshold=200.0, max_iter=3, max_index_step=3)
    g = Scripted([300, 250, 240, 220, 150, 10], p)
    assert g.loss_prev == 10000 / 5  # initialised to 10000 / loss_scale: step 0 always starts
    x = torch.zeros(())
    x = g(x, 0, 999)  # 3 iterations (max_iter), all measuring L > τ
    assert float(x) == 3 and g.loss_prev == 240
    x = g(x, 1, 974)  # 220 > τ, then 150 ≤ τ: that iteration's update is still applied, then stop
    assert float(x) == 5 and g.loss_prev == 150
    x = g(x, 2, 949)  # L_prev is not reset: no guidance at a later step
    assert float(x) == 5 and g.losses == [10]
    assert [(h[0], h[2], h[3]) for h in g.history] == [(0, 0, 300), (0, 1, 250), (0, 2, 240), (1, 0, 220), (1, 1, 150)]
    g2 = Scripted([1000] * 10, A.GuidanceParams(max_iter=2, max_index_step=2))
    y = g2(g2(g2(torch.zeros(()), 0, 999), 1, 974), 2, 949)  # step 2 ≥ max_index_step
    assert float(y) == 4


def test_guidance_input_errors(unet):
    x, cond, masks = _setup(2, 8, 8)
    with pytest.raises(ValueError, match="lack the guided layers"):
        A.LatentGuidance(unet, cond, {}, POSITIONS, None, A.GuidanceParams())
    guide = A.LatentGuidance(unet, None, masks, POSITIONS, None, A.GuidanceParams())
    with pytest.raises(ValueError, match="set the conditional embedding"):
        guide(x, 0, 999)
    guide.cond = cond
    with pytest.raises(ValueError, match=r"\(1, 4, f, h, w\)"):
        guide.loss_and_grad(x[0], 999)


# -----------------------------------------------------------------------------
# the pipeline glue and the attention grid

def test_guidance_for_layout_and_attention_grid(unet, tmp_path):
    import planner
    from text_encoder import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(str(ROOT / "data" / "clip-tokenizer"))
    box = lambda x: {"id": 0, "name": "bear", "box": [x, 256, 100, 100]}
    layout = planner.Layout("A bear walks from the left to the right", "forest",
                            [[box(85 * k)] + ([{"id": 1, "name": "tree", "box": [400, 50, 100, 400]}] if k < 3 else [])
                             for k in range(6)])
    pipe = type("Pipe", (), dict(tokenizer=tok, unet=unet, schedule=NoiseSchedule.from_config(SCHEDULE)))()
    params = A.GuidanceParams(loss_threshold=0.0, max_iter=1, max_index_step=1)
    guide, final = A.guidance_for_layout(pipe, layout.prompt, layout, 2, 64, 64, params)
    assert final == "A bear walks from the left to the right, forest background| tree"  # §3.1 example
    assert guide.suffixes == [", forest background", "| tree"] and guide.names == ["bear", "tree"]
    assert guide.token_positions == [[2], [14]]  # <start> a bear walks from the left to the right , forest background | tree
    m = guide.masks[A.GUIDED_LAYERS[1]]  # latent 8×8 -> 2×2 at level 2
    assert m.shape == (2, 2, 2, 2) and m[1, 1].sum() == 0  # the tree is gone from frame 2 of 2 (layout frames 4-6)
    guide.cond = torch.randn(1, 77, 32)
    x = torch.randn(1, 4, 2, 8, 8)
    assert guide(x, 0, 999).shape == x.shape and len(guide.history) == 1
    # the attention grid: captured maps, one PNG per object, the box outlined in red
    store = A.AttentionStore(A.GUIDED_LAYERS, truncate=True)
    with torch.no_grad():
        unet(x, 999, guide.cond, store=store)
    assert all(torch.equal(guide.last_maps[p], store.maps[p]) for p in A.GUIDED_LAYERS)  # the guided pass's maps
    written = A.save_attention_grid(store.maps, guide.masks, guide.token_positions, guide.names, str(tmp_path / "attn"))
    assert [Path(p).name for p in written] == ["attn_0_bear.png", "attn_1_tree.png"]
    img = np.asarray(Image.open(written[0]).convert("RGB"))
    assert img.shape[0] == 6 * (64 + 2)  # six layer rows; 4×4 grid cells upsampled to 64 px
    assert ((img[..., 0] == 255) & (img[..., 1] == 0) & (img[..., 2] == 0)).any()  # a red box outline

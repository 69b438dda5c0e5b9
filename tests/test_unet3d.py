"""Parity of the hand-written UNet3D with diffusers' UNet3DConditionModel, at tiny random configs.

What to read: `modelscope-architecture.md` §3.2 (head-dim quirk), §4 (forward), §6 (keys), §14
(parity checklist); `lvd-method.md` §4.2–§4.3 (captured maps, the six guided layers).

Official implementation (the oracle): diffusers 0.42.1 `UNet3DConditionModel`, saved with its own
`save_pretrained` (safetensors, real diffusers layout) and loaded through `UNet3D.from_pretrained`.

Differences: none intended. Every parameter is re-randomised (norm scales around 1, biases and
matrices non-zero), so no zero-initialised `conv4` / `proj_out` can hide a bug. Two configs:
attention_head_dim 64 (the real quirk: 1, 1, 2, 2 heads at 64, 64, 128, 128 channels) and 32
(head dim 32, C/32 heads: 2, 2, 4, 4, so every attention has at least 2 heads; transformer_in 8 × 32).

Glossary: b (batch), f (frames), c (channels), h, w (latent height, width), l (77 text tokens).
"""
import copy
import math

import pytest
import torch
from diffusers import UNet3DConditionModel  # test-only reference; a missing diffusers must fail
from safetensors.torch import load_file, save_file

from attention import AttentionStore
from unet_transformers import batch_to_frames, frames_to_batch
from unet3d import UNet3D

TINY = dict(block_out_channels=(64, 64, 128, 128), cross_attention_dim=32, layers_per_block=2, norm_num_groups=32)
GUIDED = (  # lvd-method.md §4.3; official keys in the comments
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2",  # ("down", 1, 0, 0)
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2",  # ("down", 2, 0, 0)
    "down_blocks.2.attentions.1.transformer_blocks.0.attn2",  # ("down", 2, 1, 0)
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2",    # ("up", 1, 0, 0)
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2",    # ("up", 1, 1, 0)
    "up_blocks.2.attentions.2.transformer_blocks.0.attn2",    # ("up", 2, 2, 0)
)
TOL = 1e-5  # parity with diffusers in fp32 (the project's standard): measured ≤ 1.4e-6 (CPU), 7x


def rel_err(a, b):
    """Relative L2 error ||a - b|| / ||b||, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def rerandomise(model, seed):
    """Every parameter random: matrices N(0, 1/fan_in), norm scales N(1, 0.1²), biases N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # GroupNorm / LayerNorm scales
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def inputs(b, f, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, f, h, w, generator=g), torch.randn(b, 77, TINY["cross_attention_dim"], generator=g)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """head_dim -> (diffusers reference, our UNet3D loaded from the reference's saved folder, folder), built once."""
    cache = {}

    def get(head_dim):
        if head_dim not in cache:
            torch.manual_seed(0)
            ref = rerandomise(UNet3DConditionModel(attention_head_dim=head_dim, **TINY), seed=head_dim).eval()
            folder = tmp_path_factory.mktemp(f"unet_hd{head_dim}")
            ref.save_pretrained(folder, safe_serialization=True)
            cache[head_dim] = ref, UNet3D.from_pretrained(str(folder)), folder
        return cache[head_dim]
    return get


@pytest.fixture(scope="module", params=[64, 32], ids=["head_dim64", "head_dim32"])
def models(request, zoo):
    return zoo(request.param)


@pytest.fixture(scope="module")
def main_case(models):
    """Batch 2 with two timesteps, 3 frames, non-square 16×24 latent: inputs and both outputs."""
    ref, ours, _ = models
    x, ctx = inputs(2, 3, 16, 24)
    t = torch.tensor([981, 21])
    with torch.no_grad():
        return x, t, ctx, ref(x, t, ctx).sample, ours(x, t, ctx)


@pytest.fixture(scope="module")
def odd_case(models):
    """Batch 2, 3 frames, odd non-square 10×14 latent (cheaper than the main case): inputs, both outputs."""
    ref, ours, _ = models
    x, ctx = inputs(2, 3, 10, 14, seed=2)
    t = torch.tensor([321, 654])
    with torch.no_grad():
        return x, t, ctx, ref(x, t, ctx).sample, ours(x, t, ctx)


@pytest.fixture(scope="module")
def captured(models, odd_case):
    """Our forward on the odd case with the six guided maps captured."""
    _, ours, _ = models
    x, t, ctx, _, _ = odd_case
    store = AttentionStore(GUIDED)
    with torch.no_grad():
        return store, ours(x, t, ctx, store=store)


# -----------------------------------------------------------------------------
# parity

def test_parity_batch_two_timesteps(main_case):
    x, _, _, y_ref, y = main_case
    assert y.shape == y_ref.shape == x.shape
    assert y_ref.std() > 0.1  # measured 0.58 = 5.8x; a live network, not a near-identity
    assert rel_err(y, y_ref) <= TOL  # measured 0


def test_parity_scalar_timestep(models):
    ref, ours, _ = models
    x, ctx = inputs(2, 3, 8, 8, seed=1)
    with torch.no_grad():
        y_ref, y = ref(x, 500, ctx).sample, ours(x, 500, ctx)
        y_t0 = ours(x, torch.tensor(500), ctx)  # a 0-dim tensor broadcasts the same way
    assert rel_err(y, y_ref) <= TOL  # measured 8.9e-7: 11x
    assert torch.equal(y, y_t0)


def test_shared_prefix_equals_diffusers_on_the_repeated_latents(models):
    """Two latents, each with two text rows (the CFG step's shape, batched): the text-independent prefix runs once
    per latent; the output equals diffusers' on [x, x] with the timesteps repeated."""
    ref, ours, _ = models
    x, ctx = inputs(2, 3, 8, 12, seed=3)
    ctx4 = torch.cat([ctx, ctx.flip(0) * 0.5])
    t = torch.tensor([700, 80])
    with torch.no_grad():
        y_ref, y = ref(torch.cat([x, x]), t.repeat(2), ctx4).sample, ours(x, t, ctx4)
        y_one = ours(x[:1], 700, ctx4[::2])  # one latent, two rows: the CFG step
    assert y.shape == (4, *x.shape[1:]) and rel_err(y, y_ref) <= TOL  # measured 9.8e-7: 10x
    assert rel_err(y_one, y_ref[::2]) <= TOL  # measured 1.4e-6: 7x
    with pytest.raises(ValueError, match="3 text rows for 2 latents"):
        ours(x, t, ctx4[:3])


def test_parity_odd_latent(models, odd_case):
    """10×14 downsamples to 5×7, 3×4, 2×2 (ceil); the upsamplers must hit the skips' exact sizes."""
    x, _, _, y_ref, y = odd_case
    assert y.shape == x.shape == (2, 4, 3, 10, 14)
    assert rel_err(y, y_ref) <= TOL  # measured 0


@pytest.mark.parametrize("models", [32], indirect=True, ids=["head_dim32"])
def test_permuted_weight_breaks_parity(models, odd_case, tmp_path):
    """The parity test can fail: a transposed square to_q weight in the file is caught."""
    _, _, folder = models
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert state[key].shape[0] == state[key].shape[1]
    state[key] = state[key].t().contiguous()
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    bad = UNet3D.from_pretrained(str(tmp_path))
    x, t, ctx, y_ref, _ = odd_case
    with torch.no_grad():
        y_bad = bad(x, t, ctx)
    assert rel_err(y_bad, y_ref) > 1e-3  # measured 0.081 = 81x


# -----------------------------------------------------------------------------
# video folds

def test_frames_to_batch_is_frame_major_and_round_trips():
    b, c, f, h, w = 2, 3, 4, 5, 6
    x = torch.randn(b, c, f, h, w)
    y = frames_to_batch(x)
    assert y.shape == (b * f, c, h, w)
    for i in range(b):
        for j in range(f):
            assert torch.equal(y[i * f + j], x[i, :, j])  # row b·f + f holds frame f of sample b
    assert torch.equal(batch_to_frames(y, f), x)
    z = torch.randn(b * f, c, h, w)
    assert torch.equal(frames_to_batch(batch_to_frames(z, f)), z)


# -----------------------------------------------------------------------------
# attention capture

def diffusers_maps(ref, x, t, ctx):
    """Cross-attention probabilities of the six guided layers, recorded from diffusers itself."""
    from diffusers.models.attention_processor import AttnProcessor
    maps, mods = {}, dict(ref.named_modules())
    saved = {path: mods[path].processor for path in GUIDED}
    for path in GUIDED:
        mod = mods[path]
        mod.set_processor(AttnProcessor())  # the processor that materialises get_attention_scores

        def record(q, k, mask=None, _orig=mod.get_attention_scores, _path=path, _n=mod.heads):
            p = _orig(q, k, mask)
            maps[_path] = p.unflatten(0, (-1, _n))  # (b n) q k -> b n q k
            return p
        mod.get_attention_scores = record
    try:
        with torch.no_grad():
            ref(x, t, ctx)
    finally:
        for path in GUIDED:
            del mods[path].get_attention_scores
            mods[path].set_processor(saved[path])
    return maps


def expected_map_shapes(ours, b, f, h, w):
    """(b·f, heads, h_l·w_l, 77) by hand: channels per level and the ceil-halved grids (§4.3)."""
    ch, e = ours.config.block_out_channels, ours.config.head_dim

    def half(n, k):  # k stride-2 convs with padding 1: ceil(n / 2) each time
        return n if k == 0 else half(-(-n // 2), k - 1)
    level = {"down_blocks.1": (ch[1], 1), "down_blocks.2": (ch[2], 2),  # (channels, downsamplings)
             "up_blocks.1": (ch[-2], 2), "up_blocks.2": (ch[-3], 1)}
    out = {}
    for path in GUIDED:
        c, k = level[".".join(path.split(".")[:2])]
        out[path] = (b * f, c // e, half(h, k) * half(w, k), 77)
    return out


def test_store_captures_guided_maps(models, odd_case, captured):
    ref, ours, _ = models
    x, t, ctx, _, y_plain = odd_case
    store, y = captured
    # Capturing does not change the output: the explicit softmax and the fused SDPA kernel agree to
    # fp32 rounding (~1e-7 per layer), which the random network amplifies to ~1e-6 at the output.
    assert rel_err(y, y_plain) <= 6e-6  # measured 1.0e-6 (CPU); 6e-6 = 6x
    assert set(store.maps) == set(GUIDED)
    want = expected_map_shapes(ours, 2, 3, 10, 14)  # grids 5×7 and 3×4
    oracle = diffusers_maps(ref, x, t, ctx)
    for path in GUIDED:
        m = store.maps[path]
        assert tuple(m.shape) == want[path], path
        assert torch.allclose(m.sum(-1), torch.ones(()), atol=1e-5), path  # measured 2.4e-7; 1e-5 = 40x
        assert tuple(oracle[path].shape) == want[path], path
        assert (m - oracle[path]).abs().max() <= 1e-5, path  # measured ≤ 6.7e-7 (CPU, fp32); 1e-5 = 15x
    if ours.config.head_dim == 32:
        assert min(want[p][1] for p in GUIDED) >= 2


def test_store_truncate_stops_early_with_same_maps(models, odd_case, captured):
    _, ours, _ = models
    x, t, ctx, _, _ = odd_case
    full, _ = captured
    trunc = AttentionStore(GUIDED, truncate=True)
    ran = []
    hooks = [m.register_forward_hook(lambda *a, _n=n: ran.append(_n))
             for n, m in [("up_blocks.3", ours.up_blocks[3]), ("conv_out", ours.conv_out)]]
    try:
        with torch.no_grad():
            assert ours(x, t, ctx, store=trunc) is None
    finally:
        for hk in hooks:
            hk.remove()
    assert ran == []  # nothing after up_blocks.2 ran
    assert set(trunc.maps) == set(GUIDED)
    for path in GUIDED:
        # measured 0 (the same ops); 1e-6: fp32 round-off
        assert (trunc.maps[path] - full.maps[path]).abs().max() <= 1e-6, path


# -----------------------------------------------------------------------------
# fp16 variant

def test_fp16_variant_is_picked(zoo, tmp_path):
    """With both files present, dtype=fp16 reads the .fp16 file (written by diffusers, with negated
    values so the two files are distinguishable); dtype=fp32 reads the full file."""
    ref, _, _ = zoo(64)
    other = copy.deepcopy(ref).half()
    with torch.no_grad():
        for p in other.parameters():
            p.neg_()
    other.save_pretrained(tmp_path, safe_serialization=True, variant="fp16")
    ref.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    m16 = UNet3D.from_pretrained(str(tmp_path), dtype=torch.float16)
    m32 = UNet3D.from_pretrained(str(tmp_path), dtype=torch.float32)
    want16, want32 = other.state_dict(), ref.state_dict()
    sd16, sd32 = m16.state_dict(), m32.state_dict()
    assert set(sd16) == set(want16) and set(sd32) == set(want32)
    assert all(v.dtype == torch.float16 for v in sd16.values())
    assert all(v.dtype == torch.float32 for v in sd32.values())
    assert all(torch.equal(sd16[k], want16[k]) for k in sd16)
    assert all(torch.equal(sd32[k], want32[k]) for k in sd32)
    assert torch.equal(sd16["conv_in.weight"], -want32["conv_in.weight"].half())  # the fp16 file, not a cast


# -----------------------------------------------------------------------------
# the guidance gradient against the official pass run on diffusers

def test_guidance_gradient_equals_the_official_pass_on_diffusers(zoo):
    """lvd's guidance pass (truncated after the last guided layer, SDPA outside the six layers) gives the
    gradient of the official recipe run on diffusers' UNet: explicit probabilities from
    `Attention.get_attention_scores` in the six layers, full forward, graph kept (scripts/official_guidance.py,
    which bench.py times as the official approach)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import attention as A
    from official_guidance import install, official_pass
    ref, ours, _ = zoo(64)
    ref = copy.deepcopy(ref).requires_grad_(False)  # its processors change: keep the shared fixture as it was
    maps = install(ref)
    f, h, w = 3, 16, 24
    x, ctx = inputs(1, f, h, w, seed=5)
    boxes = [[(0.0, 0.5 - 0.1 * k, 0.4, 0.9 - 0.1 * k) for k in range(f)],  # moves up
             [(0.55, 0.1, 0.95, 0.45)] * (f - 1) + [(0, 0, 0, 0)]]  # absent in the last frame
    masks, positions = A.layer_masks(boxes, (h, w)), [[2], [4, 5]]
    params = A.GuidanceParams(loss_scale=5.0)  # the benchmark energy, CoM terms on
    g_ref = official_pass(ref, maps, x, 974, ctx, masks, positions, params)
    assert set(maps) == set(GUIDED)
    loss, g = A.LatentGuidance(ours, ctx, masks, positions, None, params).loss_and_grad(x, 974)
    loss_ref = A.energy(maps, masks, positions, params).detach()
    assert abs(float(loss) - float(loss_ref)) <= 1e-6 * float(loss_ref)  # measured 0 (CPU, fp32)
    print(f"guidance gradient vs the official pass on diffusers: rel L2 {rel_err(g, g_ref):.2e}")
    assert g_ref.abs().max() > 0 and rel_err(g, g_ref) <= TOL, rel_err(g, g_ref)  # measured 0 (CPU, fp32)

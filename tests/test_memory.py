"""fast/memory.py: the convolutions that keep no input, the recompute of cheap work, the mode names, and the
memory modes of the guidance pass (`fast.apply(unet, memory=...)`, without kernels or channels-last: each part
works alone).

Oracles: PyTorch's own autograd on nn.functional.conv2d / conv3d and on the plain function (same gradients,
bit for bit on the CPU); `torch.autograd.graph.saved_tensors_hooks` for what each node keeps; the reference UNet's
untruncated forward with autograd written out (the official recipe) for the modes' gradients.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import attention as A
import fast
from fast.memory import Conv2d, Conv3d, checkpoint_mode, recompute
from sampler import NoiseSchedule
from guidance_case import POSITIONS, SCHEDULE, guided_calls, official_loss_and_grad, tiny_unet
from guidance_case import setup as _setup

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def kept(fn, x):
    """(output, storages autograd keeps for the backward, as data pointers)."""
    ptrs = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: ptrs.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        y = fn(x)
    return y, set(ptrs)


@pytest.mark.parametrize("make, shape", [
    (lambda: Conv2d(6, 8, 3, padding=1), (2, 6, 9, 7)),
    (lambda: Conv2d(6, 6, 3, stride=2, padding=1), (2, 6, 9, 7)),   # Downsample2D, odd sizes
    (lambda: Conv2d(6, 8, 1), (3, 6, 5, 5)),                         # conv_shortcut
    (lambda: Conv3d(6, 6, (3, 1, 1), padding=(1, 0, 0)), (2, 6, 4, 5, 3)),  # TemporalConvLayer
], ids=["3x3", "3x3-stride2", "1x1", "3x1x1"])
def test_frozen_convolutions_keep_no_input_and_give_the_same_gradient(make, shape):
    torch.manual_seed(0)
    conv = make().requires_grad_(False)
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn_like(conv(x))
    ref_fn = F.conv2d if isinstance(conv, Conv2d) else F.conv3d
    ref = lambda x: ref_fn(x, conv.weight, conv.bias, conv.stride, conv.padding)
    y_ref, kept_ref = kept(ref, x)
    y, kept_ours = kept(conv, x)
    assert torch.equal(y, y_ref)
    assert x.untyped_storage().data_ptr() in kept_ref  # PyTorch's node keeps the input ...
    assert kept_ours == set()  # ... ours keeps nothing
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    (gx,) = torch.autograd.grad(y, x, g)
    assert gx.shape == x.shape and torch.equal(gx, gx_ref)


def test_convolutions_with_trainable_weights_use_the_ordinary_node():
    conv = Conv2d(4, 4, 3, padding=1)  # weights require grad: the weight gradient needs the input
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    y, kept_ours = kept(conv, x)
    assert x.untyped_storage().data_ptr() in kept_ours
    y.sum().backward()
    assert conv.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_recompute_keeps_only_its_input_and_gives_the_same_gradient():
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(2, 6).requires_grad_(False)
    fn = lambda x: F.silu(norm(x))
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    y_ref, kept_ref = kept(fn, x)
    y, kept_ours = kept(lambda x: recompute(fn, x, cheap=True), x)
    assert torch.equal(y, y_ref)
    assert len(kept_ref) >= 2 and kept_ours == {x.untyped_storage().data_ptr()}  # GN's input only, not its output
    g = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])
    with torch.no_grad():  # without a graph (the CFG step) it is the plain function
        assert torch.equal(recompute(fn, x, cheap=True), fn(x))


def test_checkpoint_mode_names():
    assert checkpoint_mode(False) == checkpoint_mode("off") == checkpoint_mode(None) == (False, False)
    assert checkpoint_mode("cheap") == (False, True)
    assert checkpoint_mode(True) == checkpoint_mode("full") == (True, False)
    with pytest.raises(ValueError, match="'off', 'cheap' or 'full'"):
        checkpoint_mode("half")


# -----------------------------------------------------------------------------
# the memory modes of the guidance pass

@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.mark.parametrize("mode", ["off", "cheap", "full", True])
def test_memory_modes_give_the_official_gradient(unet, mode):
    x, cond, masks = _setup(3, 16, 16)
    t, params = 974, A.GuidanceParams(loss_scale=5.0)
    ref_loss, ref_g = official_loss_and_grad(unet, x, t, cond, masks, params)
    scale = ref_g.abs().max()
    fast_unet = fast.apply(copy.deepcopy(unet), memory=mode, kernels=None, channels_last=False)
    guide = A.LatentGuidance(fast_unet, cond, masks, POSITIONS, NoiseSchedule.from_config(SCHEDULE), params)
    (loss, g), calls = guided_calls(fast_unet, lambda: guide.loss_and_grad(x, t))
    full = mode in ("full", True)  # with full checkpointing each layer is recomputed in the backward
    assert len(calls) == (12 if full else 6), mode
    # fp32 sums in another order: measured ≤ 2e-7 relative (loss) and ≤ 1e-7 of the largest entry (gradient)
    # earlier, 0 here (CPU, all four modes); 1e-6 = 5x
    assert abs(float(loss) - ref_loss) <= 1e-6 * ref_loss
    assert (g - ref_g).abs().max() <= 1e-6 * scale, (mode, float((g - ref_g).abs().max() / scale))
    x_new, _ = guide.step(x, t)
    alpha_bar = float(torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)[t])
    assert torch.allclose(x_new, x - math.sqrt(1 - alpha_bar) * ref_g, atol=1e-6 * scale)  # measured 0 (CPU, fp32)


def saved_bytes(unet, x, cond, masks, mode):
    """Bytes of the activations one guidance pass keeps for its backward (weights excluded), and the gradient."""
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    store = A.AttentionStore(A.GUIDED_LAYERS, truncate=True)
    z = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(z, 974, cond, store=store, checkpoint=mode)
        loss = A.energy(store.maps, masks, POSITIONS, A.GuidanceParams())
    return sum(seen.values()), torch.autograd.grad(loss, z)[0]


def test_cheap_recompute_keeps_less_for_the_backward(unet):
    """'cheap' drops the saved outputs of GroupNorm -> SiLU and of GEGLU's gate (recomputed in the backward):
    counted on the full config, 15.71 -> 11.95 GiB at 576x320x24 (results/perf-notes.md)."""
    x, cond, masks = _setup(3, 16, 16)
    fast_unet = fast.apply(copy.deepcopy(unet), kernels=None, channels_last=False)
    off, g_off = saved_bytes(fast_unet, x, cond, masks, "off")
    cheap, g_cheap = saved_bytes(fast_unet, x, cond, masks, "cheap")
    full, g_full = saved_bytes(fast_unet, x, cond, masks, "full")
    # measured 0 (CPU, fp32); 1e-6: fp32 round-off
    assert torch.equal(g_cheap, g_off) and (g_full - g_off).abs().max() <= 1e-6 * g_off.abs().max()
    assert cheap <= 0.85 * off, (cheap, off)  # measured 0.79 on this config (deterministic: a byte count)
    assert full <= 0.5 * cheap, (full, cheap)  # measured 0.04
    with pytest.raises(ValueError, match="'off', 'cheap' or 'full'"):
        fast.apply(fast_unet, memory="half")

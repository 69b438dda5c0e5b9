"""The guidance case shared by tests/test_guidance.py (the reference) and tests/test_memory.py (the fast layer's
memory modes): a tiny UNet, two objects (one moving up, one leaving in the last frame), the official recipe as the
oracle, and a count of the guided layers' forward calls."""
import torch

import attention as A
from unet3d import UNet3D, UNet3DConfig

SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # ModelScope's DDIM config (§5)
POSITIONS = [[2], [4, 5]]  # object 0 on one token, object 1 on two


def tiny_unet():
    torch.manual_seed(0)
    return UNet3D(UNet3DConfig(block_out_channels=(64, 64, 128, 128), cross_attention_dim=32)).eval().requires_grad_(False)


def setup(f, h, w, dtype=torch.float32, seed=3):
    """-> latents x (1, 4, f, h, w), a conditional embedding (1, 77, 32), the two objects' `layer_masks`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, f, h, w, generator=g, dtype=dtype)
    cond = torch.randn(1, 77, 32, generator=g, dtype=dtype)
    gone = [(0.55, 0.1, 0.95, 0.45)] * (f - 1) + [(0, 0, 0, 0)]  # object 1 leaves in the last frame
    boxes = [[(0.0, 0.5 - 0.1 * k, 0.4, 0.9 - 0.1 * k) for k in range(f)], gone]  # object 0 moves up
    return x, cond, A.layer_masks(boxes, (h, w))


def official_loss_and_grad(unet, x, t, cond, masks, params):
    """The official recipe: full UNet forward (no truncation, no checkpointing), energy, autograd."""
    z = x.detach().clone().requires_grad_(True)
    store = A.AttentionStore(A.GUIDED_LAYERS)  # truncate=False: up_blocks.3 and conv_out run too
    with torch.enable_grad():
        out = unet(z, t, cond, store=store)
        assert out is not None
        loss = A.energy({p: store.maps[p] for p in A.GUIDED_LAYERS}, masks, POSITIONS, params)
        (g,) = torch.autograd.grad(params.loss_scale * loss, z)
    return float(loss.detach()), g


def guided_calls(unet, fn):
    """(fn(), the paths of the guided layers' forward calls during it, in order)."""
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append(m.path)) for m in unet.modules()
             if getattr(m, "path", None) in A.GUIDED_LAYERS]
    try:
        return fn(), calls
    finally:
        for hk in hooks:
            hk.remove()

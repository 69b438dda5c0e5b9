"""The official LVD guidance pass, reproduced on diffusers' UNet3DConditionModel (a benchmark reference).

What to read: `lvd-method.md` §4.2 (explicit fp16 probabilities in the six guided layers, fused SDPA elsewhere),
§4.6 (a full UNet forward with the conditional embedding only, graph kept, `torch.autograd.grad` to the latents).

Official implementation: TonyLianLong/LLM-groundedVideoDiffusion @22d90d2, models/attention_processor.py
(the explicit path of the guided `attn2` layers) and models/pipelines.py `latent_backward_guidance`, which run
a modified copy of diffusers' UNet3DConditionModel. Here the current diffusers model stands in for that copy:
the six guided layers get a processor that materialises softmax(QKᵀ/√64) with `Attention.get_attention_scores`
(fp16, no upcast) and keeps it; every other attention runs `AttnProcessor2_0` (SDPA).

Differences: none intended in the work done; the energy is lvd's `attention.energy` (tested against the
official formula in tests/test_guidance.py). Test-only: needs diffusers.
"""
import torch

import attention


class CaptureProcessor:
    """diffusers attention processor: explicit probabilities, stored in `maps[path]` as (b, n, q, l)."""

    def __init__(self, maps, path):
        self.maps, self.path = maps, path

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # b q (n e) -> (b n) q e
        k = attn.head_to_batch_dim(attn.to_k(ctx))
        v = attn.head_to_batch_dim(attn.to_v(ctx))
        probs = attn.get_attention_scores(q, k, None)  # (b n) q l, fp16 softmax as the official
        self.maps[self.path] = probs.unflatten(0, (-1, attn.heads))  # (b n) q l -> b n q l
        out = attn.batch_to_head_dim(torch.bmm(probs, v))  # (b n) q e -> b q (n e)
        return attn.to_out[1](attn.to_out[0](out))


def install(ref_unet):
    """Give the six guided layers of a diffusers UNet3DConditionModel the capture processor; returns the map dict."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    maps, procs = {}, {}
    for name in ref_unet.attn_processors:
        path = name[: -len(".processor")]
        procs[name] = CaptureProcessor(maps, path) if path in attention.GUIDED_LAYERS else AttnProcessor2_0()
    ref_unet.set_attn_processor(procs)
    return maps


def official_pass(ref_unet, maps, x, t, cond, masks, token_positions, params):
    """One official guidance pass: full forward (output discarded), graph kept, g = ∇_z(s·L)."""
    maps.clear()
    with torch.enable_grad():
        z = x.detach().requires_grad_(True)
        ref_unet(z, t, encoder_hidden_states=cond)
        loss = attention.energy({p: maps[p] for p in attention.GUIDED_LAYERS}, masks, token_positions, params)
        return torch.autograd.grad(params.loss_scale * loss, z)[0]

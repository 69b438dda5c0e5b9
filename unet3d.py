"""The ModelScope text-to-video 3D UNet (1.41 B parameters), written to load the published weights.

What to read: `modelscope-architecture.md` §3 (config and the head-count quirk), §4 (forward pass,
block internals, eps values), §6 (checkpoint keys).

Official implementation: src/diffusers/models/unets/unet_3d_condition.py (`UNet3DConditionModel`),
unets/unet_3d_blocks.py, resnet.py (`ResnetBlock2D`, `TemporalConvLayer`, `Downsample2D`, `Upsample2D`) in
huggingface/diffusers v0.42.1 (the transformers: unet_transformers.py); originally `UNetSD` in
modelscope/.../video_synthesis/unet_sd.py.

Differences:
- The module tree spells the diffusers checkpoint keys, so loading is strict with no rename table.
- Every attention goes through `attention.attend`; an explicit `AttentionStore` passed to `forward`
  captures chosen cross-attention maps (LVD) and can stop the forward after the last one.
- For a pass with a graph (LVD guidance) the convolutions keep no input, and `checkpoint` picks how much
  more is recomputed in the backward instead of kept (memory.py); without a graph nothing changes.
- Activations are channels-last ((b f) h w c in memory, b f h w c for the 5-D folds), as are the convolution
  weights (`channels_last_`), so cuDNN, the folds and the token reshapes need no transposes; diffusers is NCHW.
- `fuse_` swaps GroupNorm→SiLU (with the time-embedding add folded in), LayerNorm and GEGLU's gate for fused
  kernels (fused.py); off by default, on in lvd.generate's fast path. Same math, fp32 inside.
- A context batch k times the latent batch runs the text-independent prefix once per latent (`forward`): the
  CFG step passes its one latent with [negative, positive]; diffusers repeats the latent and runs it all twice.
- No attention mask (diffusers accepts one and ignores it), no class labels, no LoRA / processors.
- Inference only: dropout modules are kept so the keys keep their Sequential indices
  (`conv2.3`), and the model is always used in eval mode.

Glossary: b (batch), f (frames), c (channels), h, w (latent height, width), l (77 text tokens),
d (inner width), n (heads), e (head dim, 64). Frames fold into the batch frame-major: row b·f + f.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import fused
from memory import (Conv2d, Conv3d, GroupNorm, batch_to_frames, checkpoint_mode, frames_to_batch, group_norm,
                    memory_format, recompute, run_maybe_checkpointed)
from unet_transformers import Attention, Transformer2DModel, TransformerTemporalModel
from weights.checkpoint import config_from_json, load_module, pick_weights_file


@dataclass
class UNet3DConfig:
    """Fields are the keys of unet/config.json (§3.1); values are the 1.7B defaults."""
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple = ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
    up_block_types: tuple = ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2            # down blocks have 2 resnets, up blocks 2 + 1
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5               # resnets, temporal convs, conv_norm_out (transformer norms: 1e-6)
    cross_attention_dim: int = 1024
    # The quirk (§3.2): diffusers passes this value on as the blocks' *head count* argument, which
    # the blocks use as the head *width*: every attention has head dim 64 and C / 64 heads.
    # transformer_in alone has 8 heads of this width (inner 512).
    attention_head_dim: int = 64
    num_attention_heads: int = None      # when set, it replaces attention_head_dim above
    sample_size: int = None              # unused; 32 (256 px) in the 1.7B file, null in a fresh diffusers config
    time_cond_proj_dim: int = None

    @property
    def head_dim(self):
        return self.num_attention_heads or self.attention_head_dim

    def validate(self):
        """Return a message for a config this implementation cannot build, else None."""
        down = {"CrossAttnDownBlock3D", "DownBlock3D"}
        up = {"CrossAttnUpBlock3D", "UpBlock3D"}
        if any(t not in down for t in self.down_block_types) or any(t not in up for t in self.up_block_types):
            return f"unknown block types {self.down_block_types} / {self.up_block_types}"
        if not len(self.down_block_types) == len(self.up_block_types) == len(self.block_out_channels):
            return "down_block_types, up_block_types and block_out_channels must have equal lengths"
        if self.act_fn != "silu" or self.time_cond_proj_dim is not None:
            return f"unsupported act_fn {self.act_fn!r} or time_cond_proj_dim {self.time_cond_proj_dim!r}"
        for c in self.block_out_channels:
            if c % self.head_dim or c % self.norm_num_groups:
                return (f"block_out_channels {list(self.block_out_channels)}: each must be a multiple of the head dim "
                        f"{self.head_dim} and of norm_num_groups {self.norm_num_groups}")
        return None


# -----------------------------------------------------------------------------
# embeddings

def timestep_embedding(t, dim):
    """Sinusoidal embedding [cos, sin] (flip_sin_to_cos=True, shift 0), float32 (§4.2). t (b,) -> (b, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


# -----------------------------------------------------------------------------
# layers

class TimestepEmbedding(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.linear_1 = nn.Linear(c_in, c_out)
        self.linear_2 = nn.Linear(c_out, c_out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def norm_silu(norm, x, cheap=False, add=None, keep=False):
    """SiLU(norm(x + add)), add (n, c) broadcast over h, w (or None). Under `cheap` (a pass with a graph) the
    output is recomputed in the backward instead of kept; the fused kernel (fused.py) keeps only x by itself.
    With `keep` -> (x, y): x to read for the residual add (fused: its gradient joins the norm's backward kernel)."""
    y = None if norm.fused is None else norm.fused.group_norm(norm, x, silu=True, add=add, keep=keep)
    if y is not None:
        return y
    x0 = x
    if add is not None:
        x = x + add.view(*add.shape, *[1] * (x.dim() - 2))  # (n, c) -> (n, c, 1, ...)
    eager = lambda x: F.silu(group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps))  # GroupNorm's own path
    y = recompute(eager, x, cheap)
    return (x0, y) if keep else y


def _bias_sum(a, b):
    f = torch.promote_types(a.dtype, torch.float32)
    return (a.to(f) + b.to(f)).to(a.dtype)  # rounded once


class ResnetBlock2D(nn.Module):
    """GN-SiLU-conv, + time embedding, GN-SiLU-conv, + shortcut (§4.5). Also the VAE's resnet (temb_channels=None)."""

    def __init__(self, c_in, c_out, temb_channels=None, groups=32, eps=1e-5):
        super().__init__()
        self.norm1 = GroupNorm(groups, c_in, eps=eps)
        self.conv1 = Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, c_out) if temb_channels else None
        self.norm2 = GroupNorm(groups, c_out, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = Conv2d(c_in, c_out, 1) if c_in != c_out else None
        self._temb_bias = fused.Folded(_bias_sum)  # fused: time_emb_proj's bias + conv1's

    def forward(self, x, temb=None, cheap=False):
        """x (n, c_in, h, w), temb (n, temb_channels): SiLU of the time embedding (diffusers applies the SiLU in
        every resnet; the UNet applies it once) or None."""
        k = self.norm2.fused  # fused kernels: conv1's bias joins GN2's add, conv2's (and the shortcut's) the residual
        x, h = norm_silu(self.norm1, x, cheap, keep=True)  # x: the skip's input
        h = self.conv1(h, bias=k is None)
        p = self.time_emb_proj  # + the time embedding's projection, then GN2
        if k is None:
            add = None if p is None else p(temb)
        elif p is None:
            add = self.conv1.bias.expand(h.shape[0], -1)  # (n, c), not copied
        else:  # conv1's bias folded into the projection's
            add = F.linear(temb, p.weight, self._temb_bias(p.bias, self.conv1.bias))
        h = self.conv2(self.dropout(norm_silu(self.norm2, h, cheap, add)), bias=k is None)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x, bias=k is None)
        if k is None:
            return skip + h
        bias = self.conv2.bias if self.conv_shortcut is None else self.conv2.bias + self.conv_shortcut.bias
        return k.add(skip, h, bias)


class TemporalConvLayer(nn.Module):
    """Four (GN, SiLU, [Dropout 0.1], Conv3d (3,1,1)) stages over frames, residual (§4.6).

    The GroupNorm runs on the 5-D tensor: its statistics span all frames of a sample.
    """

    def __init__(self, c, groups=32):
        super().__init__()
        conv = lambda: Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0))
        self.conv1 = nn.Sequential(GroupNorm(groups, c), nn.SiLU(), conv())
        self.conv2 = nn.Sequential(GroupNorm(groups, c), nn.SiLU(), nn.Dropout(0.1), conv())
        self.conv3 = nn.Sequential(GroupNorm(groups, c), nn.SiLU(), nn.Dropout(0.1), conv())
        self.conv4 = nn.Sequential(GroupNorm(groups, c), nn.SiLU(), nn.Dropout(0.1), conv())

    def forward(self, x, f, cheap=False):
        x = batch_to_frames(x, f)  # (b f) c h w -> b c f h w
        k, bias = self.conv1[0].fused, None  # fused kernels: each conv's bias goes into the next op
        x, h = norm_silu(self.conv1[0], x, cheap, keep=True)  # x: the residual's input; stage[1] is SiLU
        for i, stage in enumerate((self.conv1, self.conv2, self.conv3, self.conv4)):  # GN, SiLU, [Dropout], Conv3d
            if i:
                h = norm_silu(stage[0], h, cheap, None if bias is None else bias.expand(h.shape[0], -1))
            for m in stage[2:-1]:
                h = m(h)
            h = stage[-1](h, bias=k is None)
            bias = None if k is None else stage[-1].bias
        return frames_to_batch(x + h if k is None else k.add(x, h, bias))  # b c f h w -> (b f) c h w


class Downsample2D(nn.Module):
    def __init__(self, c, padding=1):
        super().__init__()
        self.conv = Conv2d(c, c, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = Conv2d(c, c, 3, padding=1)

    def forward(self, x, size):
        """Nearest upsampling to `size` (×2, or the next skip's exact size for odd latents), then conv."""
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


# -----------------------------------------------------------------------------
# blocks: each layer is resnet -> temp_conv [-> attention -> temp_attention] (§4.4)

class UNetBlock3D(nn.Module):
    """One down or up block (with or without attention), or the mid block.

    Down blocks push one skip per layer and one after the downsampler; up blocks pop one skip per
    layer and concatenate [current, skip]; the mid block has one attention layer between 2 resnets.
    """

    def __init__(self, kind, resnet_io, c, cfg, temb, attn, sampler):
        super().__init__()
        self.kind = kind  # "down", "up" or "mid"
        groups, heads = cfg.norm_num_groups, c // cfg.head_dim
        self.resnets = nn.ModuleList([ResnetBlock2D(i, o, temb, groups, cfg.norm_eps) for i, o in resnet_io])
        self.temp_convs = nn.ModuleList([TemporalConvLayer(c, groups) for _ in resnet_io])
        n_attn = len(resnet_io) - (kind == "mid")
        if attn:
            self.attentions = nn.ModuleList(
                [Transformer2DModel(c, heads, cfg.cross_attention_dim, groups) for _ in range(n_attn)])
            self.temp_attentions = nn.ModuleList(
                [TransformerTemporalModel(c, heads, cfg.head_dim, groups) for _ in range(n_attn)])
        if sampler == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(c, cfg.downsample_padding)])
        elif sampler == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(c)])

    def _resnet(self, i, x, temb, f, ckpt, cheap):
        temb = temb[:x.shape[0]]  # before a shared prefix's split (UNet3D.forward) x has fewer rows than temb
        return run_maybe_checkpointed(lambda x: self.temp_convs[i](self.resnets[i](x, temb, cheap), f, cheap), ckpt, x)

    def _layer(self, i, x, temb, context, f, store, ckpt=False, cheap=False):
        x = self._resnet(i, x, temb, f, ckpt, cheap)
        if hasattr(self, "attentions") and i < len(self.attentions):
            x = repeat_batch(x, context.shape[0])  # the text enters here: a shared prefix ends (UNet3D.forward)
            x = run_maybe_checkpointed(lambda x: self.attentions[i](x, context, store, cheap), ckpt, x)
            if store is not None and store.done():
                return x
            x = run_maybe_checkpointed(lambda x: self.temp_attentions[i](x, f, store, cheap), ckpt, x)
        return x

    def forward(self, x, temb, context, f, skips, store=None, checkpoint=False):
        """Returns x; down blocks append to `skips`, up blocks pop from it. checkpoint: see `checkpoint_mode`."""
        ckpt, cheap = checkpoint_mode(checkpoint)
        if self.kind == "mid":
            x = self._layer(0, x, temb, context, f, store, ckpt, cheap)
            if store is not None and store.done():
                return x
            return self._resnet(1, x, temb, f, ckpt, cheap)
        for i in range(len(self.resnets)):
            if self.kind == "up":
                x = torch.cat([x, repeat_batch(skips.pop(), x.shape[0])], dim=1)  # current features first, then skip
            x = self._layer(i, x, temb, context, f, store, ckpt, cheap)
            if store is not None and store.done():
                return x
            if self.kind == "down":
                skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, size=skips[-1].shape[-2:])
        return x


def repeat_batch(x, rows):
    """x (r, ...) -> (rows, ...), [x, x, ...] (rows a multiple of r); the layout is kept. A no-op if r == rows."""
    return x if x.shape[0] == rows else torch.cat([x] * (rows // x.shape[0]))


# -----------------------------------------------------------------------------
# the UNet

class UNet3D(nn.Module):
    def __init__(self, cfg: UNet3DConfig):
        super().__init__()
        self.config = cfg
        ch, temb = cfg.block_out_channels, 4 * cfg.block_out_channels[0]
        L, groups = cfg.layers_per_block, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.transformer_in = TransformerTemporalModel(ch[0], 8, cfg.attention_head_dim, groups)
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            c_in, c = ch[max(i - 1, 0)], ch[i]
            io = [(c_in if j == 0 else c, c) for j in range(L)]
            sampler = "down" if i < len(ch) - 1 else None
            self.down_blocks.append(UNetBlock3D("down", io, c, cfg, temb, kind.startswith("CrossAttn"), sampler))
        self.mid_block = UNetBlock3D("mid", [(ch[-1], ch[-1])] * 2, ch[-1], cfg, temb, True, None)
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            prev, c, c_skip_in = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, len(ch) - 1)]
            # input of resnet j: x (prev for j = 0, else c) + the popped skip (c, or c_skip_in for the last)
            io = [((prev if j == 0 else c) + (c_skip_in if j == L else c), c) for j in range(L + 1)]
            sampler = "up" if i < len(ch) - 1 else None
            self.up_blocks.append(UNetBlock3D("up", io, c, cfg, temb, kind.startswith("CrossAttn"), sampler))
        self.conv_norm_out = GroupNorm(groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        for name, m in self.named_modules():
            if isinstance(m, Attention):
                m.path = name  # e.g. "up_blocks.2.attentions.2.transformer_blocks.0.attn2"
        self.channels_last_()

    def channels_last_(self, on=True):
        """Conv weights to channels_last (temporal: _3d) or NCHW (on=False), same keys; activations follow. -> self"""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[m.weight.ndim]
                m.weight.data = m.weight.data.contiguous(memory_format=fmt if on else torch.contiguous_format)
        return self

    def fuse_(self, on=True, kernels=None):
        """Fused GroupNorm(+SiLU), LayerNorm and GEGLU kernels (fused.py) in every such module where `on` and
        fused.available() (or with the `kernels` given); off: the eager modules. Same keys and values. -> self"""
        kernels = kernels or (fused.Kernels() if on and fused.available() else None)
        for m in self.modules():
            if hasattr(m, "fused"):
                m.fused = kernels if on else None
        return self

    def forward(self, sample, timestep, encoder_hidden_states, store=None, checkpoint=False):
        """sample (b, 4, f, h, w), timestep (b,) or scalar, encoder_hidden_states (B, l, d_ctx) -> (B, 4, f, h, w).

        B = k·b: each latent is run with k text rows (classifier-free guidance: one latent, the negative and the
        positive prompt), as if sample and timestep were repeated k times ([sample] * k). Everything before the
        first cross-attention (conv_in, transformer_in, down_blocks.0's first resnet and temporal conv) does not
        see the text, so it runs once per latent (the shared prefix), and the batch is repeated there.

        With an AttentionStore, the wanted cross-attention probabilities are captured; with
        store.truncate the forward stops after the last of them and returns None. `checkpoint` (for a pass with
        a graph) is 'off' (False), 'cheap' (norms and activations recomputed in the backward) or 'full' (True:
        each resnet+temporal conv and each transformer under activation checkpointing); same values and gradients.
        The activations are channels-last where conv_in's weight is (the default, `channels_last_`), else NCHW.
        """
        b, _, f, h, w = sample.shape
        B = encoder_hidden_states.shape[0]
        if B % b:
            raise ValueError(f"UNet3D: {B} text rows for {b} latents (needs a multiple)")
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b).repeat(B // b)  # (B,)
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(sample.dtype))
        temb = F.silu(temb).repeat_interleave(f, dim=0)  # every resnet's SiLU, once; B d -> (B f) d (the shared
        # prefix reads its first (b f) rows)
        context = encoder_hidden_states.repeat_interleave(f, dim=0)  # B l d -> (B f) l d
        cl = memory_format(self.conv_in.weight) == torch.channels_last  # see channels_last_
        sample = sample.contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)
        x = self.conv_in(frames_to_batch(sample))  # b c f h w -> (b f) c h w, in memory (b f) h w c (or NCHW)
        ckpt, cheap = checkpoint_mode(checkpoint)
        x = run_maybe_checkpointed(lambda x: self.transformer_in(x, f, cheap=cheap), ckpt, x)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, temb, context, f, skips, store, checkpoint)
            if store is not None and store.done():
                return None
        for block in [self.mid_block, *self.up_blocks]:
            x = block(x, temb, context, f, skips, store, checkpoint)
            if store is not None and store.done():
                return None
        x = self.conv_out(norm_silu(self.conv_norm_out, repeat_batch(x, B * f)))  # (a UNet with no cross-attention)
        return batch_to_frames(x, f).contiguous()  # (B f) c h w -> B c f h w

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None):
        """Read unet/config.json and diffusion_pytorch_model[.fp16].safetensors from `folder` (strict)."""
        cfg = config_from_json(UNet3DConfig, os.path.join(folder, "config.json"))
        path = pick_weights_file(folder, "diffusion_pytorch_model", dtype)
        return load_module(lambda: cls(cfg), path, device=device, dtype=dtype).channels_last_()  # file: NCHW

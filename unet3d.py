"""The ModelScope text-to-video 3D UNet (1.41 B parameters), written to load the published weights.

What to read: `modelscope-architecture.md` §3 (config and the head-count quirk), §4 (forward pass,
block internals, eps values), §6 (checkpoint keys); `lvd-method.md` §4.2-§4.3 (the maps LVD captures).

Official implementation: src/diffusers/models/unets/unet_3d_condition.py (`UNet3DConditionModel`),
unets/unet_3d_blocks.py, resnet.py (`ResnetBlock2D`, `TemporalConvLayer`, `Downsample2D`, `Upsample2D`) in
huggingface/diffusers v0.42.1 (the transformers: unet_transformers.py); originally `UNetSD` in
modelscope/.../video_synthesis/unet_sd.py.

This is the reference: plain PyTorch, one line a step of §4. The fast layer (`fast/`, `fast.apply(unet)`) swaps
in forwards with CUDA-graph-safe, fused and memory-saving versions of the same math; nothing here imports it.

Differences:
- The module tree spells the diffusers checkpoint keys, so loading is strict with no rename table.
- Every attention goes through `attention.attend`; an `AttentionStore` passed to `forward` captures chosen
  cross-attention maps (LVD) and, with `truncate`, stops the forward after the last of them (§4.6: the layers
  after it do not feed the energy).
- A context batch k times the latent batch repeats the latents k times (the CFG step passes one latent with
  [negative, positive] text); diffusers asks the caller to repeat them.
- No attention mask (diffusers accepts one and ignores it), no class labels, no LoRA / processors.
- Inference only: dropout modules are kept so the keys keep their Sequential indices (`conv2.3`), and the
  model is always used in eval mode.

Glossary: b (batch), f (frames), c (channels), h, w (latent height, width), l (77 text tokens),
d (inner width), n (heads), e (head dim, 64). Frames fold into the batch frame-major: row b·f + f.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet_transformers import Attention, Transformer2DModel, TransformerTemporalModel, batch_to_frames, frames_to_batch
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


class TimestepEmbedding(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.linear_1 = nn.Linear(c_in, c_out)
        self.linear_2 = nn.Linear(c_out, c_out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# -----------------------------------------------------------------------------
# layers

class ResnetBlock2D(nn.Module):
    """GN-SiLU-conv, + time embedding, GN-SiLU-conv, + shortcut (§4.5). Also the VAE's resnet (temb_channels=None)."""

    def __init__(self, c_in, c_out, temb_channels=None, groups=32, eps=1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, c_out) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, temb=None):
        """x (n, c_in, h, w), temb (n, temb_channels) or None -> (n, c_out, h, w)."""
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (n, c) -> (n, c, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class TemporalConvLayer(nn.Module):
    """Four (GN, SiLU, [Dropout 0.1], Conv3d (3,1,1)) stages over frames, residual (§4.6).

    The GroupNorm runs on the 5-D tensor: its statistics span all frames of a sample.
    """

    def __init__(self, c, groups=32):
        super().__init__()
        conv = lambda: nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0))
        self.conv1 = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), conv())
        self.conv2 = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), nn.Dropout(0.1), conv())
        self.conv3 = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), nn.Dropout(0.1), conv())
        self.conv4 = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), nn.Dropout(0.1), conv())

    def forward(self, x, f):
        x = batch_to_frames(x, f)  # (b f) c h w -> b c f h w
        h = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        return frames_to_batch(x + h)  # b c f h w -> (b f) c h w


class Downsample2D(nn.Module):
    def __init__(self, c, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

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

    def layer(self, i, x, temb, context, f, store):
        """Layer i: resnet, temporal conv, and where the block has them, spatial and temporal transformers."""
        x = self.temp_convs[i](self.resnets[i](x, temb), f)
        if hasattr(self, "attentions") and i < len(self.attentions):
            x = self.attentions[i](x, context, store)
            if store is not None and store.done():
                return x
            x = self.temp_attentions[i](x, f, store)
        return x

    def forward(self, x, temb, context, f, skips, store=None):
        """Returns x; down blocks append to `skips`, up blocks pop from it."""
        if self.kind == "mid":
            x = self.layer(0, x, temb, context, f, store)
            if store is not None and store.done():
                return x
            return self.temp_convs[1](self.resnets[1](x, temb), f)
        for i in range(len(self.resnets)):
            if self.kind == "up":
                x = torch.cat([x, skips.pop()], dim=1)  # current features first, then the skip
            x = self.layer(i, x, temb, context, f, store)
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


# -----------------------------------------------------------------------------
# the UNet

class UNet3D(nn.Module):
    def __init__(self, cfg: UNet3DConfig):
        super().__init__()
        self.config = cfg
        ch, temb = cfg.block_out_channels, 4 * cfg.block_out_channels[0]
        L, groups = cfg.layers_per_block, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
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
        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        for name, m in self.named_modules():
            if isinstance(m, Attention):
                m.path = name  # e.g. "up_blocks.2.attentions.2.transformer_blocks.0.attn2"

    def forward(self, sample, timestep, encoder_hidden_states, store=None):
        """sample (b, 4, f, h, w), timestep (b,) or scalar, encoder_hidden_states (B, l, d_ctx) -> (B, 4, f, h, w).

        B = k·b: each latent is run with k text rows (classifier-free guidance: one latent, the negative and the
        positive prompt), the latents repeated k times. With an AttentionStore the wanted cross-attention
        probabilities are captured; with store.truncate the forward stops after the last of them and returns None.
        """
        b, _, f, h, w = sample.shape
        B = encoder_hidden_states.shape[0]
        if B % b:
            raise ValueError(f"UNet3D: {B} text rows for {b} latents (needs a multiple)")
        sample = sample.repeat(B // b, 1, 1, 1, 1)  # b c f h w -> B c f h w, [sample] * k
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b).repeat(B // b)  # (B,)
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(sample.dtype))
        temb = temb.repeat_interleave(f, dim=0)  # B d -> (B f) d
        context = encoder_hidden_states.repeat_interleave(f, dim=0)  # B l d -> (B f) l d
        x = self.conv_in(frames_to_batch(sample))  # B c f h w -> (B f) c h w
        x = self.transformer_in(x, f)
        skips = [x]
        for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            x = block(x, temb, context, f, skips, store)
            if store is not None and store.done():
                return None
        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return batch_to_frames(x, f)  # (B f) c h w -> B c f h w

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None):
        """Read unet/config.json and diffusion_pytorch_model[.fp16].safetensors from `folder` (strict)."""
        cfg = config_from_json(UNet3DConfig, os.path.join(folder, "config.json"))
        path = pick_weights_file(folder, "diffusion_pytorch_model", dtype)
        return load_module(lambda: cls(cfg), path, device=device, dtype=dtype)

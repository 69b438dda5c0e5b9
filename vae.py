"""The decoder half of the Stable Diffusion KL-VAE: latents (b, 4, h, w) -> images (b, 3, 8h, 8w).

What to read: `modelscope-architecture.md` §8 (config, decoder structure, keys and the legacy
attention names, decoding video latents) and §14 items 5 and 9 (eps 1e-6 everywhere; the mid
attention is one head of width C with biases and the residual inside).

Official implementation: huggingface/diffusers v0.42.1, src/diffusers/models/autoencoders/
autoencoder_kl.py (`AutoencoderKL.decode` / `_decode`), autoencoders/vae.py (`Decoder`),
unets/unet_2d_blocks.py (`UNetMidBlock2D`, `UpDecoderBlock2D`), attention_processor.py (`Attention`
with `residual_connection=True`, `AttnProcessor2_0`); the 1/scaling_factor and the frame folding
are `TextToVideoSDPipeline.decode_latents` (pipelines/deprecated/text_to_video_synthesis/
pipeline_text_to_video_synth.py). Originally `AutoencoderKL` in ModelScope's
text_to_video_synthesis/autoencoder.py (ch 128, ch_mult [1, 2, 4, 4]).

Differences:
- Decoder only: the module holds `post_quant_conv` and `decoder.*`; `encoder.*` and `quant_conv.*`
  in the file are dropped on purpose by the rename table (RENAMES), never loaded.
- One rename table accepts both spellings of the mid attention (legacy `query/key/value/proj_attn`
  of diffusers <= 0.15, and today's `to_q/to_k/to_v/to_out.0`).
- `decode` takes the *scaled* diffusion latents and multiplies by 1/scaling_factor itself (the one
  place where the factor is applied; in diffusers the pipeline does it), and always decodes in
  slices of `slice_size` images (diffusers' `enable_vae_slicing` with slice 1); rows are
  independent, so slicing changes only the numerics of batched kernels.
- No tiling, no SpatialNorm (MoVQ) decoder, no `shift_factor` / `latents_mean` (refused by
  `VAEConfig.validate`, since the text-to-video pipeline would ignore them).
- Output in [-1, 1] but not clamped: the caller clamps after x * 0.5 + 0.5 (§10).

Glossary: b (batch), f (frames), c (channels), h, w (latent height, width on input; the current
feature height, width inside the decoder), H, W (image height, width = 8h, 8w), n (images in a
slice), c_lat (latent channels, 4), c_out (image channels, 3). Frames fold into the batch frame-major: row b·f + f.
"""
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet_transformers import batch_to_frames, frames_to_batch
from unet3d import ResnetBlock2D, Upsample2D
from weights.checkpoint import config_from_json, load_module, pick_weights_file

EPS = 1e-6  # every GroupNorm in the VAE (resnets, mid attention, conv_norm_out), §8.2


@dataclass
class VAEConfig:
    """Fields are the keys of vae/config.json (§8.1); values are the 1.7B / Zeroscope defaults."""
    in_channels: int = 3                 # encoder input (image channels); unused by the decoder
    out_channels: int = 3                # decoded image channels
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4   # encoder only; not built here
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple = (128, 256, 512, 512)        # encoder order; the decoder runs reversed
    layers_per_block: int = 2            # the decoder's up blocks have layers_per_block + 1 resnets
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512               # image size the VAE was trained at; only used for tiling (not here)
    scaling_factor: float = 0.18215      # diffusion latents = scaling_factor * VAE latents
    shift_factor: float = None           # SD3/Flux-style VAEs only; must be absent or null here
    latents_mean: tuple = None           # ditto
    latents_std: tuple = None            # ditto
    force_upcast: bool = True            # never read by TextToVideoSDPipeline (§8.1): decode runs in the model dtype
    use_quant_conv: bool = True          # encoder side; quant_conv is dropped either way
    use_post_quant_conv: bool = True     # False: no post_quant_conv (identity)
    mid_block_add_attention: bool = True  # False: the mid block is just two resnets

    @property
    def upscale(self):
        """Image pixels per latent pixel: 2^(number of up blocks - 1) = 8 for the SD VAE."""
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self):
        """Return a message for a config this implementation cannot build, else None."""
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            return f"up_block_types {list(self.up_block_types)}: only UpDecoderBlock2D is supported"
        if len(self.up_block_types) != len(self.block_out_channels) or not self.block_out_channels:
            return (f"up_block_types ({len(self.up_block_types)}) and block_out_channels "
                    f"({len(self.block_out_channels)}) must have the same, non-zero length")
        if self.act_fn != "silu":
            return f"unsupported act_fn {self.act_fn!r} (only 'silu')"
        if any(c <= 0 or c % self.norm_num_groups for c in self.block_out_channels):
            return (f"block_out_channels {list(self.block_out_channels)}: each must be a positive multiple "
                    f"of norm_num_groups {self.norm_num_groups}")
        if self.layers_per_block < 0 or self.latent_channels <= 0 or self.out_channels <= 0:
            return "layers_per_block must be >= 0, latent_channels and out_channels > 0"
        if not self.scaling_factor > 0:
            return f"scaling_factor must be > 0, found {self.scaling_factor!r}"
        if self.shift_factor is not None or self.latents_mean is not None or self.latents_std is not None:
            return "shift_factor / latents_mean / latents_std are not supported (only 1/scaling_factor is applied)"
        return None


# -----------------------------------------------------------------------------
# the one rename table: file key -> module key (None = dropped on purpose); first match wins

_MID_ATTN = r"^(decoder\.mid_block\.attentions\.0)\."
RENAMES = (
    (r"^(encoder|quant_conv)\.", None),         # encoder half (and quant_conv): not needed to decode
    (_MID_ATTN + r"query\.", r"\1.to_q."),      # legacy AttentionBlock names (diffusers <= 0.15, §8.3)
    (_MID_ATTN + r"key\.", r"\1.to_k."),
    (_MID_ATTN + r"value\.", r"\1.to_v."),
    (_MID_ATTN + r"proj_attn\.", r"\1.to_out.0."),
)


def rename(key):
    """Map a checkpoint key through RENAMES; keys that match no rule are used as they are."""
    for pattern, target in RENAMES:
        if re.match(pattern, key):
            return None if target is None else re.sub(pattern, target, key)
    return key


# -----------------------------------------------------------------------------
# layers (the resnets are unet3d.ResnetBlock2D with eps 1e-6 and no time embedding)

class MidAttention(nn.Module):
    """x + to_out(softmax(q kᵀ / √c) v) over the h·w positions, q, k, v from GroupNorm(x); one head of width c."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=EPS)
        self.to_q = nn.Linear(c, c)   # biases on q, k, v (unlike the UNet's attentions)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # b c h w -> b (h w) c
        q, k, v = (p(t)[:, None] for p in (self.to_q, self.to_k, self.to_v))  # b (h w) c -> b 1 (h w) c
        t = F.scaled_dot_product_attention(q, k, v)[:, 0]  # softmax(q kᵀ / √c) v; b 1 (h w) c -> b (h w) c
        t = self.to_out[0](t).transpose(1, 2).reshape(b, c, h, w)  # b (h w) c -> b c h w
        # the residual is inside the attention module (§8.2). t first, as in diffusers: the sum keeps t's
        # strides, so the later kernels (and their roundoff) are diffusers' own (bit-equal in fp32 on CPU)
        return t + x


class MidBlock(nn.Module):
    """resnets.0 -> attentions.0 -> resnets.1 at the lowest resolution."""

    def __init__(self, c, groups, attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, None, groups, EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([MidAttention(c, groups)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class UpDecoderBlock(nn.Module):
    """layers_per_block + 1 resnets (the first changes c_in -> c), then nearest ×2 + conv unless last."""

    def __init__(self, c_in, c, n_layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(c_in if i == 0 else c, c, None, groups, EPS) for i in range(n_layers)])
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(c)])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, size=(2 * x.shape[-2], 2 * x.shape[-1]))  # b c h w -> b c 2h 2w
        return x


class Decoder(nn.Module):
    """conv_in -> mid_block -> up_blocks -> GroupNorm, SiLU, conv_out (§8.2)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups  # decoder order: widest first
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, upsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# -----------------------------------------------------------------------------
# the model: post_quant_conv + decoder, and the scaled / sliced / video entry points

class VAEDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        c = cfg.latent_channels
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None
        self.decoder = Decoder(cfg)

    def forward(self, z):
        """Unscaled VAE latents z (n, c_lat, h, w) -> images (n, c_out, 8h, 8w); one batch, no scaling.

        This is diffusers' `AutoencoderKL.decode(z).sample`.
        """
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, latents, slice_size=1):
        """Scaled diffusion latents (b, c_lat, h, w) -> images (b, c_out, 8h, 8w) in about [-1, 1], not clamped.

        The ONE place where 1/scaling_factor is applied. Decodes `slice_size` images at a time to bound
        memory (None: all at once). Runs in the module's dtype and device; the output keeps them.
        """
        p = self.decoder.conv_in.weight
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels or latents.shape[0] == 0:
            raise ValueError(f"VAEDecoder.decode: expected latents (b, {self.config.latent_channels}, h, w), "
                             f"found {tuple(latents.shape)}")
        if slice_size is not None and (not isinstance(slice_size, int) or slice_size < 1):
            raise ValueError(f"VAEDecoder.decode: slice_size must be a positive int or None, found {slice_size!r}")
        z = 1 / self.config.scaling_factor * latents.to(device=p.device, dtype=p.dtype)  # z = latents / 0.18215
        n = slice_size or max(len(z), 1)
        return torch.cat([self(z[i:i + n]) for i in range(0, len(z), n)], dim=0)

    def decode_video(self, latents, slice_size=1):
        """Scaled video latents (b, c_lat, f, h, w) -> video (b, c_out, f, 8h, 8w), float32, not clamped.

        Each frame is decoded on its own (a 2-D VAE, no temporal mixing), `slice_size` frames at a time;
        as `TextToVideoSDPipeline.decode_latents` (§8.4), including the final `.float()`.
        """
        if latents.ndim != 5 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"VAEDecoder.decode_video: expected latents (b, {self.config.latent_channels}, f, h, w), "
                             f"found {tuple(latents.shape)}")
        f = latents.shape[2]
        images = self.decode(frames_to_batch(latents), slice_size)  # b c f h w -> (b f) c h w -> (b f) c H W
        return batch_to_frames(images, f).float()  # (b f) c H W -> b c f H W

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None):
        """Read vae/config.json and diffusion_pytorch_model[.fp16].safetensors from `folder` (strict, via RENAMES)."""
        cfg = config_from_json(VAEConfig, os.path.join(folder, "config.json"))
        path = pick_weights_file(folder, "diffusion_pytorch_model", dtype)
        return load_module(lambda: cls(cfg), path, rename=rename, device=device, dtype=dtype)

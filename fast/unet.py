"""The fast forwards of the UNet's resnets, temporal convolutions, blocks and the UNet itself (`fast.apply` swaps
them into a loaded reference model, class by class; the parameters and keys stay the reference's).

What to read: unet3d.py (the reference these forwards equal: tests/test_fast_unet.py, tests/test_fused.py);
`modelscope-architecture.md` §4.4-§4.6; results/perf-notes.md (what each piece gave).

Official implementation: none; diffusers' `UNet3DConditionModel` is the reference's counterpart.

What these forwards add to the reference's math (same values; the tests hold each to 1e-5 fp32, 1e-10 float64):
- Memory modes for a pass with a graph (LVD guidance, `checkpoint`: 'off', 'cheap', 'full'; memory.py): the
  convolutions keep no input; 'cheap' recomputes norms and SiLU in the backward; 'full' checkpoints each
  resnet+temporal conv and each transformer.
- Channels-last activations ((b f) h w c in memory) where the convolution weights are channels-last.
- Fused kernels where `fused` is set (fused.py): GroupNorm→SiLU with the time embedding's add; each
  convolution's bias folded into the next fused op (the next GroupNorm's add or the residual add `Kernels.add`).
- The time embedding's SiLU once per forward, not in every resnet; conv1's bias folded into its projection's.
- The CFG step's shared prefix: with k text rows per latent, everything before the first cross-attention runs
  once per latent, and the batch is repeated where the text enters (`repeat_batch`).
"""
import torch
import torch.nn.functional as F

import unet3d
from fast import fused
from fast.memory import (batch_to_frames, checkpoint_mode, frames_to_batch, group_norm, memory_format, recompute,
                         run_maybe_checkpointed)
from unet3d import timestep_embedding


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


def bias_sum(a, b):
    f = torch.promote_types(a.dtype, torch.float32)
    return (a.to(f) + b.to(f)).to(a.dtype)  # rounded once


def repeat_batch(x, rows):
    """x (r, ...) -> (rows, ...), [x, x, ...] (rows a multiple of r); the layout is kept. A no-op if r == rows."""
    return x if x.shape[0] == rows else torch.cat([x] * (rows // x.shape[0]))


class ResnetBlock2D(unet3d.ResnetBlock2D):
    def forward(self, x, temb=None, cheap=False):
        """x (n, c_in, h, w), temb (n, temb_channels): SiLU of the time embedding (the reference applies the SiLU in
        every resnet; the fast UNet applies it once) or None."""
        k = self.norm2.fused  # fused kernels: conv1's bias joins GN2's add, conv2's (and the shortcut's) the residual
        x, h = norm_silu(self.norm1, x, cheap, keep=True)  # x: the skip's input
        h = self.conv1(h, bias=k is None)
        p = self.time_emb_proj  # + the time embedding's projection, then GN2
        if k is None:
            add = None if p is None else p(temb)
        elif p is None:
            add = self.conv1.bias.expand(h.shape[0], -1)  # (n, c), not copied
        else:  # conv1's bias folded into the projection's
            add = F.linear(temb, p.weight, fused.folded(self, "_temb_bias", bias_sum)(p.bias, self.conv1.bias))
        h = self.conv2(self.dropout(norm_silu(self.norm2, h, cheap, add)), bias=k is None)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x, bias=k is None)
        if k is None:
            return skip + h
        bias = self.conv2.bias if self.conv_shortcut is None else self.conv2.bias + self.conv_shortcut.bias
        return k.add(skip, h, bias)


class TemporalConvLayer(unet3d.TemporalConvLayer):
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


class UNetBlock3D(unet3d.UNetBlock3D):
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


class UNet3D(unet3d.UNet3D):
    memory = "off"  # fast.apply sets the memory mode of passes with a graph

    def forward(self, sample, timestep, encoder_hidden_states, store=None, checkpoint=None):
        """The reference's forward (unet3d.UNet3D.forward), with the shared prefix: B = k·b text rows for b latents
        run everything before the first cross-attention (conv_in, transformer_in, down_blocks.0's first resnet and
        temporal conv: they do not see the text) once per latent, and the batch is repeated there.

        `checkpoint` (for a pass with a graph): 'off', 'cheap' (norms and activations recomputed in the backward)
        or 'full' (each resnet+temporal conv and each transformer under activation checkpointing); None: the mode
        `fast.apply` set. Same values and gradients. The activations are channels-last where conv_in's weight is.
        """
        checkpoint = self.memory if checkpoint is None else checkpoint
        b, _, f, h, w = sample.shape
        B = encoder_hidden_states.shape[0]
        if B % b:
            raise ValueError(f"UNet3D: {B} text rows for {b} latents (needs a multiple)")
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b).repeat(B // b)  # (B,)
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(sample.dtype))
        temb = F.silu(temb).repeat_interleave(f, dim=0)  # every resnet's SiLU, once; B d -> (B f) d (the shared
        # prefix reads its first (b f) rows)
        context = encoder_hidden_states.repeat_interleave(f, dim=0)  # B l d -> (B f) l d
        cl = memory_format(self.conv_in.weight) == torch.channels_last
        sample = sample.contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)
        x = self.conv_in(frames_to_batch(sample))  # b c f h w -> (b f) c h w, in memory (b f) h w c (or NCHW)
        ckpt, cheap = checkpoint_mode(checkpoint)
        x = run_maybe_checkpointed(lambda x: self.transformer_in(x, f, cheap=cheap), ckpt, x)
        skips = [x]
        for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            x = block(x, temb, context, f, skips, store, checkpoint)
            if store is not None and store.done():
                return None
        x = self.conv_out(norm_silu(self.conv_norm_out, repeat_batch(x, B * f)))  # (a UNet with no cross-attention)
        return batch_to_frames(x, f).contiguous()  # (B f) c h w -> B c f h w

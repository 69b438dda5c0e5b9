"""The ModelScope UNet's transformers: the spatial one (tokens: the h·w positions of one frame) and the temporal one
(tokens: the f frames at one position), their BasicTransformerBlock, attention and GEGLU feed-forward.

What to read: `modelscope-architecture.md` §4.7 (temporal transformer), §4.8 (spatial transformer), §4.9 (the block);
`lvd-method.md` §4.2 (the cross-attention maps LVD reads: `attention.attend` and its `AttentionStore`).

Official implementation: huggingface/diffusers v0.42.1, src/diffusers/models/transformers/transformer_2d.py
(`Transformer2DModel`), transformers/transformer_temporal.py (`TransformerTemporalModel`), attention.py
(`BasicTransformerBlock`, `FeedForward`), activations.py (`GEGLU`), attention_processor.py (`Attention`).

The reference, as unet3d.py: the fast layer (fast/transformers.py) swaps in fused forwards of the same modules.

Differences:
- Every attention goes through `attention.attend` (PyTorch SDPA, or explicit probabilities where a store
  wants the map); the module tree spells the checkpoint keys (`to_out.0`, `ff.net.0.proj`, `ff.net.2`).
- No attention mask, no positional embedding (the temporal transformer of this model has none), inference only.

Glossary: b (batch), f (frames), c (channels), h, w (latent height, width), d (inner width), l (77 text tokens).
"""
import torch.nn as nn
import torch.nn.functional as F

from attention import attend


def frames_to_batch(x):
    """(b, c, f, h, w) -> (b·f, c, h, w), frame-major: row b·f + f."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # b c f h w -> (b f) c h w


def batch_to_frames(x, f):
    """(b·f, c, h, w) -> (b, c, f, h, w); the inverse of frames_to_batch."""
    bf, c, h, w = x.shape
    return x.reshape(bf // f, f, c, h, w).permute(0, 2, 1, 3, 4)  # (b f) c h w -> b c f h w


class Attention(nn.Module):
    """q, k, v without bias, `to_out.0` with bias; heads of width 64. `path` (its module name) is set by the
    UNet, so that an AttentionStore can ask for this module's probabilities."""

    def __init__(self, d, heads, context_dim=None):
        super().__init__()
        self.heads, self.path = heads, None
        self.to_q = nn.Linear(d, d, bias=False)
        self.to_k = nn.Linear(context_dim or d, d, bias=False)
        self.to_v = nn.Linear(context_dim or d, d, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(d, d), nn.Dropout(0.0)])

    def forward(self, x, context=None, store=None):
        """x (b, l, d), context (b, l_ctx, d_ctx) or None (self-attention) -> (b, l, d)."""
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out[0](attend(q, k, v, self.heads, store, self.path))


class GEGLU(nn.Module):
    def __init__(self, d, inner):
        super().__init__()
        self.proj = nn.Linear(d, 2 * inner)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)  # first half value, second half gate
        return value * F.gelu(gate)  # exact GELU


class FeedForward(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(d, 4 * d), nn.Dropout(0.0), nn.Linear(4 * d, d)])

    def forward(self, x):
        return self.net[2](self.net[1](self.net[0](x)))


class BasicTransformerBlock(nn.Module):
    """x += attn1(LN1 x); x += attn2(LN2 x, context); x += FF(LN3 x) (§4.9).

    Temporal blocks (context_dim None) use attn2 as a second self-attention (double_self_attention).
    """

    def __init__(self, d, heads, context_dim=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn1 = Attention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.attn2 = Attention(d, heads, context_dim)
        self.norm3 = nn.LayerNorm(d)
        self.ff = FeedForward(d)

    def forward(self, x, context=None, store=None):
        x = x + self.attn1(self.norm1(x), store=store)
        x = x + self.attn2(self.norm2(x), context, store=store)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer, per frame: tokens are the h·w positions of one frame (§4.8)."""

    def __init__(self, c, heads, context_dim, groups=32):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.proj_in = nn.Linear(c, c)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(c, heads, context_dim)])
        self.proj_out = nn.Linear(c, c)

    def forward(self, x, context, store=None):
        bf, c, h, w = x.shape
        t = self.norm(x).permute(0, 2, 3, 1).reshape(bf, h * w, c)  # (b f) c h w -> (b f) (h w) c
        t = self.proj_out(self.transformer_blocks[0](self.proj_in(t), context, store))
        t = t.reshape(bf, h, w, c).permute(0, 3, 1, 2)  # (b f) (h w) c -> (b f) c h w
        return x + t


class TransformerTemporalModel(nn.Module):
    """Temporal transformer: tokens are the f frames at one pixel, no positional embedding (§4.7).

    The GroupNorm runs on the 5-D tensor: its statistics span all frames of a sample."""

    def __init__(self, c, heads, head_dim, groups=32):
        super().__init__()
        d = heads * head_dim
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.proj_in = nn.Linear(c, d)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(d, heads)])
        self.proj_out = nn.Linear(d, c)

    def forward(self, x, f, store=None):
        bf, c, h, w = x.shape
        b = bf // f
        x = batch_to_frames(x, f)  # (b f) c h w -> b c f h w
        t = self.norm(x).permute(0, 3, 4, 2, 1).reshape(b * h * w, f, c)  # b c f h w -> (b h w) f c
        t = self.proj_out(self.transformer_blocks[0](self.proj_in(t), store=store))
        t = t.reshape(b, h, w, f, c).permute(0, 4, 3, 1, 2)  # (b h w) f c -> b c f h w
        return frames_to_batch(x + t)  # b c f h w -> (b f) c h w

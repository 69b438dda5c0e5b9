"""The fast forwards of the UNet's transformers, their block, attention and GEGLU (`fast.apply` swaps them in).

What to read: unet_transformers.py (the reference these forwards equal: tests/test_fused.py); fused.py (the
kernels and `add_linear`); results/perf-notes.md.

Official implementation: none beyond the reference's (diffusers' `Transformer2DModel`, `TransformerTemporalModel`,
`BasicTransformerBlock`, `Attention`, `GEGLU`).

What these forwards add to the reference's math (same values):
- The token reshapes are views of the channels-last activations. The temporal transformer keeps its tokens as
  (b, f, h·w, c) where `fused` is set, with no permute to (b h w) f c and back: its attention reads each
  position's f frames in place (the Triton kernel of kernels_attention.py); unfused, one copy in.
- GroupNorm, LayerNorm and GEGLU's gate take the fused kernels where `fused` is set, and under 'cheap' GEGLU's
  gate is recomputed in the backward (memory.recompute).
- Fused blocks: each residual add runs inside its matrix product (`fused.add_linear`: x + a·Wᵀ, cuBLAS's
  C + A·B), without the output biases of attn1, attn2 and ff.net.2; the next LayerNorm adds the biases before it,
  and the block returns x less all three, which the transformer's proj_out folds into its bias (`project_out`).
  In a backward each residual's gradient joins the LayerNorm's backward kernel (`keep`).
- A self-attention's q, k, v (a cross-attention's k, v) as one product with the weights concatenated (`_joined`).

The `fused.Folded` caches of frozen-weight sums and joins live on each module (`fused.folded`).
"""
import torch
import torch.nn.functional as F

import unet_transformers as ref
from attention import attend
from fast import fused
from fast.memory import batch_to_frames, frames_to_batch, recompute


class Attention(ref.Attention):
    """x (b, l, d): attention over the l tokens (`attend`). x (b, f, p, d): a temporal transformer's in-place
    tokens (set only with `fused`), attended over the f frames at each of the p positions."""
    fused = None  # a fused.Kernels (fast.apply)

    def forward(self, x, context=None, store=None):
        return self.to_out[0](self.core(x, context, store))

    def projections(self, x, context=None):
        """q, k, v. Fused: a self-attention's three products as one, with the weights concatenated (q, k, v are
        then views, rows 3·d apart, which SDPA and the frame kernels read in place); a cross-attention's k, v too."""
        if self.fused is None:
            context = x if context is None else context
            return self.to_q(x), self.to_k(context), self.to_v(context)
        d = self.to_q.out_features
        if context is None:
            return self._qkv(x).split(d, dim=-1)
        return (self.to_q(x), *F.linear(context, self._joined(self.to_k.weight, self.to_v.weight)).split(d, dim=-1))

    def _qkv(self, x):
        """Fused self-attention: the one product q | k | v (..., 3·d)."""
        return F.linear(x, self._joined(self.to_q.weight, self.to_k.weight, self.to_v.weight))

    def _joined(self, *weights):
        """The projections' weights concatenated, (3·d, d) or (2·d, d_ctx): a fused.Folded, recomputed on a change."""
        return fused.folded(self, "_joined_weights", lambda *ws: torch.cat(ws))(*weights)

    def core(self, x, context=None, store=None):
        """The attention before `to_out`: the heads' outputs (..., d)."""
        if x.ndim == 4 and not (store is not None and store.wants(self.path)):  # in-place temporal tokens
            return self.fused.frame_attention(self._qkv(x), self.heads)  # (self-attention: context is None)
        q, k, v = self.projections(x, context)
        if x.ndim == 3:
            return attend(q, k, v, self.heads, store, self.path)
        return fused.frame_attention(q, k, v, self.heads, store, self.path)  # a temporal map to capture: folded


class GEGLU(ref.GEGLU):
    fused = None  # a fused.Kernels (fast.apply): the gate as one fused kernel

    def forward(self, x, cheap=False):
        if self.fused is not None:
            return self.fused.geglu(self.proj(x))
        def gated(h):
            value, gate = h.chunk(2, dim=-1)  # first half value, second half gate (exact GELU)
            return value * F.gelu(gate)
        return recompute(gated, self.proj(x), cheap)


class FeedForward(ref.FeedForward):
    def forward(self, x, cheap=False):
        return self.net[2](self.hidden(x, cheap))

    def hidden(self, x, cheap=False):
        """The gated hidden layer (..., 4d), before `net.2`."""
        return self.net[1](self.net[0](x, cheap))


class BasicTransformerBlock(ref.BasicTransformerBlock):
    def forward(self, x, context=None, store=None, cheap=False, own=False):
        """x (..., d) -> (..., d). `own`: x may be overwritten (the transformer's fresh proj_in output): the fused
        residual products then write into it where no graph is built (`fused.add_linear`)."""
        if self.norm1.fused is None:
            x = x + self.attn1(self.norm1(x), store=store)
            x = x + self.attn2(self.norm2(x), context, store=store)
            return x + self.ff(self.norm3(x), cheap)
        b1, b12, _ = self._carried()
        x, h = self.norm1(x, keep=True)
        x = fused.add_linear(x, self.attn1.core(h, store=store), self.attn1.to_out[0], in_place=own)
        x, h = self.norm2(x, b1, keep=True)  # x: now the block's own
        x = fused.add_linear(x, self.attn2.core(h, context, store), self.attn2.to_out[0], in_place=True)
        x, h = self.norm3(x, b12, keep=True)
        return fused.add_linear(x, self.ff.hidden(h, cheap), self.ff.net[2], in_place=True)

    def _carried(self):
        """(3, d) fp32: b1, b1 + b2, b1 + b2 + b3 of the output biases (a fused.Folded: recomputed on a change)."""
        biases = self.attn1.to_out[0].bias, self.attn2.to_out[0].bias, self.ff.net[2].bias
        return fused.folded(self, "_carried_biases", running_sums)(*biases)

    def project_out(self, proj_out, t):
        """proj_out(t) of this block's output t; fused, t lacks the three output biases B, so proj_out's bias
        becomes b + W·B."""
        if self.norm1.fused is None:
            return proj_out(t)
        carried = self._carried()[2]  # a view: its version is the Folded value's
        return F.linear(t, proj_out.weight, fused.folded(self, "_out_bias", folded_bias)(proj_out.weight,
                                                                                          proj_out.bias, carried))


def running_sums(b1, b2, b3):
    f = torch.promote_types(b1.dtype, torch.float32)
    return torch.stack([b1.to(f), b2.to(f), b3.to(f)]).cumsum(0)  # (3, d): b1, b1 + b2, b1 + b2 + b3


def folded_bias(weight, bias, carried):
    f = torch.promote_types(weight.dtype, torch.float32)
    return torch.addmv(bias.to(f), weight.to(f), carried.to(f)).to(weight.dtype)


class Transformer2DModel(ref.Transformer2DModel):
    def forward(self, x, context, store=None, cheap=False):
        bf, c, h, w = x.shape
        x, t = self.norm(x, keep=True)  # x: the residual's input
        t = t.permute(0, 2, 3, 1).reshape(bf, h * w, c)  # (b f) c h w -> (b f) (h w) c, a view
        block = self.transformer_blocks[0]
        t = block.project_out(self.proj_out, block(self.proj_in(t), context, store, cheap, own=True))
        t = t.reshape(bf, h, w, c).permute(0, 3, 1, 2)  # (b f) (h w) c -> (b f) c h w, a view
        return x + t


class TransformerTemporalModel(ref.TransformerTemporalModel):
    """With `fused` set (and its kernels applying to f and the head width) the tokens stay (b, f, h·w, c), a view of
    the channels-last activations, and the attention reads each position's frames in place; otherwise they are
    folded to (b h w, f, c), one copy in, the attention of `attention.attend`."""
    fused = None  # a fused.Kernels (fast.apply)

    def forward(self, x, f, store=None, cheap=False):
        bf, c, h, w = x.shape
        b, heads = bf // f, self.transformer_blocks[0].attn1.heads
        in_place = self.fused is not None and self.fused.in_place_frames(f, self.proj_in.out_features // heads)
        x, t = self.norm(batch_to_frames(x, f), keep=True)  # 5-D GroupNorm: statistics over all frames
        if in_place:  # the attention reads the frames in place
            t = t.permute(0, 2, 3, 4, 1).reshape(b, f, h * w, c)  # b c f h w -> b f (h w) c, a view
        else:
            t = t.permute(0, 3, 4, 2, 1).reshape(b * h * w, f, c)  # b c f h w -> (b h w) f c: the one copy in
        block = self.transformer_blocks[0]
        t = block.project_out(self.proj_out, block(self.proj_in(t), store=store, cheap=cheap, own=True))
        if in_place:
            t = t.view(b, f, h, w, c).permute(0, 4, 1, 2, 3)  # b f (h w) c -> b c f h w, a view
        else:
            t = t.reshape(b, h, w, f, c).permute(0, 4, 3, 1, 2)  # (b h w) f c -> b c f h w, a view
        return frames_to_batch(x + t)  # the add reads t in x's order (folded: the copy out)

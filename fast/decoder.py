"""The VAE decoder's fast forward: channels-last activations from the first convolution to the last
(`fast.apply_vae` swaps it into a loaded reference `vae.VAEDecoder`; the parameters and keys stay the reference's).

What to read: vae.py (the reference this equals: tests/test_layout.py); fast/memory.py (`Conv2d` and `GroupNorm`
keep a channels-last input channels-last); results/perf-notes.md (the measurement).

Official implementation: none; diffusers' `AutoencoderKL.decode` runs NCHW, as the reference does.

Why: in the reference, the mid-block attention's output is a channels-last view (its tokens are (h w) c), so from
there on PyTorch's GroupNorm takes a channels-last input (an NCHW copy inside, then its own statistics kernel) and
cuDNN converts between NCHW and its NHWC kernels at every convolution. On an H200 (2026-12-06), a 576×320×24
decode took 0.354 s that way, and 0.230 s in 61ad8e3, whose modules kept every activation channels-last.

How: the convolution weights channels-last (`fast._conv_layout`), the latents made channels-last on entry, and
the fast layer's `Conv2d`, `GroupNorm` and `ResnetBlock2D` (no fused kernels: one decode per video, no graph).
"""
import torch

import vae


class VAEDecoder(vae.VAEDecoder):
    def forward(self, z):
        """As the reference's, with z (n, c_lat, h, w) made channels-last first (n h w c in memory)."""
        return super().forward(z.contiguous(memory_format=torch.channels_last))

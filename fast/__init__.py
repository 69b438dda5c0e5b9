"""The fast layer: what makes the reference UNet fast on a GPU, plugged into a loaded model by one call.

    unet = UNet3D.from_pretrained(...)       # the reference (unet3d.py): plain PyTorch, reads like the paper
    fast.apply(unet, memory="cheap")         # swap in the fast forwards; same parameters, same keys
    fast.remove(unet)                        # back to the reference
    fast.apply_vae(vae)                      # the VAE decoder: channels-last activations (fast/decoder.py)

What to read: results/perf-notes.md (what each piece gave, measured); each module's docstring.

Official implementation: none. The pattern is Liger Kernel's `apply_liger_kernel_to_llama(...)`: the model code
stays as it is, and `apply` swaps the class of each module it speeds up for a subclass whose forward computes the
same math faster (`module.__class__ = Fast`), so the parameters are the reference's own tensors (no second copy)
and `state_dict` keys are unchanged. Every piece has an equivalence test against the reference.

The parts, each usable alone:
- `memory` (memory.py): what a pass with a graph (the LVD guidance pass) keeps for its backward: convolutions
  that keep no input, always; 'cheap' recomputes norms and activations; 'full' checkpoints every block.
  Plain PyTorch: any device.
- `kernels` (fused.py, kernels.py, kernels_rows.py, kernels_attention.py): fused GroupNorm(+SiLU), LayerNorm, GEGLU, residual
  adds, the temporal attention on in-place tokens, as Triton kernels ('auto': where `fused.available()`), or
  their math in PyTorch ('torch', the kernels' reference), or None.
- `channels_last`: the activations channels-last ((b f) h w c in memory), so cuDNN and the token reshapes need
  no transposes. `apply_vae` does the same for the VAE decoder (vae.py).
- precompile.py: a graph's first (eager) call compiles its Triton kernels in parallel threads, not one by one.
- CUDA graphs (graphs.py): `Graphed` replays the CFG step; `graph_guidance` replays the guidance pass;
  `graphs(model)` keeps both for the model across `generate` calls, `release_graphs(model)` frees them.
"""
import torch
import torch.nn as nn

import unet3d
import unet_transformers
import vae
from fast import decoder, fused, memory as mem, transformers, unet
from fast.graphs import (GraphCache, Graphed, cudnn_benchmark, graph_guidance,  # noqa: F401 (the public names)
                         graph_pool)

# reference class -> fast class (a subclass with the same parameters)
SWAPS = {
    unet3d.UNet3D: unet.UNet3D, unet3d.UNetBlock3D: unet.UNetBlock3D, unet3d.ResnetBlock2D: unet.ResnetBlock2D,
    unet3d.TemporalConvLayer: unet.TemporalConvLayer,
    unet_transformers.Transformer2DModel: transformers.Transformer2DModel,
    unet_transformers.TransformerTemporalModel: transformers.TransformerTemporalModel,
    unet_transformers.BasicTransformerBlock: transformers.BasicTransformerBlock,
    unet_transformers.Attention: transformers.Attention, unet_transformers.GEGLU: transformers.GEGLU,
    unet_transformers.FeedForward: transformers.FeedForward,
    nn.Conv2d: mem.Conv2d, nn.Conv3d: mem.Conv3d, nn.GroupNorm: mem.GroupNorm, nn.LayerNorm: fused.LayerNorm,
    vae.VAEDecoder: decoder.VAEDecoder,
}
REFERENCE = {v: k for k, v in SWAPS.items()}
_STATE = ("fused", "memory", "_temb_bias", "_joined_weights", "_carried_biases", "_out_bias", "_graphs",
          "_fast_settings")  # what the fast layer sets


def _kernels(kernels):
    if kernels == "auto":
        return fused.Kernels() if fused.available() else None
    if kernels in ("triton", "torch"):
        return fused.Kernels(kernels)
    if kernels is None or isinstance(kernels, fused.Kernels):
        return kernels
    raise ValueError(f"fast.apply: kernels must be 'auto', 'triton', 'torch', None or a fused.Kernels, got {kernels!r}")


def apply(model, memory="cheap", kernels="auto", channels_last=True):
    """Swap the fast forwards into the reference UNet3D `model` in place (calling it again changes the settings).

    memory: 'off', 'cheap' or 'full' (True/False: 'full'/'off'), what a pass with a graph keeps (memory.py).
    kernels: 'auto' (Triton where it runs, else none), 'triton', 'torch', None, or a fused.Kernels.
    channels_last: convolution weights (and so the activations) channels-last. -> model
    """
    if not isinstance(model, unet3d.UNet3D):
        raise TypeError(f"fast.apply: expected a unet3d.UNet3D, got {type(model).__name__}")
    mem.checkpoint_mode(memory)  # a clear error for an unknown mode
    kernels = _kernels(kernels)
    settings = (memory, kernels and kernels.backend, bool(channels_last))
    if getattr(model, "_fast_settings", None) != settings:
        release_graphs(model)  # the kept graphs replay the old settings' kernels
    model._fast_settings = settings
    swap(model, kernels)
    model.memory = memory
    _conv_layout(model, channels_last)
    return model


def apply_vae(model):
    """Swap the fast forwards into the reference vae.VAEDecoder `model` in place: channels-last convolutions and
    GroupNorms throughout (fast/decoder.py); no fused kernels, no graphs. `remove(model)` undoes it. -> model"""
    if not isinstance(model, vae.VAEDecoder):
        raise TypeError(f"fast.apply_vae: expected a vae.VAEDecoder, got {type(model).__name__}")
    swap(model)
    _conv_layout(model, True)
    return model


def swap(module, kernels=None):
    """The fast class for `module` and each of its submodules that has one, with `kernels` (a fused.Kernels or
    None) on those that take them; parameters untouched. -> module"""
    for m in module.modules():
        cls = SWAPS.get(type(m), type(m))
        if cls in REFERENCE:
            m.__class__ = cls
            if hasattr(cls, "fused"):
                m.fused = kernels
    return module


def remove(model):
    """Undo `apply` (or `apply_vae`): the reference classes, NCHW weights, nothing of the fast layer left on the
    modules. -> model"""
    release_graphs(model)
    for m in model.modules():
        if type(m) in REFERENCE:
            m.__class__ = REFERENCE[type(m)]
            for name in _STATE:
                m.__dict__.pop(name, None)
    _conv_layout(model, False)
    return model


def _conv_layout(model, channels_last):
    """Conv weights to channels_last (temporal: _3d) or back to contiguous, in place: same Parameters, same keys."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[m.weight.ndim]
            m.weight.data = m.weight.data.contiguous(memory_format=fmt if channels_last else torch.contiguous_format)


def graphs(model):
    """The model's `GraphCache` (made on first use): its CUDA graphs, kept across `generate` calls."""
    if getattr(model, "_graphs", None) is None:
        model._graphs = GraphCache(model)
    return model._graphs


def release_graphs(model):
    """Free the model's kept CUDA graphs and their memory (the next call captures again)."""
    cache = model.__dict__.pop("_graphs", None)
    if cache is not None:
        cache.release()


def prepare():
    """What `apply` needs first on a CUDA machine: Triton's import, its driver and one small kernel
    (`fused.available`). Safe to run in a thread while the weights load; the result is `apply`'s too."""
    return fused.available()

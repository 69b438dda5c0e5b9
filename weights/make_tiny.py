"""Write a tiny, randomly initialised model folder in the published diffusers layout.

Usage: python weights/make_tiny.py OUT_DIR [--fp16-variants] [--seed N]
       python weights/make_tiny.py OUT_DIR --full [--device cuda]   (the real 1.7B configs, random weights)

What to read: `modelscope-architecture.md` §2 (files), §3.1, §7.1, §8.1, §9.1 (configs), §6–§8 (keys).

Official counterpart: the folder layout that `TextToVideoSDPipeline.save_pretrained` writes for
ali-vilab/text-to-video-ms-1.7b (model_index.json, scheduler/, text_encoder/, tokenizer/, unet/, vae/).

Differences from the real checkpoint, all deliberate:
- Tiny sizes (UNet 64/64/128/128 channels, CLIP 2 layers × 32 wide, VAE 32/32/64/64), same block
  types, same head-dim-64 quirk, the real 49,408-token CLIP vocabulary and the real scheduler config.
- The weights are random, saved from lvd's own modules, with every norm and bias perturbed so that
  no layer is an identity. The VAE encoder half (which lvd never runs) is written from a small tree
  of the same building blocks so the file has the published key set.
- The text encoder file carries the `text_model.` prefix and a `position_ids` buffer, as the
  transformers 4.27 files do, to exercise the loader's rename rules.
Every test and notebook that needs a model uses this; it has no reference-library dependency.
"""
import argparse
import json
import os
import shutil
import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from text_encoder import CLIPTextConfig, CLIPTextEncoder  # noqa: E402
from unet3d import ResnetBlock2D, UNet3D, UNet3DConfig  # noqa: E402
from vae import VAEConfig, VAEDecoder  # noqa: E402
from weights.checkpoint import config_from_json  # noqa: E402

TOKENIZER_DIR = os.path.join(ROOT, "data", "clip-tokenizer")

MODEL_INDEX = {
    "_class_name": "TextToVideoSDPipeline", "_diffusers_version": "0.15.0.dev0",
    "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet3DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULER = {  # the real scheduler/scheduler_config.json (§9.1)
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.15.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "thresholding": False, "trained_betas": None,
}
UNET = {
    "_class_name": "UNet3DConditionModel", "_diffusers_version": "0.15.0.dev0", "act_fn": "silu",
    "attention_head_dim": 64, "block_out_channels": [64, 64, 128, 128], "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    "downsample_padding": 1, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 32,
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
}
TEXT = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "dropout": 0.0, "hidden_act": "gelu",
    "hidden_size": 32, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 2,
    "num_hidden_layers": 2, "projection_dim": 512, "torch_dtype": "float32", "vocab_size": 49408,
}
VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.15.0.dev0", "act_fn": "silu",
    "block_out_channels": [32, 32, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 256, "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


FULL = {  # the real configs (§3.1, §7.1, §8.1)
    "unet": {**UNET, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024},
    "text": {**TEXT, "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
             "num_hidden_layers": 23},
    "vae": {**VAE, "block_out_channels": [128, 256, 512, 512], "sample_size": 512},
}


def _perturb(module, gen):
    """Re-randomise every parameter: weights ~ N(0, 1/fan_in), norm scales 1 ± 0.1, biases ± 0.05."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=gen.device).to(p.dtype)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)  # norm scales
            elif p.ndim == 1:
                p.copy_(0.05 * noise)  # biases
            else:
                fan_in = p[0].numel()
                p.copy_(noise / fan_in ** 0.5)
    return module


class _VAEEncoderTree(nn.Module):
    """The key tree of the VAE encoder half (`encoder.*`, `quant_conv`), only to write a complete file."""

    def __init__(self, cfg):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        enc = nn.Module()
        enc.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        enc.down_blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            blk = nn.Module()
            blk.resnets = nn.ModuleList(
                [ResnetBlock2D(ch[max(i - 1, 0)] if j == 0 else c, c, None, g, 1e-6) for j in range(cfg.layers_per_block)])
            if i < len(ch) - 1:
                ds = nn.Module()
                ds.conv = nn.Conv2d(c, c, 3, stride=2)
                blk.downsamplers = nn.ModuleList([ds])
            enc.down_blocks.append(blk)
        mid = nn.Module()
        mid.resnets = nn.ModuleList([ResnetBlock2D(ch[-1], ch[-1], None, g, 1e-6) for _ in range(2)])
        attn = nn.Module()
        attn.group_norm = nn.GroupNorm(g, ch[-1])
        for n in ("to_q", "to_k", "to_v"):
            setattr(attn, n, nn.Linear(ch[-1], ch[-1]))
        attn.to_out = nn.ModuleList([nn.Linear(ch[-1], ch[-1])])
        mid.attentions = nn.ModuleList([attn])
        enc.mid_block = mid
        enc.conv_norm_out = nn.GroupNorm(g, ch[-1])
        enc.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)
        self.encoder = enc
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)


def _write(folder, name, config, tensors, fp16_variant):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, os.path.join(folder, f"{name}.safetensors"), metadata={"format": "pt"})
    if fp16_variant:
        half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(half, os.path.join(folder, f"{name}.fp16.safetensors"), metadata={"format": "pt"})


def write_pipeline_files(out_dir):
    """model_index.json, scheduler/ and tokenizer/ (the real CLIP tokenizer): the folder's weight-free part."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "model_index.json"), "w") as fh:
        json.dump(MODEL_INDEX, fh, indent=2)
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    with open(os.path.join(out_dir, "scheduler", "scheduler_config.json"), "w") as fh:
        json.dump(SCHEDULER, fh, indent=2)
    tok = os.path.join(out_dir, "tokenizer")
    os.makedirs(tok, exist_ok=True)
    for f in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(TOKENIZER_DIR, f), os.path.join(tok, f))


def text_file_state(text, text_cfg):
    """A CLIPTextEncoder's state under the published file's keys: the `text_model.` prefix and the
    `position_ids` buffer of transformers 4."""
    state = {"text_model." + k: v for k, v in text.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(text_cfg["max_position_embeddings"])[None]
    return state


def make_tiny(out_dir, seed=0, fp16_variants=False, full=False, device="cpu"):
    """Write the tiny (or, with full=True, the real-size) random model folder to `out_dir`; return its path."""
    unet_cfg, text_cfg, vae_cfg = (FULL["unet"], FULL["text"], FULL["vae"]) if full else (UNET, TEXT, VAE)
    gen = torch.Generator(device).manual_seed(seed)
    write_pipeline_files(out_dir)
    with torch.device(device):
        unet = _perturb(UNet3D(config_from_json(UNet3DConfig, unet_cfg)), gen)
    _write(os.path.join(out_dir, "unet"), "diffusion_pytorch_model", unet_cfg, unet.state_dict(), fp16_variants)
    del unet

    with torch.device(device):
        text = _perturb(CLIPTextEncoder(config_from_json(CLIPTextConfig, text_cfg)), gen)
    _write(os.path.join(out_dir, "text_encoder"), "model", text_cfg, text_file_state(text, text_cfg), fp16_variants)

    vae = config_from_json(VAEConfig, vae_cfg)
    with torch.device(device):
        state = {**_perturb(VAEDecoder(vae), gen).state_dict(), **_perturb(_VAEEncoderTree(vae), gen).state_dict()}
    _write(os.path.join(out_dir, "vae"), "diffusion_pytorch_model", vae_cfg, state, fp16_variants)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp16-variants", action="store_true", help="also write the .fp16.safetensors files")
    ap.add_argument("--full", action="store_true", help="the real 1.7B configs instead of the tiny ones")
    ap.add_argument("--device", default="cpu", help="where to build and randomise the modules")
    args = ap.parse_args(argv)
    print(make_tiny(args.out_dir, args.seed, args.fp16_variants, args.full, args.device))


if __name__ == "__main__":
    main()

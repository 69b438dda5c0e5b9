"""Train the toy text-to-video model on toyworld's moving shapes and write it in the published layout.

Usage: python scripts/train_toy.py OUT_DIR [--steps N] [--seed S] [--device cuda]

What to read: toyworld.py (the world, `render_batch`, the latent map `latents_of`); `modelscope-architecture.md`
§2 (the folder layout) and §9 (the noise schedule, epsilon prediction). The result loads with the unchanged
`lvd.load_pipeline` and runs every module exactly as ModelScope's does (`python lvd.py --model toy`).

Official counterpart: none. ModelScope's 1.7B model was trained by its authors on video-text data; this is
the smallest model of the same architecture that learns something, so that LVD's guidance can be seen.

What is trained and what is not:
- **UNet** (`unet/`, 5.6M parameters, channels 32/64/64/64, head dim 16): trained from scratch with the
  standard epsilon loss (scenes of 1 or 2 objects) on the real scheduler's 1000-step scaled-linear schedule, t uniform; captions are
  dropped to "" 10% of the time (classifier-free guidance) and get ", grey background" (the suffix LVD's
  token lookup adds, §3.1) half of the time. AdamW, bf16 autocast, an EMA of the weights is what is saved.
- **VAE decoder** (`vae/`, channels 16/32/64/64, 1 resnet a block + 1): trained first, by regression, to
  invert the fixed latent map `toyworld.latents_of` (8×8 mean colour and coverage); its inverse is sharp
  enough for the colour detector. The **VAE encoder** half is random: lvd never runs it, it is there so the
  file has the published key set (as in weights/make_tiny.py).
- **Text encoder** (`text_encoder/`, CLIP 2 layers × 32 wide, the real 49,408-token vocabulary and the real
  tokenizer): random and frozen (seeded). The UNet learns to read it through its cross-attention.
- Native size 128×128, 8 frames (latent 16×16, guided-layer grids 8×8 and 4×4). All files are stored in fp16
  (the loader converts to the requested dtype).

Reproducible from the seed up to the GPU's non-deterministic kernels (atomic adds in the backward).
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import sampler  # noqa: E402
import toyworld  # noqa: E402
from outputs import code_commit  # noqa: E402
from text_encoder import CLIPTextConfig, CLIPTextEncoder, CLIPTokenizer  # noqa: E402
from unet3d import UNet3D, UNet3DConfig  # noqa: E402
from vae import VAEConfig, VAEDecoder  # noqa: E402
from weights.checkpoint import config_from_json  # noqa: E402
from weights.make_tiny import (SCHEDULER, TOKENIZER_DIR, UNET, TEXT, VAE, _VAEEncoderTree, _perturb,  # noqa: E402
                               _write, write_pipeline_files)

FRAMES, SIZE = 8, 128
UNET_CFG = {**UNET, "block_out_channels": [32, 64, 64, 64], "attention_head_dim": 16, "norm_num_groups": 16,
            "cross_attention_dim": 32, "sample_size": SIZE // 8}
TEXT_CFG = {**TEXT, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}
VAE_CFG = {**VAE, "block_out_channels": [16, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
           "sample_size": SIZE, "scaling_factor": 1.0}
SUFFIX = f", {toyworld.BACKGROUND_NAME} background"


def log(msg):
    print(f"[train_toy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sample_batch(rng, n, device):
    """n random scenes of 1 or 2 objects -> (captions, video (n, F, 3, H, W) in [0, 1])."""
    scenes = [toyworld.sample_scene(rng, FRAMES, n_objects=int(rng.integers(1, 3))) for _ in range(n)]
    caps = []
    for s in scenes:
        r = rng.random()
        caps.append("" if r < 0.1 else toyworld.caption(s) + (SUFFIX if r < 0.55 else ""))
    return caps, toyworld.render_batch(scenes, FRAMES, SIZE, SIZE, device)


class TextCache:
    """caption -> frozen text embedding (77, d), computed once per distinct caption."""

    def __init__(self, tokenizer, encoder):
        self.tokenizer, self.encoder, self.cache = tokenizer, encoder, {}

    @torch.no_grad()
    def __call__(self, captions):
        new = sorted({c for c in captions if c not in self.cache})
        if new:
            dev = next(self.encoder.parameters()).device
            for c, e in zip(new, self.encoder(self.tokenizer(new).to(dev))):
                self.cache[c] = e
        return torch.stack([self.cache[c] for c in captions])


def train_decoder(vae, rng, steps, batch, device):
    """Regression of the VAE decoder onto the frames, from their latents (L1 + MSE, AdamW, cosine lr)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        _, video = sample_batch(rng, batch // FRAMES, device)
        z = toyworld.latents_of(video)                                         # (b, 4, F, h, w)
        z = z.transpose(1, 2).flatten(0, 1)                                   # b 4 F h w -> (b F) 4 h w
        target = video.flatten(0, 1) * 2 - 1                                  # (b F) 3 H W in [-1, 1]
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            out = vae(z).float()
        loss = F.l1_loss(out, target) + F.mse_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"decoder step {step}/{steps} loss {loss.item():.4f}")
    return vae.eval()


def train_unet(unet, text, rng, steps, batch, device, max_minutes):
    """Epsilon-prediction training with EMA; returns the EMA copy."""
    schedule = sampler.NoiseSchedule.from_config(SCHEDULER)
    ab = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32, device=device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_params, unet_params = list(ema.parameters()), list(unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.01, fused=device.type == "cuda")
    warm = max(1, min(200, steps // 10))
    lr = lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr)
    unet.train()
    t0, step = time.perf_counter(), 0
    for step in range(steps):
        caps, video = sample_batch(rng, batch, device)
        x0 = toyworld.latents_of(video)                                        # (b, 4, F, h, w)
        t = torch.randint(0, len(ab), (batch,), device=device)
        noise = torch.randn_like(x0)
        a = ab[t][:, None, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise                          # q(x_t | x_0)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            eps = unet(xt, t, text(caps)).float()
        loss = F.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, unet_params, 1 - decay)  # one fused launch, not one per tensor
        minutes = (time.perf_counter() - t0) / 60
        if step % 500 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} ({minutes:.1f} min)")
        if minutes > max_minutes:
            log(f"stopping at step {step}: the {max_minutes} min budget is spent")
            break
    return ema, step + 1


def write_folder(out_dir, unet, text_state, vae, seed, info):
    """The published layout, every floating tensor in fp16; written to a temporary folder, then renamed."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".toy-", dir=parent)
    half = lambda sd: {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    write_pipeline_files(tmp)
    _write(os.path.join(tmp, "unet"), "diffusion_pytorch_model", UNET_CFG, half(unet.state_dict()), False)
    _write(os.path.join(tmp, "text_encoder"), "model", TEXT_CFG, half(text_state), False)
    enc = _perturb(_VAEEncoderTree(vae.config), torch.Generator().manual_seed(seed + 3))
    _write(os.path.join(tmp, "vae"), "diffusion_pytorch_model", VAE_CFG,
           half({**vae.state_dict(), **enc.state_dict()}), False)
    with open(os.path.join(tmp, "training.json"), "w") as fh:
        json.dump(info, fh, indent=2)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=8000, help="UNet training steps")
    ap.add_argument("--batch", type=int, default=128, help="videos per UNet step")
    ap.add_argument("--decoder-steps", type=int, default=1000)
    ap.add_argument("--max-minutes", type=float, default=8.0, help="stop the UNet training after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", help="continue training the model in this folder (with --decoder-steps 0: keep its decoder)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    if args.init:  # continue from a trained folder (its frozen text encoder included)
        sub = lambda name: os.path.join(args.init, name)
        encoder = CLIPTextEncoder.from_pretrained(sub("text_encoder"), device, torch.float32).requires_grad_(False)
        vae = VAEDecoder.from_pretrained(sub("vae"), device, torch.float32).requires_grad_(True)
        unet = UNet3D.from_pretrained(sub("unet"), device, torch.float32).requires_grad_(True)
    else:
        with torch.device(device):
            encoder = _perturb(CLIPTextEncoder(config_from_json(CLIPTextConfig, TEXT_CFG)),
                               torch.Generator(device).manual_seed(args.seed + 1)).eval().requires_grad_(False)
            vae = VAEDecoder(config_from_json(VAEConfig, VAE_CFG))
            unet = UNet3D(config_from_json(UNet3DConfig, UNET_CFG))
    text_state = {"text_model." + k: v for k, v in encoder.state_dict().items()}
    text_state["text_model.embeddings.position_ids"] = torch.arange(TEXT_CFG["max_position_embeddings"])[None]

    log(f"VAE decoder: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, {args.decoder_steps} steps")
    vae = train_decoder(vae, rng, args.decoder_steps, 256, device) if args.decoder_steps else vae.eval()
    log(f"UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, {args.steps} steps of {args.batch}")
    ema, done = train_unet(unet, TextCache(tokenizer, encoder), rng, args.steps, args.batch, device, args.max_minutes)
    seconds = time.perf_counter() - start
    info = {"seed": args.seed, "init": args.init, "unet_steps": done, "batch": args.batch, "decoder_steps": args.decoder_steps,
            "train_seconds": round(seconds, 1), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "date": time.strftime("%Y-%m-%d"), "commit": code_commit()}
    write_folder(args.out_dir, ema, text_state, vae, args.seed, info)
    log(f"wrote {args.out_dir} after {seconds / 60:.1f} min ({done} UNet steps)")


if __name__ == "__main__":
    main()

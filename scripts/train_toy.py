"""Train the toy text-to-video model on toyworld's moving shapes and write it in the published layout.

Usage: python scripts/train_toy.py OUT_DIR [--steps N] [--seed S] [--device cuda]

What to read: toyworld.py (the world, `render_batch`, the latent map `latents_of`); `modelscope-architecture.md`
§2 (the folder layout) and §9 (the noise schedule, epsilon prediction). The result loads with the unchanged
`lvd.load_pipeline` and runs every module exactly as ModelScope's does (`python lvd.py --model toy`).

Official counterpart: none. ModelScope's 1.7B model was trained by its authors on video-text data; this is
the smallest model of the same architecture that learns something, so that LVD's guidance can be seen.

What is trained and what is not:
- **UNet** (`unet/`, 5.6M parameters, channels 32/64/64/64, head dim 16) and **text encoder** (`text_encoder/`,
  CLIP 2 layers × 32 wide, the real 49,408-token vocabulary and the real tokenizer): trained together from
  scratch with the standard epsilon loss (scenes of 1 or 2 objects) on the real scheduler's 1000-step
  scaled-linear schedule, t uniform, as LDM trains its text transformer with the UNet; captions are dropped to
  "" 10% of the time (classifier-free guidance) and get ", grey background" (the suffix LVD's token lookup adds,
  §3.1) half of the time. AdamW, bf16 autocast, the whole step replayed as one CUDA graph; an EMA of the weights
  is what is saved. (A frozen random encoder, as in the first runs, gave "green" and "blue" embeddings of
  cosine 0.87 and 0.99 on the next token: green prompts drew blue.)
  Plus, weighted 0.05, a **grounding loss** (`grounding_loss`: TokenCompose's token loss, Wang et al. CVPR 2024)
  on LVD's six guided layers: the share of each object token's attention that falls outside the object's box.
  LVD assumes that ModelScope's object tokens attend where the object is; trained for ten GPU minutes on the
  epsilon loss alone, the toy model's did not (in/out of the box ≈ 1.0, results/toy_training.md runs 1–4), since
  here the latent itself carries the colour and a position can read the caption evenly. The boxes enter only
  this loss, never the model's inputs, and the held-out captions never say where an object is.
- **VAE decoder** (`vae/`, channels 16/32/64/64, 1 resnet a block + 1): trained first, by regression, to
  invert the fixed latent map `toyworld.latents_of` (8×8 mean colour and coverage); its inverse is sharp
  enough for the colour detector. The **VAE encoder** half is random: lvd never runs it, it is there so the
  file has the published key set (as in weights/make_tiny.py).
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
from tokens import resolve_tokens  # noqa: E402
from attention import GUIDED_LAYERS, AttentionStore, layer_grid  # noqa: E402
from text_encoder import CLIPTextConfig, CLIPTextEncoder, CLIPTokenizer  # noqa: E402
from unet3d import UNet3D, UNet3DConfig  # noqa: E402
from vae import VAEConfig, VAEDecoder  # noqa: E402
from weights.checkpoint import config_from_json  # noqa: E402
from weights.make_tiny import (SCHEDULER, TOKENIZER_DIR, UNET, TEXT, VAE, _VAEEncoderTree, _perturb,  # noqa: E402
                               _write, text_file_state, write_pipeline_files)

FRAMES, SIZE = 8, 128
MAX_OBJECTS, MAX_TOKENS = 2, 2    # objects a training scene has, tokens of an object's name ("red ball")
UNET_CFG = {**UNET, "block_out_channels": [32, 64, 64, 64], "attention_head_dim": 16, "norm_num_groups": 16,
            "cross_attention_dim": 32, "sample_size": SIZE // 8}
TEXT_CFG = {**TEXT, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}
VAE_CFG = {**VAE, "block_out_channels": [16, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
           "sample_size": SIZE, "scaling_factor": 1.0}
SUFFIX = f", {toyworld.BACKGROUND_NAME} background"


def log(msg):
    print(f"[train_toy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sample_batch(rng, n, device):
    """n random scenes of 1 or 2 objects -> (captions, video (n, F, 3, H, W) in [0, 1], scenes)."""
    scenes = [toyworld.sample_scene(rng, FRAMES, n_objects=int(rng.integers(1, 3))) for _ in range(n)]
    caps = []
    for s in scenes:
        r = rng.random()
        caps.append("" if r < 0.1 else toyworld.caption(s) + (SUFFIX if r < 0.55 else ""))
    return caps, toyworld.render_batch(scenes, FRAMES, SIZE, SIZE, device), scenes


class TokenCache:
    """caption -> token ids (77,), tokenized once per distinct caption (there are a few thousand)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache, self.found = tokenizer, {}, {}

    def __call__(self, captions):
        new = sorted({c for c in captions if c not in self.cache})
        if new:
            self.cache.update(zip(new, self.tokenizer(new)))
        return torch.stack([self.cache[c] for c in captions])

    def positions(self, caption, names):
        """The token positions of each object name in the caption, found as LVD's guidance finds them (§3.4)."""
        if (caption, names) not in self.found:
            self.found[caption, names] = resolve_tokens(self.tokenizer, caption, "", names)[1]
        return self.found[caption, names]


# -----------------------------------------------------------------------------
# the grounding loss: what LVD assumes of ModelScope, trained into the toy model

def grounding_targets(scenes, caps, tokens, device):
    """Per video, slot k = (object o, token p): idx (B, O·P) token positions, weight (B, O·P) = 1/|P_o| (0: none;
    captions dropped to "" have none) and boxes (B, O·P, F, 4), the object's box per frame (normalised xyxy)."""
    B, K = len(scenes), MAX_OBJECTS * MAX_TOKENS
    idx, weight, boxes = torch.zeros(B, K, dtype=torch.long), torch.zeros(B, K), np.zeros((B, K, FRAMES, 4), np.float32)
    for b, (scene, cap) in enumerate(zip(scenes, caps)):
        if not cap:
            continue
        pos = tokens.positions(cap, tuple(o.name for o in scene.objects))
        obj_boxes = toyworld.scene_boxes(scene, FRAMES)                       # (O, F, 4)
        for o, p in enumerate(pos):
            for j, q in enumerate(p[:MAX_TOKENS]):
                k = o * MAX_TOKENS + j
                idx[b, k], weight[b, k], boxes[b, k] = q, 1 / len(p[:MAX_TOKENS]), obj_boxes[o]
    return idx.to(device), weight.to(device), torch.from_numpy(boxes).to(device)


def box_masks(boxes, h, w):
    """Normalised xyxy boxes (..., 4) -> masks (..., h·w) by `attention.box_mask`'s rule (corner rounded half to
    even, width and height rounded apart, end-exclusive), for many boxes at once on the device."""
    x0, y0 = torch.round(boxes[..., 0] * w), torch.round(boxes[..., 1] * h)
    x1 = x0 + torch.round((boxes[..., 2] - boxes[..., 0]) * w)
    y1 = y0 + torch.round((boxes[..., 3] - boxes[..., 1]) * h)
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype)
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype)
    in_x = (xs >= x0[..., None]) & (xs < x1[..., None])                       # (..., w)
    in_y = (ys >= y0[..., None]) & (ys < y1[..., None])                       # (..., h)
    return (in_y[..., :, None] & in_x[..., None, :]).flatten(-2).to(boxes.dtype)  # ... h w -> ... (h w)


def grounding_loss(maps, idx, weight, boxes):
    """The token loss of TokenCompose (Wang et al., CVPR 2024, L_token) on LVD's six guided layers: for each
    object token, the share of its attention mass (summed over the frame's positions) that falls outside the
    object's box; averaged over heads, frames, tokens of an object, objects and layers.

    maps {path: (B f) n (h w) l}, idx and weight (B, K), boxes (B, K, f, 4) (`grounding_targets`)."""
    total = 0.0
    for path, a in maps.items():
        h, w = layer_grid(path, SIZE // 8, SIZE // 8)
        a = a.float().unflatten(0, (idx.shape[0], -1))                        # (B f) n q l -> B f n q l
        B, f, n, q, _ = a.shape
        cols = a.gather(-1, idx[:, None, None, None, :].expand(B, f, n, q, idx.shape[1]))  # B f n q K
        m = box_masks(boxes, h, w).permute(0, 2, 3, 1)[:, :, None]             # B K f (h w) -> B f 1 (h w) K
        inside = (cols * m).sum(3) / cols.sum(3).clamp(min=1e-12)            # (B, f, n, K)
        total = total + ((1 - inside) * weight[:, None, None]).sum() / (weight.sum().clamp(min=1) * f * n)
    return total / len(maps)


def encode(encoder, ids):
    """CLIPTextEncoder.forward without its input checks (they read values back to the host, which a CUDA
    graph cannot do): ids (b, 77) -> (b, 77, d)."""
    x = encoder.embeddings(ids)
    for layer in encoder.encoder.layers:
        x = layer(x)
    return encoder.final_layer_norm(x)


def schedule(step, progress, warmup):
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine from 1 to 0.1 as progress goes 0 -> 1."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def graphed(step, device, warmup=3):
    """Run `step` (no arguments: it reads and writes fixed tensors) once per call, as one CUDA graph on a GPU.

    A step of this small model is ~3,000 kernel launches and little work each, so eager training is bound by
    the host (0.25 s a step at 64 videos on an H100, results/toy_training.md); replaying the captured graph
    costs one launch. The warm-up steps run on a side stream before the capture (they train too), as
    `torch.cuda.graphs` asks. On the CPU, or if the capture fails, `step` runs eagerly."""
    if device.type != "cuda":
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = step()
    except RuntimeError as e:
        log(f"CUDA graph capture failed ({str(e).splitlines()[0]}); training eagerly")
        return step

    def replay():
        graph.replay()
        return out
    return replay


def make_optimizer(params, lr, device):
    """AdamW whose learning rate is a tensor, so that a captured step reads the value set before each replay."""
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=torch.tensor(lr, device=device) if cuda else lr, weight_decay=0.01,
                            fused=cuda, capturable=cuda)

    def set_lr(factor):
        if cuda:
            opt.param_groups[0]["lr"].fill_(lr * factor)  # in place: the captured step reads this tensor
        else:
            opt.param_groups[0]["lr"] = lr * factor
    return opt, set_lr


def autocast(device):
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)


def train_decoder(vae, rng, steps, batch, device):
    """Regression of the VAE decoder onto the frames, from their latents (L1 + MSE, AdamW, cosine lr)."""
    opt, set_lr = make_optimizer(vae.parameters(), 2e-3, device)
    _, video, _ = sample_batch(rng, batch // FRAMES, device)
    target = video.flatten(0, 1) * 2 - 1                                      # (b F) 3 H W in [-1, 1]
    z = toyworld.latents_of(video).transpose(1, 2).flatten(0, 1)              # b 4 F h w -> (b F) 4 h w

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            out = vae(z).float()
        loss = F.l1_loss(out, target) + F.mse_loss(out, target)
        loss.backward()
        opt.step()
        return loss

    vae.train()
    warm = max(1, steps // 20)
    set_lr(schedule(0, 0, warm))
    run = graphed(step, device)
    for i in range(steps):
        _, video, _ = sample_batch(rng, batch // FRAMES, device)
        target.copy_(video.flatten(0, 1) * 2 - 1)
        z.copy_(toyworld.latents_of(video).transpose(1, 2).flatten(0, 1))
        set_lr(schedule(i, i / steps, warm))
        loss = run()
        if i % 250 == 0 or i == steps - 1:
            log(f"decoder step {i}/{steps} loss {loss.item():.4f}")
    return vae.eval()


def train_unet(unet, encoder, tokens, rng, steps, batch, device, max_minutes, ground_weight):
    """Epsilon-prediction training of the UNet and the text encoder together, plus `ground_weight` × the
    grounding loss, with EMA; returns the EMA copy of both (a ModuleDict with "unet" and "text") and the number
    of steps run. The learning rate follows `schedule` over whichever ends first, `steps` or `max_minutes`."""
    ab = torch.as_tensor(sampler.NoiseSchedule.from_config(SCHEDULER).alphas_cumprod, dtype=torch.float32,
                         device=device)
    model = torch.nn.ModuleDict({"unet": unet, "text": encoder}).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema_params, params = list(ema.parameters()), list(model.parameters())
    opt, set_lr = make_optimizer(params, 1e-3, device)
    warm = max(1, min(200, steps // 10))
    caps, video, scenes = sample_batch(rng, batch, device)
    x0, ids = toyworld.latents_of(video).contiguous(), tokens(caps).to(device)   # (b, 4, F, h, w), (b, 77)
    idx, weight, boxes = grounding_targets(scenes, caps, tokens, device)

    def step():
        opt.zero_grad(set_to_none=True)
        t = torch.randint(0, len(ab), (batch,), device=device)
        noise = torch.randn_like(x0)
        a = ab[t][:, None, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise                          # q(x_t | x_0)
        store = AttentionStore(GUIDED_LAYERS) if ground_weight else None
        with autocast(device):
            eps = unet(xt, t, encode(encoder, ids), store).float()
        losses = torch.stack([F.mse_loss(eps, noise),
                              grounding_loss(store.maps, idx, weight, boxes) if store else torch.zeros((), device=device)])
        (losses[0] + ground_weight * losses[1]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return losses

    set_lr(schedule(0, 0, warm))
    run = graphed(step, device)
    t0, i = time.perf_counter(), 0
    for i in range(steps):
        minutes = (time.perf_counter() - t0) / 60
        progress = max(i / steps, minutes / max_minutes)
        if progress >= 1:
            log(f"stopping at step {i}: the {max_minutes} min budget is spent")
            break
        caps, video, scenes = sample_batch(rng, batch, device)
        x0.copy_(toyworld.latents_of(video))
        ids.copy_(tokens(caps))
        if ground_weight:
            for buf, new in zip((idx, weight, boxes), grounding_targets(scenes, caps, tokens, device)):
                buf.copy_(new)
        set_lr(schedule(i, progress, warm))
        losses = run()
        decay = min(0.999, (1 + i) / (10 + i))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)  # one fused launch, not one per tensor
        if i % 500 == 0 or i == steps - 1:
            eps_loss, ground = losses.tolist()
            log(f"unet step {i}/{steps} loss {eps_loss:.4f} grounding {ground:.3f} ({minutes:.1f} min)")
    else:
        i = steps
    return ema, i


def write_folder(out_dir, unet, encoder, vae, seed, info):
    """The published layout, every floating tensor in fp16; written to a temporary folder, then renamed."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".toy-", dir=parent)
    half = lambda sd: {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    write_pipeline_files(tmp)
    _write(os.path.join(tmp, "unet"), "diffusion_pytorch_model", UNET_CFG, half(unet.state_dict()), False)
    _write(os.path.join(tmp, "text_encoder"), "model", TEXT_CFG, half(text_file_state(encoder, TEXT_CFG)), False)
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
    ap.add_argument("--steps", type=int, default=3000, help="UNet training steps")
    ap.add_argument("--batch", type=int, default=64, help="videos per UNet step")
    ap.add_argument("--decoder-steps", type=int, default=1000)
    ap.add_argument("--max-minutes", type=float, default=8.0, help="stop the UNet training after this long")
    ap.add_argument("--ground-weight", type=float, default=0.05,
                    help="weight of the grounding loss (object-token attention inside the object's box); 0: none")
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
    if args.init:  # continue from a trained folder
        sub = lambda name: os.path.join(args.init, name)
        encoder = CLIPTextEncoder.from_pretrained(sub("text_encoder"), device, torch.float32)
        vae = VAEDecoder.from_pretrained(sub("vae"), device, torch.float32)
        unet = UNet3D.from_pretrained(sub("unet"), device, torch.float32)
    else:
        with torch.device(device):
            encoder = _perturb(CLIPTextEncoder(config_from_json(CLIPTextConfig, TEXT_CFG)),
                               torch.Generator(device).manual_seed(args.seed + 1))
            vae = VAEDecoder(config_from_json(VAEConfig, VAE_CFG))
            unet = UNet3D(config_from_json(UNet3DConfig, UNET_CFG))
    for m in (encoder, vae, unet):
        m.requires_grad_(True)

    log(f"VAE decoder: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, {args.decoder_steps} steps")
    vae = train_decoder(vae, rng, args.decoder_steps, 256, device) if args.decoder_steps else vae.eval()
    log(f"UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, {args.steps} steps of {args.batch}")
    ema, done = train_unet(unet, encoder, TokenCache(tokenizer), rng, args.steps, args.batch, device,
                           args.max_minutes, args.ground_weight)
    seconds = time.perf_counter() - start
    info = {"seed": args.seed, "init": args.init, "ground_weight": args.ground_weight, "unet_steps": done,
            "batch": args.batch, "decoder_steps": args.decoder_steps, "train_seconds": round(seconds, 1),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d"), "commit": code_commit()}
    write_folder(args.out_dir, ema["unet"], ema["text"], vae, args.seed, info)
    log(f"wrote {args.out_dir} after {seconds / 60:.1f} min ({done} UNet steps)")


if __name__ == "__main__":
    main()

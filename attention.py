"""LVD's attention-energy guidance: map capture, box masks, phrase -> tokens, the energy, the guidance step.

What to read: `lvd-method.md` §3.1 and §3.4 (final prompt, token lookup), §4.2-§4.3 (captured maps, the six
guided layers), §4.4 (box -> mask), §4.5 (the energy), §4.6 (the guidance loop), §6 (presets), §10.

Official implementation: TonyLianLong/LLM-groundedVideoDiffusion @22d90d2: models/attention_processor.py
(the `attn_key` capture), utils/utils.py `scale_proportion`, utils/guidance.py (`refine_phrase`,
`get_token_map`, `get_phrase_indices`, `add_ca_loss_per_attn_map_to_loss`, `compute_ca_lossv3`),
models/pipelines.py `latent_backward_guidance`, generation/lvd.py (`overall_guidance_attn_keys`, defaults).

Differences:
- One attention function, `attend`, serves every attention module. It runs fused SDPA unless the store
  passed to the UNet forward wants this module's map; then it materialises softmax(q·kᵀ/√e), stores it and
  uses it. Captures are keyed by module path, not by the official tuple ("up", 2, 2, 0). No globals.
- Phrase -> token positions (§3.4) live in tokens.py, the attention grids in outputs.py; both are re-exported
  here (`resolve_tokens`, `save_attention_grid`).
- The guidance forward stops after the last guided layer (up_blocks.3 and conv_out are never computed;
  they do not feed the energy, so the gradient is unchanged).
- The pass reads no host value (top-k sizes from shapes, token columns by slices, the masks' terms made once),
  so the fast layer can replay it from a CUDA graph (`fast.graph_guidance` replaces `LatentGuidance.run_pass`);
  its memory modes (§10.15: the official code keeps the whole fp16 graph) are the fast layer's too.
- The energy divides by |O|·(number of layers given), which is |O|·6 for the guided set, as the official.
- Energy units are the official, unnormalised ones: τ depends on frames and heads (§4.5 "Scale", §10.16).

Glossary: b (batch rows, (b f)), f (frames), n (heads), e (head dim), q/l (query/key lengths, l = 77 tokens),
h, w (grid of one layer), o (object), p (token position), m (mask), k_fg, k_bg, rho_fg, rho_bg, w_fg, w_bg,
lam_com (λ), tau (τ), s (loss scale), z (latents), alpha_bar (ᾱ_t).
"""
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from outputs import save_attention_grid  # noqa: F401 (the grids of LatentGuidance.last_maps)
from tokens import plural, refine_phrase, resolve_tokens  # noqa: F401 (§3.4: phrase -> token positions)

log = logging.getLogger(__name__)


# -----------------------------------------------------------------------------
# the attention op and its capture store

@dataclass
class AttentionStore:
    """Where captured attention probabilities go, keyed by module path.

    paths:    the modules whose probabilities are wanted (e.g. the six guided `attn2` layers).
    truncate: if True the UNet forward stops as soon as every wanted map has been captured
              (the guidance pass needs nothing after the last guided layer).
    maps:     filled during one forward: path -> probabilities (b, n, q, l).
    """
    paths: tuple
    truncate: bool = False
    maps: dict = field(default_factory=dict)

    def wants(self, path):
        return path in self.paths

    def done(self):
        """True once every wanted map is captured and the forward may stop early."""
        return self.truncate and all(p in self.maps for p in self.paths)


def attend(q, k, v, heads, store=None, path=None):
    """Multi-head scaled dot-product attention, q (b, q, n*e), k and v (b, l, n*e) -> (b, q, n*e).

    With `store` wanting `path`, the probabilities are materialised, stored and used; otherwise the
    fused kernel runs. Both paths compute softmax(q·kᵀ/√e)·v (the equivalence is tested).
    """
    b, lq, d = q.shape
    e = d // heads
    q, k, v = (t.unflatten(-1, (heads, e)).transpose(1, 2) for t in (q, k, v))  # b l (n e) -> b n l e
    if store is not None and store.wants(path):
        probs = (q @ k.transpose(-1, -2) * e ** -0.5).softmax(dim=-1)  # §4.2 softmax(QKᵀ/√64), no upcast; (b, n, q, l)
        # A recomputation under activation checkpointing re-enters here; keep the first capture (in the graph).
        store.maps.setdefault(path, probs)
        out = probs @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)  # b n q e -> b q (n e)


# -----------------------------------------------------------------------------
# the six guided layers and their grids (§4.3)

GUIDED_LAYERS = (
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2",  # ("down", 1, 0, 0)  latent/2
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2",  # ("down", 2, 0, 0)  latent/4
    "down_blocks.2.attentions.1.transformer_blocks.0.attn2",  # ("down", 2, 1, 0)  latent/4
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2",    # ("up", 1, 0, 0)    latent/4
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2",    # ("up", 1, 1, 0)    latent/4
    "up_blocks.2.attentions.2.transformer_blocks.0.attn2",    # ("up", 2, 2, 0)    latent/2
)


def layer_grid(path, h, w, n_levels=4):
    """(h_a, w_a) of the module at `path` for an h × w latent: one ceil-halving per stride-2 conv above it."""
    kind, i = path.split(".")[:2]
    if kind == "down_blocks":
        level = int(i)  # down block i runs after i downsamplers
    elif kind == "up_blocks":
        level = n_levels - 1 - int(i)  # up block i runs after i upsamplers, from the bottom level
    else:
        level = n_levels - 1  # mid block (and anything else): the bottom level
    for _ in range(level):
        h, w = -(-h // 2), -(-w // 2)  # Downsample2D: 3×3, stride 2, padding 1 -> ceil(h/2)
    return h, w


# -----------------------------------------------------------------------------
# box -> mask (§4.4)

def box_mask(box, h, w):
    """Normalised corners (x_min, y_min, x_max, y_max) -> float32 mask (h, w); all-zero box -> all zero."""
    x_min, y_min, x_max, y_max = (float(v) for v in box)
    m = torch.zeros(h, w)
    if x_max <= x_min or y_max <= y_min:
        return m  # absent object (box [0, 0, 0, 0])
    x0, y0 = round(x_min * w), round(y_min * h)  # round half to even (Python's round), as the official
    x1 = x0 + round((x_max - x_min) * w)  # width and height rounded separately: a shifted box keeps its size
    y1 = y0 + round((y_max - y_min) * h)
    m[max(y0, 0):max(min(y1, h), 0), max(x0, 0):max(min(x1, w), 0)] = 1.0  # clamp to the grid (an end < 0
    # would slice from the far side), end-exclusive
    return m


def layer_masks(boxes, latent_hw, paths=GUIDED_LAYERS):
    """boxes: per object, per frame, normalised corners (O, f, 4) -> {path: float32 masks (O, f, h_a, w_a)}."""
    boxes = torch.from_numpy(np.asarray(boxes, dtype=np.float64))
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"layer_masks: boxes must have shape (objects, frames, 4), got {tuple(boxes.shape)}")
    out = {}
    for path in paths:
        h, w = layer_grid(path, *latent_hw)
        out[path] = torch.stack([torch.stack([box_mask(b.tolist(), h, w) for b in per_obj]) for per_obj in boxes]) \
            if len(boxes) else torch.zeros(0, boxes.shape[1], h, w)
    return out


# -----------------------------------------------------------------------------
# the energy (§4.5)

def _topk_mean(v, keep, k):
    """Mean of the k[f] largest entries along the last axis; v (f, p, n, N), keep (f, 1, 1, k_max): True for the
    first k[f] of k_max (`_mask_terms`), k (f, 1, 1) -> (f, p, n). k_max >= every k[f] is a host int known from
    shapes alone (no device sync: the pass can be a CUDA graph)."""
    top = v.topk(keep.shape[-1], dim=-1).values  # (f, p, n, k_max), descending
    return (top * keep).sum(-1) / k


def _columns(a, pos):
    """a[..., pos] by slices: no index tensor is copied to the device (the pass can be a CUDA graph)."""
    cols = [a[..., p:p + 1] for p in pos]
    return cols[0] if len(cols) == 1 else torch.cat(cols, dim=-1)


def _com(x, h, w):
    """Centre of mass (y, x) in grid cells of maps x (..., h*w) over the whole map -> two (...) tensors."""
    x = x.unflatten(-1, (h, w))  # ... (h w) -> ... h w
    ys = torch.arange(h, device=x.device, dtype=x.dtype)
    xs = torch.arange(w, device=x.device, dtype=x.dtype)
    mass = x.sum((-2, -1)).clamp(min=torch.finfo(x.dtype).tiny)  # (empty masks are zeroed by the caller)
    return (x.sum(-1) * ys).sum(-1) / mass, (x.sum(-2) * xs).sum(-1) / mass  # Σ y·X / Σ X, Σ x·X / Σ X


def _mask_terms(m, params):
    """What the energy takes from one object's mask m (f, h, w) at one layer, in m's dtype: the terms that depend
    on the layout alone, so a pass can take them ready-made (`mask_terms`) instead of recomputing them each time.
    {'m', 'inv' (1 − m): (f, 1, 1, h·w); 'k_fg', 'k_bg' (f, 1, 1) and 'keep_fg', 'keep_bg' (f, 1, 1, k_max): the
    top-k sizes; 'my', 'mx' (mask centre), 'dmy', 'dmx' (its step to f⁺): (f, 1, 1); 'here', 'both' (present at f,
    and at f⁺ too): (f, 1); 'nxt' (f⁺ per f)}."""
    f, h, w = m.shape
    hw, dt = h * w, m.dtype
    m = m.flatten(1)  # f h w -> f (h w)
    area = m.sum(-1).double()[:, None, None]  # |m| per frame, (f, 1, 1); k in float64 like Python's int(ρ·|m|)
    k_fg = (params.fg_top_p * area).floor().clamp(min=1)  # k_fg = max(1, ⌊ρ_fg·|m|⌋)
    k_bg = (params.bg_top_p * (hw - area)).floor().clamp(min=1)  # k_bg = max(1, ⌊ρ_bg·(N − |m|)⌋)
    fg_max, bg_max = max(1, int(params.fg_top_p * hw)), max(1, int(params.bg_top_p * hw))  # k bounds: |m| <= hw
    out = {"m": m[:, None, None], "inv": 1 - m[:, None, None], "k_fg": k_fg.to(dt), "k_bg": k_bg.to(dt),
           "keep_fg": torch.arange(fg_max, device=m.device) < k_fg[..., None],  # the first k[f] of each frame
           "keep_bg": torch.arange(bg_max, device=m.device) < k_bg[..., None]}
    if params.com_loss_scale > 0:
        my, mx = (c[:, None, None] for c in _com(m, h, w))  # mask centre, (f, 1, 1)
        here = (area > 0).to(dt)[..., 0]  # f 1 1 -> f 1: only frames where the object is present
        nxt = torch.clamp(torch.arange(f, device=m.device) + 1, max=f - 1)  # f⁺ = min(f + 1, F − 1)
        out.update(my=my, mx=mx, dmy=my[nxt] - my, dmx=mx[nxt] - mx, here=here, both=here * here[nxt], nxt=nxt)
    return out


def mask_terms(masks, params, dtype=torch.float32):
    """`_mask_terms` of every layer and object of `masks` ({path: (O, f, h, w)}), {path: [per object]}, for
    `energy(..., prepared=)`: the guidance pass takes them ready-made (one set per layout and parameters: about
    200 small kernels fewer a pass). dtype: the energy's accumulator, promote_types(the maps' dtype, float32)."""
    return {path: [_mask_terms(m[o].to(dtype), params) for o in range(m.shape[0])] for path, m in masks.items()}


def energy_terms(maps, masks, token_positions, params, prepared=None):
    """The energy's four parts, each already averaged as L is: {'fg', 'bg', 'pos', 'vel'} -> scalars; L = their sum.

    maps:  {path: attention probabilities (f, n, h*w, 77)} (fp16 or fp32; the accumulator is at least fp32)
    masks: {path: (O, f, h, w)} (`layer_masks`); token_positions: O lists of positions (`resolve_tokens`).
    prepared: `mask_terms(masks, params, dtype)` on the maps' device, or None (computed here);
    the same value either way (tests/test_attention.py).
    """
    if not maps:
        raise ValueError("energy: no attention maps given")
    ref = next(iter(maps.values()))
    dt = torch.promote_types(ref.dtype, torch.float32)  # fp32 accumulator (fp64 in the finite-difference test)
    terms = {k: torch.zeros((), dtype=dt, device=ref.device) for k in ("fg", "bg", "pos", "vel")}
    n_obj, lam = len(token_positions), params.com_loss_scale
    if n_obj == 0:
        return terms  # L = 0 without objects
    for path, a in maps.items():
        if path not in masks:
            raise ValueError(f"energy: no masks for layer {path}")
        f, n, hw, l = a.shape
        m_all = masks[path]
        h, w = m_all.shape[-2:]
        if m_all.shape != (n_obj, f, h, w) or h * w != hw:
            raise ValueError(f"energy: layer {path}: maps {tuple(a.shape)} do not fit masks {tuple(m_all.shape)} "
                             f"for {n_obj} objects")
        for o, pos in enumerate(token_positions):
            if not pos or min(pos) < 0 or max(pos) >= l:
                raise ValueError(f"energy: object {o} has token positions {pos}, need 1+ within 0..{l - 1}")
            mt = prepared[path][o] if prepared is not None else _mask_terms(m_all[o].to(a.device, dt), params)
            a_o = _columns(a, pos).to(dt).permute(0, 3, 1, 2)  # f n (h w) p -> f p n (h w); fp16 -> fp32 exact
            fg = 1 - _topk_mean(a_o * mt["m"], mt["keep_fg"], mt["k_fg"])  # fg_h = 1 − mean(topk_{k_fg}(A ⊙ m))
            bg = _topk_mean(a_o * mt["inv"], mt["keep_bg"], mt["k_bg"])  # bg_h = mean(topk_{k_bg}(A ⊙ (1 − m)))
            # E_box = w_fg·Σ_h fg_h + w_bg·Σ_h bg_h (heads summed); Σ_f Σ_p, then / |P_o|
            terms["fg"] = terms["fg"] + params.fg_weight * fg.sum() / len(pos)
            terms["bg"] = terms["bg"] + params.bg_weight * bg.sum() / len(pos)
            if lam > 0:
                cy, cx = _com(a_o, h, w)  # per head, (f, p, n)
                my, mx, nxt = mt["my"], mt["mx"], mt["nxt"]  # mask centre (f, 1, 1); f⁺ = min(f + 1, F − 1)
                # E_pos = λ·[mean_h (CoM_y(A) − CoM_y(m))² + mean_h (CoM_x(A) − CoM_x(m))²]
                e_pos = lam * (((cy - my) ** 2).mean(-1) + ((cx - mx) ** 2).mean(-1))
                # E_vel = λ·[mean_h (ΔCoM_y(A) − ΔCoM_y(m))² + same for x], Δ = value at f⁺ − value at f
                e_vel = lam * ((((cy[nxt] - cy) - mt["dmy"]) ** 2).mean(-1) +
                               (((cx[nxt] - cx) - mt["dmx"]) ** 2).mean(-1))
                terms["pos"] = terms["pos"] + (e_pos * mt["here"]).sum() / len(pos)
                terms["vel"] = terms["vel"] + (e_vel * mt["both"]).sum() / len(pos)
    return {k: v / (n_obj * len(maps)) for k, v in terms.items()}  # L = Σ_ℓ Σ_o obj(o, ℓ) / (|O|·6)


def energy(maps, masks, token_positions, params, prepared=None):
    """L (§4.5): a scalar tensor; see `energy_terms` for the arguments."""
    return sum(energy_terms(maps, masks, token_positions, params, prepared).values())


# -----------------------------------------------------------------------------
# parameters and presets (§6)

@dataclass(frozen=True)
class GuidanceParams:
    loss_scale: float = 5.0          # s: z ← z − √(1 − ᾱ_t)·∇(s·L)
    loss_threshold: float = 200.0    # τ, in unnormalised energy units (grow with frames and heads, §4.5)
    max_iter: int = 5                # guidance iterations per step while L_prev > τ
    max_index_step: int = 10         # guided steps i < this (of 40)
    fg_top_p: float = 0.75           # ρ_fg
    bg_top_p: float = 0.75           # ρ_bg
    fg_weight: float = 1.0           # w_fg
    bg_weight: float = 4.0           # w_bg
    com_loss_scale: float = 0.03     # λ; 0 turns the centre-of-mass terms off

    def __post_init__(self):
        if not (0 < self.fg_top_p <= 1 and 0 < self.bg_top_p <= 1):
            raise ValueError(f"GuidanceParams: fg_top_p/bg_top_p must be in (0, 1], got {self.fg_top_p}/{self.bg_top_p}")
        if min(self.loss_scale, self.max_iter, self.max_index_step, self.com_loss_scale) < 0:
            raise ValueError("GuidanceParams: loss_scale, max_iter, max_index_step, com_loss_scale must be >= 0")


# README commands of the official repo (§6); 'weak' thresholds per model: 16 vs 24 frames. The toy model
# (8 frames, 24 heads over the six layers, 20 steps) scales them: τ by its energy of no in-box attention
# (24·8/6 = 32 against 267), the guided steps to the first quarter (5 of 20, as 10 of 40).
PRESETS = {
    "benchmark": dict(loss_scale=5.0, loss_threshold={"modelscope": 200.0, "zeroscope": 200.0, "toy": 24.0}, max_iter=5,
                      max_index_step={"modelscope": 10, "zeroscope": 10, "toy": 5}, fg_top_p=0.75,
                      bg_top_p=0.75, fg_weight=1.0, bg_weight=4.0, com_loss_scale=0.03),
    "weak": dict(loss_scale=2.5, loss_threshold={"modelscope": 250.0, "zeroscope": 350.0, "toy": 30.0}, max_iter=1,
                 max_index_step={"modelscope": 10, "zeroscope": 10, "toy": 5}, fg_top_p=0.25, bg_top_p=0.25,
                 fg_weight=1.0, bg_weight=2.0, com_loss_scale=0.0),
}


def preset(name, model="modelscope"):
    """GuidanceParams of a preset ('benchmark', 'weak'), or None for 'off' (the plain baseline)."""
    if name == "off":
        return None
    if name not in PRESETS or model not in ("modelscope", "zeroscope", "toy"):
        raise ValueError(f"preset: unknown preset {name!r} or model {model!r}; presets: off, {', '.join(PRESETS)}")
    return GuidanceParams(**{k: v[model] if isinstance(v, dict) else v for k, v in PRESETS[name].items()})


# -----------------------------------------------------------------------------
# the guidance step (§4.6)

class LatentGuidance:
    """The sampler's `before_step(x, i, t) -> x`: LVD's latent updates on the first `max_index_step` steps.

    unet: UNet3D; cond: conditional text embedding (1, 77, d) (settable later as `.cond`); masks: `layer_masks`
    for GUIDED_LAYERS; token_positions: per object; schedule: `alpha_bar(t)` (sampler.NoiseSchedule) or a table.
    State: `loss_prev` (L_prev, never reset), `history`, a list of (i, t, iteration, L), and `last_maps`, the six
    maps of the last iteration (detached, (f, n, h·w, 77)) for `save_attention_grid`.
    `names` and `suffixes` (from resolve_tokens) are only carried along for the run record.
    `run_pass` is the function that runs one pass, `_pass`; the fast layer replays it from a CUDA graph.
    """

    def __init__(self, unet, cond, masks, token_positions, schedule, params, names=(), suffixes=()):
        missing = [p for p in GUIDED_LAYERS if p not in masks]
        if missing:
            raise ValueError(f"LatentGuidance: masks lack the guided layers {missing}")
        self.unet, self.cond, self.schedule, self.params = unet, cond, schedule, params
        self.masks, self.token_positions = masks, [list(p) for p in token_positions]
        self.loss_prev = 10000.0 / params.loss_scale if params.loss_scale else math.inf  # L_prev (§4.6)
        self.history, self.last_maps = [], None
        self.names, self.suffixes = list(names), list(suffixes)
        self.run_pass, self._device_masks = self._pass, {}

    def __call__(self, x, i, t):
        p = self.params
        if i >= p.max_index_step:
            return x
        it = 0
        while self.loss_prev > p.loss_threshold and it < p.max_iter:  # while L_prev > τ and iteration < max_iter
            x, loss = self.step(x, t)
            self.history.append((int(i), int(t), it, loss))
            self.loss_prev, it = loss, it + 1  # L_prev = L, measured before this update
        return x

    def loss_and_grad(self, x, t):
        """(L, ∇_z(s·L)) at latents x (1, 4, f, h, w): one cond-only, truncated UNet forward and backward."""
        if self.cond is None:
            raise ValueError("LatentGuidance: set the conditional embedding `.cond` (1, 77, d) first")
        if x.dim() != 5 or x.shape[0] != 1:
            raise ValueError(f"LatentGuidance: latents must be (1, 4, f, h, w), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)  # a device tensor: no host copy inside the pass
        loss, g, *maps = self.run_pass(x, t, self.cond)
        self.last_maps = dict(zip(GUIDED_LAYERS, maps))
        return loss, g

    def _pass(self, x, t, cond):
        """(L, ∇_z(s·L), the six maps (f, n, q, l)): tensors in and out, no host synchronisation."""
        store = AttentionStore(GUIDED_LAYERS, truncate=True)
        with torch.inference_mode(False), torch.enable_grad():
            z = x.detach().clone().requires_grad_(True)
            cond = cond.clone()  # an ordinary tensor even if made under inference_mode
            self.unet(z, t, cond, store=store)  # stops after the last guided layer
            maps = {path: store.maps[path] for path in GUIDED_LAYERS}  # (b f) n q l, b = 1 -> f n q l
            dt = torch.promote_types(maps[GUIDED_LAYERS[0]].dtype, torch.float32)
            masks, prepared = self._masks_on(z.device, dt)
            loss = energy(maps, masks, self.token_positions, self.params, prepared)
            (g,) = torch.autograd.grad(self.params.loss_scale * loss, z)  # g = ∇_z (s·L)
        return (loss.detach(), g, *(m.detach() for m in maps.values()))

    def _masks_on(self, device, dtype):
        """The masks on `device` and their `mask_terms`: made once, in the first pass."""
        key = (device, dtype, self.params)
        if key not in self._device_masks:
            masks = {path: m.to(device) for path, m in self.masks.items()}
            self._device_masks[key] = masks, mask_terms(masks, self.params, dtype)
        return self._device_masks[key]

    def step(self, x, t):
        """One guidance iteration at timestep t -> (updated latents, L measured before the update)."""
        loss, g = self.loss_and_grad(x, t)
        ab = self.schedule.alpha_bar  # NoiseSchedule.alpha_bar(t), or a table indexed by t
        alpha_bar = float(ab(int(t)) if callable(ab) else ab[int(t)])
        return (x - math.sqrt(1.0 - alpha_bar) * g.to(x.dtype)).detach(), float(loss)  # z ← z − √(1 − ᾱ_t)·g


def guidance_for_layout(pipe, prompt, layout, frames, height, width, params):
    """The pipeline's glue: -> (LatentGuidance whose `.cond` is still to be set, the final prompt).

    pipe: has tokenizer, unet, schedule; layout: planner.Layout (`object_boxes(frames)` -> tracks with
    .name and .boxes (frames, 4) normalised corners); height, width: in pixels (latent = 1/8)."""
    tracks = layout.object_boxes(frames)
    names = [tr.name for tr in tracks]
    final, positions, suffixes = resolve_tokens(pipe.tokenizer, prompt, layout.background, names)
    boxes = np.stack([np.asarray(tr.boxes, dtype=np.float64) for tr in tracks]) if tracks else np.zeros((0, frames, 4))
    masks = layer_masks(boxes, (height // 8, width // 8))
    guide = LatentGuidance(pipe.unet, None, masks, positions, pipe.schedule, params, names, suffixes)
    return guide, final

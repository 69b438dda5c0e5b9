"""A toy world of coloured shapes on a grey background: scenes, a renderer, captions, boxes, a colour
detector and a video-level layout score. The synthetic stand-in for the benchmark's videos and detector,
for training and checking a tiny text-to-video model on the CPU.

What to read: `lvd-method.md` §7 (the benchmark: prompt templates §7.1, predicates §7.2, video accuracy
§7.4), §3.2–§3.3 (objects, boxes, keyframe interpolation; see layout.py).

Official implementation: none. The paper scores real generated videos with OWL-ViT
(scripts/eval_owl_vit.py in TonyLianLong/LLM-groundedVideoDiffusion @22d90d2); this module is a
synthetic stand-in with an exact ground truth.

Differences (deliberate):
- The detector finds pixels of one colour (within a tolerance) and returns their centre of mass and
  pixel fraction; no boxes, no text queries, no NMS. Two objects of one colour cannot be told apart, so
  `sample_scene` draws distinct colours and `score` refuses repeated colours.
- The score is per object and per frame against the object's own box ("placed": detected, with its
  centre inside the box), over all frames rather than 6; an object passes if placed in at least
  `min_fraction` of the frames, the video if every object passes. The §7.2 predicates test relations
  (left of, count, quadrant); this tests the boxes themselves, which is stricter.
- The world is the unit square: positions and sizes are normalised, so on a non-square frame shapes
  stretch with it (a ball becomes an ellipse), as LVD's square 512 canvas stretches onto 576 × 320 video.
- Captions follow the benchmark's object phrases ("a red ball moving from the left to the right") without
  its "A realistic lively video of a scene with" prefix.

Glossary: F (frames), O (objects), H, W (frame height, width), t = k / (F − 1) (time of frame k),
s (an object's half-size, normalised), xyxy (normalised corners x0, y0, x1, y1).
"""
import types
from dataclasses import dataclass

import numpy as np
import torch

import layout as L

SHAPES = ("ball", "square", "triangle")
COLOURS = types.MappingProxyType({"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 30, 220)})
BACKGROUND = (210, 210, 210)          # light grey
BACKGROUND_NAME = "grey"
MIN_MOTION = 0.1                      # centre displacement (normalised) below which a caption says "static"
SIZE_RANGE = (0.07, 0.14)             # half-size s, normalised


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour name, half-size s (the box is centre ± s), straight path start -> end (x, y)."""
    shape: str
    colour: str
    size: float
    start: tuple
    end: tuple

    def __post_init__(self):
        if self.shape not in SHAPES or self.colour not in COLOURS:
            raise ValueError(f"unknown shape or colour: {self.shape!r}, {self.colour!r}")
        if not 0 < self.size < 0.5:
            raise ValueError(f"size (half-size) must be in (0, 0.5), got {self.size}")

    @property
    def name(self):
        return f"{self.colour} {self.shape}"

    def centre(self, t):
        """Centre (x, y) at times t (T,) in [0, 1] -> (T, 2), linear from start to end."""
        t = np.asarray(t, float)[:, None]                                   # (T,) -> (T, 1)
        return (1 - t) * np.asarray(self.start, float) + t * np.asarray(self.end, float)


@dataclass(frozen=True)
class Scene:
    """1–3 objects, drawn in order (later over earlier); `frames` is the default video length."""
    objects: tuple
    frames: int = 16


def frame_times(frames):
    """t_k = k / (F − 1) for k = 0…F−1 (a single frame sits at t = 0)."""
    return np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)


def expected_area(shape, size):
    """Pixel fraction of an unoccluded shape of half-size s: disc π s², square 4 s², triangle 2 s²."""
    return {"ball": np.pi, "square": 4.0, "triangle": 2.0}[shape] * size ** 2


# -----------------------------------------------------------------------------
# 1. sampling

def sample_scene(rng, frames=16, n_objects=None, p_static=0.3):
    """Draw a scene from a numpy Generator: distinct colours (hence distinct (shape, colour) pairs), each
    object static with probability p_static, else moving 0.35…(1 − 2s) along one axis with a small drift
    (≤ 25% of that) on the other, so captions' direction words are unambiguous. Boxes stay inside [0, 1]."""
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    if not 1 <= n <= len(COLOURS):
        raise ValueError(f"n_objects must be 1…{len(COLOURS)}, got {n}")
    colours = [str(c) for c in rng.permutation(list(COLOURS))[:n]]
    objs = []
    for colour in colours:
        shape = str(SHAPES[int(rng.integers(len(SHAPES)))])
        s = float(rng.uniform(*SIZE_RANGE))
        if rng.random() < p_static:
            p = tuple(float(v) for v in rng.uniform(s, 1 - s, 2))
            objs.append(Obj(shape, colour, s, p, p))
            continue
        axis, sign = int(rng.integers(2)), 1 if rng.random() < 0.5 else -1
        length = float(rng.uniform(0.35, 1 - 2 * s))
        a0 = float(rng.uniform(s, 1 - s - length)) if sign > 0 else float(rng.uniform(s + length, 1 - s))
        b0 = float(rng.uniform(s, 1 - s))
        b1 = float(np.clip(b0 + rng.uniform(-0.25, 0.25) * length, s, 1 - s))
        a1 = a0 + sign * length
        start, end = ((a0, b0), (a1, b1)) if axis == 0 else ((b0, a0), (b1, a1))
        objs.append(Obj(shape, colour, s, start, end))
    return Scene(tuple(objs), frames)


# -----------------------------------------------------------------------------
# 2. rendering

def _mask(obj, cx, cy, xs, ys):
    """Boolean (H, W) mask of obj centred at (cx, cy); xs (1, W), ys (H, 1) pixel-centre coordinates."""
    s = obj.size
    if obj.shape == "ball":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= s ** 2
    if obj.shape == "square":
        return (np.abs(xs - cx) <= s) & (np.abs(ys - cy) <= s)
    top = cy - s                                                            # upright: apex at the top, base at cy + s
    return (ys >= top) & (ys <= cy + s) & (np.abs(xs - cx) <= (ys - top) / 2)


def render(scene, frames=None, height=64, width=64):
    """uint8 video (F, H, W, 3): each object filled in its colour, in order, over the grey background."""
    frames = scene.frames if frames is None else frames
    ys = ((np.arange(height) + 0.5) / height)[:, None]                     # (H, 1)
    xs = ((np.arange(width) + 0.5) / width)[None, :]                       # (1, W)
    video = np.empty((frames, height, width, 3), np.uint8)
    video[:] = BACKGROUND
    t = frame_times(frames)
    for obj in scene.objects:
        centres = obj.centre(t)                                            # (F, 2)
        for k, (cx, cy) in enumerate(centres):
            video[k][_mask(obj, cx, cy, xs, ys)] = COLOURS[obj.colour]
    return video


def render_batch(scenes, frames, height, width, device="cpu"):
    """Batched torch `render`: float video (B, F, 3, H, W) in [0, 1] on `device`, for training on a GPU.
    Same rule as `render` (painted in order over the background, pixel-centre tests in float32)."""
    n_slots = max(len(s.objects) for s in scenes)
    B = len(scenes)
    shape = torch.full((B, n_slots), -1, dtype=torch.long)                 # -1: empty slot
    colour, size = torch.zeros(B, n_slots, 3), torch.zeros(B, n_slots)
    start, end = torch.zeros(B, n_slots, 2), torch.zeros(B, n_slots, 2)
    for b, scene in enumerate(scenes):
        for j, o in enumerate(scene.objects):
            shape[b, j], size[b, j] = SHAPES.index(o.shape), o.size
            colour[b, j] = torch.tensor(COLOURS[o.colour], dtype=torch.float32) / 255
            start[b, j], end[b, j] = torch.tensor(o.start), torch.tensor(o.end)
    shape, colour, size, start, end = (x.to(device) for x in (shape, colour, size, start, end))
    t = torch.as_tensor(frame_times(frames), dtype=torch.float32, device=device)
    c = start[:, :, None] + t[None, None, :, None] * (end - start)[:, :, None]  # (B, O, F, 2)
    cx, cy = c[..., 0, None, None], c[..., 1, None, None]                  # (B, O, F, 1, 1)
    ys = ((torch.arange(height, device=device) + 0.5) / height)[:, None]   # (H, 1)
    xs = ((torch.arange(width, device=device) + 0.5) / width)[None, :]     # (1, W)
    s = size[:, :, None, None, None]                                       # (B, O, 1, 1, 1)
    top = cy - s
    masks = torch.stack([
        (xs - cx) ** 2 + (ys - cy) ** 2 <= s ** 2,                                           # ball
        ((xs - cx).abs() <= s) & ((ys - cy).abs() <= s),                                   # square
        (ys >= top) & (ys <= cy + s) & ((xs - cx).abs() <= (ys - top) / 2),                 # triangle
    ])                                                                      # (3, B, O, F, H, W)
    bg = torch.tensor(BACKGROUND, dtype=torch.float32, device=device) / 255
    video = bg[None, None, :, None, None].expand(B, frames, 3, height, width).clone()
    for j in range(n_slots):
        k = shape[:, j].clamp(min=0)
        m = masks[k, torch.arange(B, device=device), j] & (shape[:, j] >= 0)[:, None, None, None]  # (B, F, H, W)
        video = torch.where(m[:, :, None], colour[:, j, None, :, None, None], video)
    return video


def latents_of(video):
    """The toy model's latent map E (its VAE encoder): video (B, F, 3, H, W) in [0, 1] -> latents
    (B, 4, F, H/8, W/8): per 8×8 cell, the mean colour in [−1, 1] minus the background's (channels 0–2) and
    the fraction of non-background pixels, doubled (channel 3). Fixed, not learned; the toy VAE decoder
    is trained to invert it (scripts/train_toy.py)."""
    B, F_, _, H, W = video.shape
    bg = torch.tensor(BACKGROUND, dtype=video.dtype, device=video.device)[:, None, None] / 255
    x = (video - bg).flatten(0, 1) * 2                                      # B F 3 H W -> (B F) 3 H W
    cover = (x.abs().sum(1, keepdim=True) > 1e-3).to(x.dtype) * 2           # (B F) 1 H W
    z = torch.nn.functional.avg_pool2d(torch.cat([x, cover], 1), 8)         # (B F) 4 h w
    return z.unflatten(0, (B, F_)).transpose(1, 2)                          # (B F) 4 h w -> B 4 F h w


# -----------------------------------------------------------------------------
# 3. captions

def direction(obj, min_motion=MIN_MOTION):
    """'from the left to the right' etc. along the dominant axis of motion, or None if it barely moves."""
    dx, dy = np.subtract(obj.end, obj.start)
    if np.hypot(dx, dy) < min_motion:
        return None
    if abs(dx) >= abs(dy):
        return "from the left to the right" if dx > 0 else "from the right to the left"
    return "from the top to the bottom" if dy > 0 else "from the bottom to the top"   # y grows downwards


def caption(scene, min_motion=MIN_MOTION):
    """'a red ball moving from the left to the right and a blue square' (benchmark phrasing, §7.1)."""
    phrases = []
    for obj in scene.objects:
        d = direction(obj, min_motion)
        phrases.append(f"a {obj.name}" + (f" moving {d}" if d else ""))
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


# -----------------------------------------------------------------------------
# 4. boxes and layouts

def boxes_at(scene, t):
    """Normalised xyxy boxes at times t (T,) -> (O, T, 4)."""
    out = []
    for obj in scene.objects:
        c = obj.centre(t)                                                  # (T, 2) as (x, y)
        out.append(np.concatenate([c - obj.size, c + obj.size], axis=1))  # (T, 2) ++ (T, 2) -> (T, 4)
    return np.stack(out) if out else np.zeros((0, len(t), 4))


def scene_boxes(scene, frames=None):
    """(O, F, 4) normalised xyxy per object per frame: the format `attention.layer_masks` takes."""
    return boxes_at(scene, frame_times(scene.frames if frames is None else frames))


def to_layout(scene, prompt=None):
    """A layout.Layout of the scene: six keyframes at t_i = i/5, boxes [x, y, w, h] rounded to the 512
    canvas, id = object index, name = 'red ball', background 'grey'. prompt defaults to the caption."""
    boxes = boxes_at(scene, np.arange(L.NUM_LAYOUT_FRAMES) / (L.NUM_LAYOUT_FRAMES - 1))  # (O, 6, 4)
    px = np.rint(np.clip(boxes, 0, 1) * L.CANVAS).astype(int)             # xyxy in canvas pixels
    frames = [[{"id": i, "name": obj.name,
                "box": [int(px[i, k, 0]), int(px[i, k, 1]),
                        int(px[i, k, 2] - px[i, k, 0]), int(px[i, k, 3] - px[i, k, 1])]}
               for i, obj in enumerate(scene.objects)]
              for k in range(L.NUM_LAYOUT_FRAMES)]
    return L.Layout(caption(scene) if prompt is None else prompt, BACKGROUND_NAME, frames,
                    "synthetic toy-world scene")


# -----------------------------------------------------------------------------
# 5. the detector

def _to_numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def detect(frame, colour, tol=80.0, min_pixels=8):
    """Pixels of `colour` (a name or an RGB triple) within Euclidean RGB distance tol, in a frame (H, W, 3)
    of 0…255 values -> (cy, cx, area): normalised centre of mass (pixel centres) and pixel fraction, or
    None if fewer than min_pixels match."""
    frame = _to_numpy(frame).astype(np.float32)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"detect: frame must be (H, W, 3), got {frame.shape}")
    rgb = np.asarray(COLOURS[colour] if isinstance(colour, str) else colour, np.float32)
    hit = ((frame - rgb) ** 2).sum(-1) <= tol ** 2                         # (H, W)
    n = int(hit.sum())
    if n < max(min_pixels, 1):
        return None
    rows, cols = np.nonzero(hit)
    h, w = hit.shape
    return float((rows.mean() + 0.5) / h), float((cols.mean() + 0.5) / w), n / (h * w)


# -----------------------------------------------------------------------------
# 6. the score

def score(frames_u8, target, min_fraction=0.75, tol=80.0, min_pixels=8):
    """Video-level layout score. target: a Scene, or (boxes (O, F, 4) xyxy, colours) with optional names
    as a third item. Per frame an object is placed if detected with its centre in its box (for an all-zero,
    i.e. absent, box: if not detected); it passes if placed in ≥ min_fraction of the frames; the video
    passes if all objects do. Returns {"passed", "min_fraction", "objects": [{"name", "colour", "placed"
    (F bools), "centres" (F (cy, cx) or None), "fraction", "passed"}]}."""
    video = _to_numpy(frames_u8)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"score: frames must be (F, H, W, 3), got {video.shape}")
    if isinstance(target, Scene):
        boxes = scene_boxes(target, len(video))
        colours = [o.colour for o in target.objects]
        names = [o.name for o in target.objects]
    else:
        boxes, colours = np.asarray(target[0], float), list(target[1])
        names = list(target[2]) if len(target) > 2 else [str(c) for c in colours]
    if boxes.shape != (len(colours), len(video), 4):
        raise ValueError(f"score: boxes {boxes.shape} do not match {len(colours)} objects × {len(video)} frames")
    keys = [c if isinstance(c, str) else tuple(c) for c in colours]
    if len(set(keys)) != len(keys):
        raise ValueError(f"score: the colour detector cannot separate objects of one colour: {colours}")
    results = []
    for name, colour, obj_boxes in zip(names, colours, boxes):
        placed, centres = [], []
        for frame, (x0, y0, x1, y1) in zip(video, obj_boxes):
            d = detect(frame, colour, tol, min_pixels)
            centres.append(None if d is None else d[:2])
            if not (x1 or y1):                                             # absent box (§7.2's validity rule)
                placed.append(d is None)
            else:
                placed.append(d is not None and x0 <= d[1] <= x1 and y0 <= d[0] <= y1)
        frac = float(np.mean(placed)) if placed else 0.0
        results.append({"name": name, "colour": colour, "placed": placed, "centres": centres,
                        "fraction": frac, "passed": frac >= min_fraction})
    return {"passed": all(r["passed"] for r in results), "min_fraction": min_fraction, "objects": results}

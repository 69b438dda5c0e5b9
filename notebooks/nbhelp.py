"""Helpers shared by the walkthrough notebooks: the model folder, the run settings, and pictures with pillow.

What to read: nothing of the method lives here. The notebooks import lvd's modules (planner, attention,
sampler, unet3d, lvd) for everything they explain; this file only finds the weights and draws pictures,
so that the notebooks need no matplotlib and run the same in Jupyter and in tests/test_notebooks.py.

Official implementation: none (the official repository has no notebooks).

Differences: not applicable. Conventions:
- `setup()` uses the real weights when the environment variable LVD_MODEL_DIR names a model folder
  (python weights/download.py writes one), and otherwise writes the tiny random checkpoint of
  weights/make_tiny.py to a temporary folder; `setup(toy=True)` (notebooks 3 and 4) uses the committed toy
  model instead. It prints which, and the sizes the notebook will use.
- `show(image, name)` writes `name.png` to $LVD_NOTEBOOK_OUT (default: notebooks/_out), prints the
  path, and displays the image when running inside a Jupyter kernel.

Glossary: f (frames), H, W (image height, width in pixels), h, w (grid height, width).
"""
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lvd  # noqa: E402
import planner  # noqa: E402
from weights.make_tiny import make_tiny  # noqa: E402

DEMO_PROMPT = "A bear walks from the left to the right"
TOY_PROMPT = "a red ball moving from the left to the right"  # a bundled toy layout: the ball goes along the top
TINY = dict(frames=8, height=128, width=128, steps=8)  # small enough for a CPU: all four notebooks in < 1 min


# -----------------------------------------------------------------------------
# weights and settings

def setup(toy=False):
    """-> SimpleNamespace(root, model_dir, kind ('real', 'toy' or 'tiny'), real, model, device, dtype, frames,
    height, width, steps, cfg_scale, negative_prompt, prompt, seed, out) with `plan()`, the prompt's layout.
    toy=True: without LVD_MODEL_DIR, the committed toy model (models/toy) instead of the tiny random one."""
    out = Path(os.environ.get("LVD_NOTEBOOK_OUT") or ROOT / "notebooks" / "_out")
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = types.SimpleNamespace(root=ROOT, out=out, device=device, model="modelscope", real=False, model_dir=None,
                              dtype=torch.float16 if device == "cuda" else torch.float32, prompt=DEMO_PROMPT,
                              cfg_scale=9.0, negative_prompt=lvd.NEGATIVE_PROMPT, kind="tiny", seed=0)
    s.plan = lambda: planner.plan(s.prompt, examples=lvd.layout_examples(s.model))
    env = os.environ.get("LVD_MODEL_DIR")
    if env:
        s.model = os.environ.get("LVD_MODEL", "modelscope")  # or zeroscope (sizes and presets follow it)
        if s.model not in lvd.MODELS or not os.path.isfile(os.path.join(env, "unet", "config.json")):
            raise FileNotFoundError(f"LVD_MODEL_DIR={env!r} (LVD_MODEL={s.model!r}) is not a model folder; fetch "
                                    f"the weights with: {lvd.download_command('modelscope', 'fp16', env)}")
        s.model_dir, s.real, s.kind = env, True, "real"
        s.__dict__.update(lvd.MODELS[s.model])
        print(f"Using the REAL {s.model} weights in {env} on {device} ({str(s.dtype)[6:]}): "
              f"{s.frames} frames, {s.height}x{s.width}, {s.steps} steps.")
    elif toy:
        s.kind, s.model, s.model_dir, s.prompt = "toy", "toy", str(ROOT / "models" / "toy"), TOY_PROMPT
        s.dtype = torch.float32
        s.seed = 1  # its guidance places the demo ball for seed 1, not 0 (tests/test_toy_model.py, README figure)
        s.__dict__.update(lvd.MODELS["toy"])
        print(f"LVD_MODEL_DIR is not set: using the TOY model trained on moving shapes (models/toy, "
              f"scripts/train_toy.py) on {device}: {s.frames} frames, {s.height}x{s.width}, {s.steps} steps, "
              f"CFG {s.cfg_scale:g}.\nIts layouts ship in data/layouts/toy.json; the prompt is {s.prompt!r}.")
    else:
        s.__dict__.update(TINY)
        s.model_dir = tiny_checkpoint()
        print(f"LVD_MODEL_DIR is not set: using the TINY random checkpoint (weights/make_tiny.py) in "
              f"{s.model_dir}.\nIts weights are random, so the pictures show the mechanics (shapes, masks, "
              f"gradients, the loop), not a real video. Point LVD_MODEL_DIR at the real weights "
              f"(python weights/download.py) to see the real thing.\nSettings on {device}: {s.frames} frames, "
              f"{s.height}x{s.width}, {s.steps} steps.")
    print(f"Pictures go to {out}")
    return s


def tiny_checkpoint():
    """The tiny random model folder (make_tiny, seed 0), written once per version of make_tiny.py to the
    temporary folder and reused (written beside and renamed into place, so concurrent notebooks are safe)."""
    import hashlib
    import shutil
    tag = hashlib.sha1((ROOT / "weights" / "make_tiny.py").read_bytes()).hexdigest()[:10]
    final = Path(tempfile.gettempdir()) / f"lvd-tiny-{tag}"
    if (final / "vae" / "diffusion_pytorch_model.safetensors").is_file():
        return str(final)
    tmp = make_tiny(tempfile.mkdtemp(prefix=".lvd-tiny-", dir=final.parent), seed=0)
    try:
        os.rename(tmp, final)  # atomic; fails if another process put it there first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


# -----------------------------------------------------------------------------
# showing a picture in Jupyter and in the plain test runner

def _in_kernel():
    ip = sys.modules.get("IPython")
    ip = ip.get_ipython() if ip is not None else None
    return ip is not None and hasattr(ip, "kernel")


def show(image, name):
    """Save `image` (PIL) as $LVD_NOTEBOOK_OUT/name.png (atomically), print the path, display it in Jupyter."""
    out = Path(os.environ.get("LVD_NOTEBOOK_OUT") or ROOT / "notebooks" / "_out")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    tmp = out / f".{name}.tmp.png"
    image.save(tmp)
    os.replace(tmp, path)
    if _in_kernel():
        from IPython.display import display
        display(image)
    print(f"[picture {image.width}x{image.height}] {path}")


# -----------------------------------------------------------------------------
# pictures

def gradient_frames(f, H, W):
    """f uint8 frames (f, H, W, 3): a sky-to-ground gradient, a blank stage to draw layouts on."""
    y = np.linspace(0.0, 1.0, H)[:, None, None]
    sky, ground = np.array([205, 225, 245]), np.array([150, 185, 120])
    img = (sky * (1 - y) + ground * y) * np.ones((1, W, 1))  # (H, 1, 3) * (1, W, 1) -> (H, W, 3)
    return np.repeat(img[None].astype(np.uint8), f, axis=0)  # H W 3 -> f H W 3


def grid(images, cols=None, labels=None, row_labels=None, pad=4, label_h=14, margin=0):
    """Tile PIL images (all the same size) into rows of `cols`, with a label above each and one per row."""
    cols = cols or len(images)
    rows = -(-len(images) // cols)
    w, h = images[0].size
    margin = margin or (max(len(r) for r in row_labels) * 6 + 8 if row_labels else 0)
    lh = label_h if labels else 0
    canvas = Image.new("RGB", (margin + cols * (w + pad) + pad, rows * (h + lh + pad) + pad), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        x, y = margin + pad + c * (w + pad), pad + r * (h + lh + pad)
        if labels:
            d.text((x, y), str(labels[k]), fill=(0, 0, 0))
        canvas.paste(im.convert("RGB"), (x, y + lh))
    for r, text in enumerate(row_labels or []):
        d.text((2, pad + r * (h + lh + pad) + lh + h // 2 - 6), str(text), fill=(0, 0, 0))
    return canvas


_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], float)  # inferno-like


def heatmap(values, size=None, vmin=None, vmax=None, lines=False):
    """A 2-D array or tensor -> a colour PIL image (dark = low, yellow = high), upsampled nearest to `size`;
    lines=True draws the cell borders in grey."""
    a = values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    lo = float(a.min()) if vmin is None else vmin
    hi = float(a.max()) if vmax is None else vmax
    u = np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0, 1) * (len(_ANCHORS) - 1)
    i = np.minimum(u.astype(int), len(_ANCHORS) - 2)
    rgb = _ANCHORS[i] + (u - i)[..., None] * (_ANCHORS[i + 1] - _ANCHORS[i])  # (h, w) -> (h, w, 3)
    im = Image.fromarray(rgb.astype(np.uint8))
    im = im.resize(size, Image.NEAREST) if size else im
    if lines:
        d, (h, w) = ImageDraw.Draw(im), a.shape
        for k in range(1, w):
            d.line([k * im.width / w, 0, k * im.width / w, im.height], fill=(128, 128, 128))
        for k in range(1, h):
            d.line([0, k * im.height / h, im.width, k * im.height / h], fill=(128, 128, 128))
    return im


def outline(image, cell_box, grid_hw, color=(0, 255, 255)):
    """Draw a grid-cell box (y0, x0, y1, x1), end-exclusive on a grid of grid_hw, over a PIL image in place."""
    (y0, x0, y1, x1), (h, w) = cell_box, grid_hw
    sy, sx = image.height / h, image.width / w
    ImageDraw.Draw(image).rectangle([x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1], outline=color)
    return image


def _axes(d, box, xr, yr, xlabel, ylabel, title, nticks=5, xint=False):
    x0, y0, x1, y1 = box
    d.rectangle(box, outline=(0, 0, 0))
    nx = int(xr[1] - xr[0]) if xint and xr[1] - xr[0] <= 12 else nticks  # integer x: one tick per value
    for k in range(nx + 1):
        px = x0 + (x1 - x0) * k / nx
        d.line([px, y1, px, y1 + 3], fill=(0, 0, 0))
        d.text((px - 8, y1 + 5), f"{xr[0] + (xr[1] - xr[0]) * k / nx:.3g}", fill=(0, 0, 0))
    for k in range(nticks + 1):
        py = y1 - (y1 - y0) * k / nticks
        d.line([x0 - 3, py, x0, py], fill=(0, 0, 0))
        d.text((2, py - 6), f"{yr[0] + (yr[1] - yr[0]) * k / nticks:.4g}", fill=(0, 0, 0))
    d.text(((x0 + x1) // 2 - 3 * len(xlabel), y1 + 20), xlabel, fill=(0, 0, 0))
    d.text((2, 2), f"{title}   (y: {ylabel})", fill=(0, 0, 0))


def line_plot(series, title="", xlabel="", ylabel="", size=(480, 300), ylim=None):
    """series: {label: (xs, ys, style)} with style 'line', 'dots' or 'both' -> a PIL image of the plot."""
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207)]
    W, H = size
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    xs_all = np.concatenate([np.asarray(v[0], float) for v in series.values()])
    ys_all = np.concatenate([np.asarray(v[1], float) for v in series.values()])
    xr = (float(xs_all.min()), float(xs_all.max()) if xs_all.max() > xs_all.min() else float(xs_all.min()) + 1)
    yr = ylim or (float(ys_all.min()), float(ys_all.max()))
    if yr[1] <= yr[0]:
        yr = (yr[0] - 1, yr[1] + 1)
    box = (56, 22, W - 12, H - 40)
    _axes(d, box, xr, yr, xlabel, ylabel, title, xint=bool(np.all(xs_all == np.round(xs_all))))
    to_px = lambda x, y: (box[0] + (x - xr[0]) / (xr[1] - xr[0]) * (box[2] - box[0]),
                          box[3] - (y - yr[0]) / (yr[1] - yr[0]) * (box[3] - box[1]))
    for n, (label, (xs, ys, style)) in enumerate(series.items()):
        c = colors[n % len(colors)]
        pts = [to_px(float(x), float(y)) for x, y in zip(xs, ys)]
        if style in ("line", "both") and len(pts) > 1:
            d.line(pts, fill=c, width=2)
        if style in ("dots", "both"):
            for px, py in pts:
                d.ellipse([px - 3, py - 3, px + 3, py + 3], outline=c, fill=c if style == "dots" else None)
        y = box[1] + 6 + 12 * n
        d.line([box[2] - 160, y + 5, box[2] - 146, y + 5], fill=c, width=2)
        d.text((box[2] - 142, y), label, fill=c)
    return img


def bar_chart(labels, values, title="", size=None, log=False):
    """Horizontal bars, one per label (values >= 0); log=True scales the bar lengths by log10(1 + v)."""
    size = size or (520, 22 + 16 * len(labels))
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((2, 2), title, fill=(0, 0, 0))
    vals = np.log10(1 + np.asarray(values, float)) if log else np.asarray(values, float)
    left, right = 8 + 6 * max(len(str(s)) for s in labels), size[0] - 90
    top = vals.max() if len(vals) and vals.max() > 0 else 1.0
    for k, (lab, v, raw) in enumerate(zip(labels, vals, values)):
        y = 20 + 16 * k
        d.text((2, y), str(lab), fill=(0, 0, 0))
        d.rectangle([left, y + 2, left + (right - left) * v / top, y + 12], fill=(31, 119, 180))
        d.text((left + (right - left) * v / top + 4, y), f"{raw:,.4g}" if isinstance(raw, float) else f"{raw:,}",
               fill=(0, 0, 0))
    return img


def unet_diagram(stages, marks=None, width=330, row=26, indent=70):
    """The UNet's top-level stages as a sideways 'U': one row per stage in call order, indented by its level
    (how many times the grid was halved). stages = [(name, shape, level)]; marks = {name: note} outlines
    those rows in orange and writes the note beside them."""
    marks = marks or {}
    levels = max(lv for _, _, lv in stages) + 1
    img = Image.new("RGB", (levels * indent + width + 260, len(stages) * row + 8), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for k, (name, shape, lv) in enumerate(stages):
        x, y = 4 + lv * indent, 4 + k * row
        color = (255, 140, 0) if name in marks else (90, 90, 90)
        d.rectangle([x, y, x + width, y + row - 4], outline=color, width=3 if name in marks else 1)
        d.text((x + 5, y + 5), f"{name}  {tuple(shape)}", fill=(0, 0, 0))
        if name in marks:
            d.text((x + width + 8, y + 5), marks[name], fill=(200, 100, 0))
    return img

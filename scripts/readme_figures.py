"""Regenerate the README's figures from the released GPT-4 layout of the demo prompt; no weights, no LLM.

Usage: python scripts/readme_figures.py [--out docs/figures]

Writes, each well under 200 KB:
- demo_layout.png     the layout for "A bear walks from the left to the right" over its six keyframes;
- demo_layout_16.png  its interpolation to the 16 video frames of ModelScope (keyframes marked "key");
- demo_layout_16.gif  the same 16 frames as an 8 fps animation (the rate LVD saves videos at).

What to read: `lvd-method.md` §2.1 (the DSL), §3.2 (boxes -> normalised corners), §3.3 (interpolation
to N frames: keyframe i lands on video frame 3i for N = 16).

Official implementation: the reply is the official repository's cached gpt-4-1106-preview layout for
the demo prompt (shipped in data/layouts/examples.json); the drawing is the project's own
`planner.Layout.interpolate` and `lvd.draw_boxes`, the same code that writes each run's layout.gif.

Differences: the frames are a plain sky-to-ground gradient instead of a generated video, so the
figures mean something without weights. With six frames, `draw_boxes` (which interpolates) shows the
keyframes themselves: video frame i of 6 is queried at i·(1 - 1e-5)/5, within 1e-5 of keyframe i.

Glossary: f (frames), S (side of one frame in pixels), PAD (gap between frames), TOP (title band).
"""
import argparse
import os
import sys
import warnings

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import lvd  # noqa: E402
import planner  # noqa: E402

DEMO_PROMPT = "A bear walks from the left to the right"
RELEASED_MODEL = "gpt-4-1106-preview"
PAD, TOP, LABEL = 6, 20, 14                  # geometry of the strips (tests read it)
S6, S16, S_GIF = 160, 96, 192                # frame sides: keyframe strip, 16-frame strip, GIF
FPS = 8


def released_layout():
    """The released GPT-4 layout for the demo prompt, from data/layouts/examples.json (never an LLM)."""
    cache = planner.LayoutCache(planner.EXAMPLES_PATH, read_only=True)
    reply = cache.get(DEMO_PROMPT, model=RELEASED_MODEL)
    if reply is None:
        raise LookupError(f"no {RELEASED_MODEL} layout for {DEMO_PROMPT!r} in {planner.EXAMPLES_PATH}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", planner.LayoutWarning)  # frame 6's box is clipped at the right edge
        return planner.parse_layout(reply, DEMO_PROMPT)


def stage(f, side):
    """f blank frames (f, side, side, 3) uint8: a sky-to-ground gradient."""
    y = np.linspace(0.0, 1.0, side)[:, None, None]
    img = (np.array([205, 225, 245]) * (1 - y) + np.array([150, 185, 120]) * y) * np.ones((1, side, 1))  # (S, S, 3)
    return np.repeat(img[None].astype(np.uint8), f, axis=0)  # S S 3 -> f S S 3


def strip(images, labels, title, cols):
    """Images of one size in rows of `cols`, each with a label above, under a title band."""
    side = images[0].width
    rows = -(-len(images) // cols)
    out = Image.new("RGB", (PAD + cols * (side + PAD), TOP + rows * (LABEL + side + PAD)), (255, 255, 255))
    d = ImageDraw.Draw(out)
    d.text((PAD, 4), title, fill=(0, 0, 0))
    for k, (im, text) in enumerate(zip(images, labels)):
        r, c = divmod(k, cols)
        x, y = PAD + c * (side + PAD), TOP + r * (LABEL + side + PAD)
        d.text((x, y), text, fill=(0, 0, 0))
        out.paste(im, (x, y + LABEL))
    return out


def frame_origin(k, side, cols):
    """Top-left pixel of frame k inside a strip made by `strip` (for tests and readers)."""
    r, c = divmod(k, cols)
    return PAD + c * (side + PAD), TOP + r * (LABEL + side + PAD) + LABEL


def make_figures(out_dir):
    """Write the three figures into out_dir (atomically each); return their paths."""
    layout = released_layout()
    os.makedirs(out_dir, exist_ok=True)
    title = f'"{DEMO_PROMPT}": layout by GPT-4 (released), background "{layout.background}"'
    six = lvd.draw_boxes(stage(6, S6), layout)
    sixteen = lvd.draw_boxes(stage(16, S16), layout)
    gif = lvd.draw_boxes(stage(16, S_GIF), layout)
    for k, im in enumerate(gif):
        ImageDraw.Draw(im).text((4, 3), f"video frame {k}" + (f" = keyframe {k // 3 + 1}" if k % 3 == 0 else ""), fill=(0, 0, 0))
    figures = {
        "demo_layout.png": strip(six, [f"Frame {i + 1}  (t = {i / 5:.1f})" for i in range(6)], title, 6),
        "demo_layout_16.png": strip(sixteen, [f"{k}{'  key' if k % 3 == 0 else ''}" for k in range(16)],
                                    "interpolated to 16 video frames (keyframe i -> frame 3i)", 8),
    }
    paths = []
    for name, im in figures.items():
        paths.append(_save(out_dir, name, lambda tmp, im=im: im.save(tmp, format="PNG", optimize=True)))
    paths.append(_save(out_dir, "demo_layout_16.gif", lambda tmp: gif[0].save(
        tmp, format="GIF", save_all=True, append_images=gif[1:], duration=1000 // FPS, loop=0, optimize=True)))
    return paths


def _save(out_dir, name, write):
    path = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "figures"), help="output folder")
    args = ap.parse_args(argv)
    try:
        paths = make_figures(args.out)
    except (LookupError, planner.LayoutError, planner.CacheError, OSError) as e:
        print(f"readme_figures: error: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"{path}  ({os.path.getsize(path) / 1e3:.1f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

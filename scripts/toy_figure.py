"""Draw the README's toy-model figure: an unguided and a guided video of the toy model from the same noise,
with the layout's boxes, and the toy-world score of each.

Usage: python scripts/toy_figure.py [--out docs/figures/toy_guided_vs_unguided.png] [--seeds 1,0]

What to read: toyworld.py (`score`), scripts/eval_toy.py (the same two runs per layout, over 100 layouts);
`lvd-method.md` §4.6 and §6 (the guidance and the benchmark preset, here with the toy's values).

Official implementation: none. The layout is the bundled one for "a red ball moving from the left to the
right" (data/layouts/toy.json: the ball goes along the top); the drawing is `lvd.draw_boxes`.
"""
import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import attention  # noqa: E402
import lvd  # noqa: E402
import toyworld  # noqa: E402
from scripts.toy_layouts import scenes  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "figures", "toy_guided_vs_unguided.png"))
    ap.add_argument("--seeds", default="1,0", help="one pair of rows (unguided, guided) per seed; the default shows "
                    "a seed where the guidance places the ball and one where it does not")
    args = ap.parse_args(argv)
    pipe = lvd.load_pipeline(os.path.join(ROOT, "models", "toy"), "cpu", torch.float32, "toy")
    scene = scenes()[0]
    layout = toyworld.to_layout(scene)
    rows, labels = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, guidance in (("unguided", None), ("guided", attention.preset("benchmark", "toy"))):
            frames = lvd.generate(pipe, layout.prompt, layout, guidance=guidance, seed=seed, **lvd.MODELS["toy"])
            score = toyworld.score(frames, scene)["objects"][0]
            rows.append(np.concatenate([np.asarray(im) for im in lvd.draw_boxes(frames, layout)], axis=1))
            labels.append(f"seed {seed}, {name}: ball in its box in {sum(score['placed'])}/{len(frames)} frames")
    band = 16
    canvas = Image.new("RGB", (rows[0].shape[1], sum(r.shape[0] + band for r in rows)), (255, 255, 255))
    d, y = ImageDraw.Draw(canvas), 0
    for row, label in zip(rows, labels):
        d.text((4, y + 2), label, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(row), (0, y + band))
        y += row.shape[0] + band
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp.png"
    canvas.quantize(colors=64).save(tmp, optimize=True)  # flat colours: a 64-colour palette keeps it small
    os.replace(tmp, args.out)
    print(args.out, "|", "; ".join(labels))


if __name__ == "__main__":
    main()

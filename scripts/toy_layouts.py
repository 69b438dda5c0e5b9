"""Write the toy model's bundled layouts, data/layouts/toy.json: one toy-world scene per demo prompt.

Usage: python scripts/toy_layouts.py [OUT]   (default data/layouts/toy.json)

The file has the layout cache's schema (planner.py), so `python lvd.py --model toy --prompt ...` finds the
layout of a demo prompt without an LLM, as the shipped examples work for ModelScope. Each layout puts its
objects where the caption does not: the captions name only shapes, colours and directions, so without
guidance the model chooses the positions itself.
"""
import os
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import toyworld as T  # noqa: E402
from layout import atomic_write_json  # noqa: E402

FRAMES = 8
DEMOS = (  # (shape, colour, half-size, start (x, y), end (x, y)) per object
    [("ball", "red", 0.12, (0.2, 0.25), (0.8, 0.25))],                      # left -> right, along the top
    [("square", "blue", 0.12, (0.72, 0.2), (0.72, 0.8))],                   # top -> bottom, on the right
    [("triangle", "green", 0.13, (0.8, 0.72), (0.2, 0.72))],                # right -> left, along the bottom
    [("ball", "red", 0.12, (0.25, 0.3), (0.25, 0.3)), ("square", "blue", 0.12, (0.75, 0.7), (0.75, 0.7))],
    [("ball", "green", 0.11, (0.2, 0.3), (0.8, 0.3)), ("triangle", "red", 0.12, (0.8, 0.72), (0.2, 0.72))],
)


def scenes():
    return [T.Scene(tuple(T.Obj(*o) for o in objs), FRAMES) for objs in DEMOS]


def entries():
    out = []
    for scene in scenes():
        layout = T.to_layout(scene)
        layout.reasoning = "A toy-world scene: " + "; ".join(
            f"the {o.name} goes from ({o.start[0]:.2f}, {o.start[1]:.2f}) to ({o.end[0]:.2f}, {o.end[1]:.2f})"
            for o in scene.objects) + " (normalised x, y)."
        out.append({"template": "v0.1", "model": "toyworld", "prompt": layout.prompt, "sample_index": 0,
                    "reply": layout.to_text()})
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else os.path.join(ROOT, "data", "layouts", "toy.json")
    atomic_write_json(Path(path), {"schema": "lvd-layout-cache/1", "entries": entries()})
    print(path)


if __name__ == "__main__":
    main()

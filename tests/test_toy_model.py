"""The toy model: its training data path (batched renderer, latent map), its bundled layouts, the CLI's
`--model toy` defaults, the evaluation's intervals, and the committed model itself: the decoder inverts the
latent map, and LVD's guidance moves an object into its box where plain sampling does not.

What to read: toyworld.py, scripts/train_toy.py, scripts/eval_toy.py; `lvd-method.md` §4–§7.

Oracles: toyworld.render (the numpy renderer), hand-computed cell values, Wilson's interval from its formula
by hand (k = 5, n = 10: 0.2366…0.7634), the toy world's exact colour detector on decoded frames.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lvd
import planner
import toyworld as T

ROOT = Path(__file__).resolve().parent.parent
TOY_DIR = ROOT / "models" / "toy"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_batched_renderer_equals_the_numpy_renderer():
    rng = np.random.default_rng(3)
    scenes = [T.sample_scene(rng, frames=8, n_objects=1 + i % 3) for i in range(12)]
    video = T.render_batch(scenes, 8, 64, 96)                              # (B, F, 3, H, W) in [0, 1]
    got = (video.permute(0, 1, 3, 4, 2) * 255).round().to(torch.uint8).numpy()
    want = np.stack([T.render(s, 8, 64, 96) for s in scenes])
    assert (got != want).any(-1).sum() == 0                                # exact, pixel for pixel


def test_latent_map_is_mean_colour_and_coverage_per_cell():
    scene = T.Scene((T.Obj("square", "red", 0.25, (0.5, 0.5), (0.5, 0.5)),), 2)   # covers x, y in [0.25, 0.75]
    z = T.latents_of(T.render_batch([scene], 2, 64, 64))                   # (1, 4, 2, 8, 8)
    assert z.shape == (1, 4, 2, 8, 8)
    bg = np.array(T.BACKGROUND) / 255
    red = np.array(T.COLOURS["red"]) / 255
    inside, outside = z[0, :, 0, 4, 4].numpy(), z[0, :, 0, 0, 0].numpy()   # cells fully in / out of the square
    np.testing.assert_allclose(inside, [*(2 * (red - bg)), 2.0], atol=1e-6)
    np.testing.assert_allclose(outside, 0.0, atol=1e-7)


def test_bundled_layouts_are_in_sync_and_parse():
    entries = json.loads((ROOT / "data" / "layouts" / "toy.json").read_text())["entries"]
    assert entries == _script("toy_layouts").entries()                     # regenerated file == committed file
    for e in entries:
        layout = planner.parse_layout(e["reply"], e["prompt"])
        assert layout.background == "grey" and 1 <= len(layout.objects()) <= 2


def test_toy_defaults_and_download_refusal(capsys):
    args = lvd.parse_args(["--model", "toy", "--prompt", "a red ball", "--device", "cpu"])
    assert (args.height, args.width, args.frames, args.steps, args.cfg, args.negative_prompt) == (128, 128, 8, 20, 5.0, "")
    assert Path(args.model_dir) == TOY_DIR
    args = lvd.parse_args(["--prompt", "a bear", "--device", "cpu"])
    assert (args.steps, args.cfg, args.negative_prompt) == (40, 9.0, lvd.NEGATIVE_PROMPT)
    with pytest.raises(SystemExit):
        lvd.parse_args(["--model", "toy", "--prompt", "a red ball", "--download", "--device", "cpu"])
    assert "ships with the repository" in capsys.readouterr().err


def test_wilson_interval_and_paired_ratio_interval():
    ev = _script("eval_toy")
    lo, hi = ev.wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-4 and abs(hi - 0.7634) < 1e-4
    assert ev.wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and ev.wilson(10, 10)[1] == pytest.approx(1.0)
    a = np.array([1, 0, 0, 0] * 25, float)
    b = np.array([1, 1, 0, 0] * 25, float)
    lo, hi = ev.ratio_interval(a, b)
    assert lo <= 2.0 <= hi and lo > 1.0

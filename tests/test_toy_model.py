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

import attention
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


# -----------------------------------------------------------------------------
# the committed model (models/toy)

@pytest.fixture(scope="module")
def toy():
    return lvd.load_pipeline(str(TOY_DIR), "cpu", torch.float32, "toy")


def test_committed_model_has_the_training_scripts_configs(toy):
    train = _script("train_toy")
    for sub, cfg in (("unet", train.UNET_CFG), ("vae", train.VAE_CFG), ("text_encoder", train.TEXT_CFG)):
        assert json.loads((TOY_DIR / sub / "config.json").read_text()) == cfg, sub
    info = json.loads((TOY_DIR / "training.json").read_text())
    assert info["unet_steps"] > 0 and info["device"]                       # where and how long it was trained
    size = sum(p.stat().st_size for p in TOY_DIR.rglob("*") if p.is_file())
    assert size <= 25e6, f"the committed toy model is {size / 1e6:.1f} MB (issue 22: ≤ 25 MB)"


def test_trained_decoder_inverts_the_latent_map(toy):
    """The decoder was trained to undo `latents_of`: the exact colour detector finds every object of the
    decoded frames at its true centre (within 1.5 px at 128 px) and with its area within 25%. Measured on these
    scenes: 0.31 px and 12.6% at most (deterministic; the bounds test the decoder's sharpness, not noise)."""
    rng = np.random.default_rng(11)
    scenes = [T.sample_scene(rng, frames=4, n_objects=1) for _ in range(6)]
    z = T.latents_of(T.render_batch(scenes, 4, 128, 128))                  # (B, 4, F, 16, 16)
    for scene, lat in zip(scenes, z):
        frames = lvd.decode(toy, lat[None])                                # (F, 128, 128, 3) uint8
        truth = T.render(scene, 4, 128, 128)
        for k in range(4):
            got = T.detect(frames[k], scene.objects[0].colour)
            want = T.detect(truth[k], scene.objects[0].colour)
            assert got is not None, (scene, k)
            assert abs(got[0] - want[0]) * 128 <= 1.5 and abs(got[1] - want[1]) * 128 <= 1.5, (got, want)
            assert abs(got[2] / want[2] - 1) <= 0.25, (got, want)


def test_cli_runs_the_toy_model_on_the_cpu_with_its_bundled_layout(tmp_path, monkeypatch, capsys):
    for var in ("OPENAI_API_KEY", "LVD_LLM_BASE_URL", "LVD_LLM_MODEL"):
        monkeypatch.delenv(var, raising=False)                             # no LLM: the bundled layout is used
    prompt = "a red ball moving from the left to the right"
    rc = lvd.main(["--model", "toy", "--prompt", prompt, "--device", "cpu", "--out", str(tmp_path),
                   "--llm-cache", str(tmp_path / "cache.json")])
    assert rc == 0, capsys.readouterr().err
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    run = json.loads((folder / "run.json").read_text())
    assert (run["model"], run["frames"], run["height"], run["steps"], run["cfg"]) == ("toy", 8, 128, 20, 5.0)
    assert run["final_prompt"] == prompt + ", grey background" and run["guidance_history"]
    assert len(list((folder / "frames").glob("*.png"))) == 8
    layout = planner.Layout.load(folder / "layout.json")
    assert layout.objects() == [(0, "red ball")]


@pytest.mark.xfail(strict=True, reason="issue 22 open: the committed model is undertrained (1,201 UNet steps); its "
                   "object-token attention does not localise (in/out ≈ 1.0 in the six guided layers, "
                   "results/toy_eval.md), so the guidance cannot move the object. Strict: passing fails the suite.")
def test_guidance_moves_the_object_into_its_box(toy):
    """The demo layout (a red ball along the top, left to right), one seed: the guided video places the ball in its
    box (toyworld.score: centre in the box in ≥ 75% of the frames) and the unguided one does not."""
    scene = _script("toy_layouts").scenes()[0]
    layout = T.to_layout(scene)
    params = attention.preset("benchmark", "toy")
    runs = {}
    for name, guidance in (("unguided", None), ("guided", params)):
        frames = lvd.generate(toy, layout.prompt, layout, guidance=guidance, seed=0, **lvd.MODELS["toy"])
        runs[name] = T.score(frames, scene)
    assert runs["guided"]["passed"] and not runs["unguided"]["passed"], runs

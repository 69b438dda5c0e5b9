"""The CLI on the tiny checkpoint: output folder, GIF, run.json, determinism, guidance by default, errors (issues 3, 4)."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lvd
import planner

DEMO = "A bear walks from the left to the right"


@pytest.fixture(scope="module")
def layout_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("layout") / "bear.json"
    planner.plan(DEMO).save(str(path))  # the shipped example layout, no LLM
    return str(path)


def run_cli(tiny_model_dir, out, layout_file, *extra):
    argv = ["--prompt", DEMO, "--model-dir", tiny_model_dir, "--layout", layout_file, "--frames", "4",
            "--height", "64", "--width", "96", "--steps", "3", "--seed", "5", "--out", str(out), "--device", "cpu", *extra]
    assert lvd.main(argv) == 0
    (folder,) = [d for d in os.listdir(out) if not d.startswith(".")]
    return os.path.join(out, folder)


def gif_frames(path):
    im = Image.open(path)
    frames = []
    for k in range(im.n_frames):
        im.seek(k)
        frames.append(np.asarray(im.convert("RGB")))
    return frames


def test_cli_writes_a_complete_run(tiny_model_dir, layout_file, tmp_path):
    folder = run_cli(tiny_model_dir, tmp_path / "a", layout_file, "--save-attention")
    frames = gif_frames(os.path.join(folder, "video.gif"))
    assert len(frames) == 4 and frames[0].shape == (64, 96, 3)
    assert sorted(os.listdir(os.path.join(folder, "frames"))) == [f"{k:04d}.png" for k in range(4)]
    run = json.load(open(os.path.join(folder, "run.json")))
    for key in ("prompt", "seed", "steps", "cfg", "frames", "height", "width", "model", "dtype", "versions",
                "final_prompt", "guidance", "guidance_params", "guidance_history", "timings_s", "negative_prompt"):
        assert key in run, key
    assert run["final_prompt"].startswith(DEMO + ",") and run["final_prompt"].endswith("background")
    assert run["guidance"] == "weak" and len(run["guidance_history"]) >= 1  # guided by default
    assert set(run["timings_s"]) >= {"plan_s", "load_s", "denoise_s", "decode_s"}
    assert len(gif_frames(os.path.join(folder, "layout.gif"))) == 4
    assert planner.Layout.load(os.path.join(folder, "layout.json")).background
    grids = [f for f in os.listdir(folder) if f.startswith("attention") and f.endswith(".png")]
    assert len(grids) == 1  # one object: the bear
    assert not [d for d in os.listdir(tmp_path / "a") if d.startswith(".")]  # no temporary folder left


def test_same_seed_same_frames(tiny_model_dir, layout_file, tmp_path):
    a = run_cli(tiny_model_dir, tmp_path / "a", layout_file, "--guidance", "off")
    b = run_cli(tiny_model_dir, tmp_path / "b", layout_file, "--guidance", "off")
    for k in range(4):
        pa = np.asarray(Image.open(os.path.join(a, "frames", f"{k:04d}.png")))
        pb = np.asarray(Image.open(os.path.join(b, "frames", f"{k:04d}.png")))
        assert np.array_equal(pa, pb)
    c = run_cli(tiny_model_dir, tmp_path / "c", layout_file, "--guidance", "off", "--seed", "6")
    assert not np.array_equal(np.asarray(Image.open(os.path.join(a, "frames", "0000.png"))),
                              np.asarray(Image.open(os.path.join(c, "frames", "0000.png"))))


def test_memory_modes_give_the_same_video(tiny_model_dir, layout_file, tmp_path):
    """--checkpointing cheap / full change only what the guidance pass keeps for its backward, not the video."""
    runs = {mode: run_cli(tiny_model_dir, tmp_path / mode, layout_file, "--checkpointing", mode)
            for mode in ("off", "cheap", "full")}
    for mode, folder in runs.items():
        run = json.load(open(os.path.join(folder, "run.json")))
        assert run["checkpointing"] == mode and run["guidance_history"]
    off = [np.asarray(Image.open(os.path.join(runs["off"], "frames", f"{k:04d}.png"))) for k in range(4)]
    for mode in ("cheap", "full"):
        other = [np.asarray(Image.open(os.path.join(runs[mode], "frames", f"{k:04d}.png"))) for k in range(4)]
        # measured 1: both runs truncate to uint8, and fp32 round-off (latents 2.9e-6 apart, frames 1.5e-3 of a level)
        # flips pixels that sit on a level boundary; 1 is one 8-bit step, 660x that difference
        assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(off, other)), mode
    assert lvd.parse_args(["--prompt", "x", "--checkpointing"]).checkpointing == "full"  # the flag alone


def test_missing_model_folder_prints_download_command(layout_file, tmp_path, capsys):
    code = lvd.main(["--prompt", DEMO, "--model-dir", str(tmp_path / "nope"), "--layout", layout_file,
                     "--out", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "python weights/download.py --model modelscope" in err and "Traceback" not in err


def test_the_script_exits_with_main_s_code_and_its_output_flushed(tiny_model_dir, layout_file, tmp_path):
    """`python lvd.py` ends in os._exit(main()) (no interpreter teardown): the exit code is main's, and what main
    printed to the pipes arrives (stdout is block-buffered on a pipe: lost without the flush)."""
    cmd = [sys.executable, "lvd.py", "--prompt", DEMO, "--layout", layout_file, "--frames", "2", "--height", "32",
           "--width", "32", "--steps", "2", "--device", "cpu"]
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as for a user
    run = subprocess.run(cmd + ["--model-dir", tiny_model_dir, "--out", str(tmp_path / "out")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("lvd: wrote "), run.stdout + run.stderr
    assert os.path.isdir(run.stdout.split()[2])
    run = subprocess.run(cmd + ["--model-dir", str(tmp_path / "nope"), "--out", str(tmp_path)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "python weights/download.py" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("flag, inside", [([], False), (["--cudnn-attention"], True)])
def test_one_video_runs_without_cudnn_attention_unless_asked(tiny_model_dir, layout_file, tmp_path, monkeypatch,
                                                              flag, inside):
    """The CLI samples with torch's cuDNN attention backend off (its per-shape, per-thread set-up costs a
    one-video run more than its kernels give back), on with --cudnn-attention; torch's flag is restored after."""
    seen, generate = [], lvd.generate

    def spy(*a, **k):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return generate(*a, **k)
    monkeypatch.setattr(lvd, "generate", spy)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    run_cli(tiny_model_dir, tmp_path / "out", layout_file, *flag)
    assert seen == [inside if before else False] and torch.backends.cuda.cudnn_sdp_enabled() == before


@pytest.mark.parametrize("argv", [["--prompt", "x", "--height", "100"], ["--prompt", "x", "--guidance", "strong"],
                                  ["--prompt", "x", "--steps", "0"], [], ["--prompt", "x", "--device", "foo"],
                                  ["--prompt", "x", "--device", "cuda:7"]])
def test_bad_arguments_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        lvd.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err and "Traceback" not in err
    if "--device" in argv:
        assert "--device" in err.splitlines()[-1]


def test_unwritable_output_folder_is_caught_before_sampling(tiny_model_dir, layout_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = lvd.main(["--prompt", DEMO, "--model-dir", tiny_model_dir, "--layout", layout_file,
                     "--out", str(blocker / "runs"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("lvd: error: --out") and "denoising" not in err and "Traceback" not in err


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        lvd.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for want in ("denoising steps (default: 40; toy 20)", "(default: 9; toy 5)", "(drawn on the CPU) (default: 0)",
                 "guidance iterations per step (benchmark: 5; weak: 1)",
                 "default: 16 (modelscope) / 24 (zeroscope) / 8 (toy)"):
        assert want in text, want
    assert "(default: None)" not in text and "(default: False)" not in text and text.count("(default:") >= 8


def test_draw_boxes_survives_boxes_thinner_than_a_pixel():
    """The shipped bird/car example clips its last box to ~0 px width; drawing it must not fail (it did:
    PIL rejects x1 < x0), since save_run draws layout.gif after the whole video was sampled."""
    prompt = "A realistic lively video of a scene with a bird moving from the left of a car to its right"
    layout = planner.plan(prompt)  # from the shipped examples
    tracks = layout.object_boxes(16)
    widths = [float(b[2] - b[0]) for tr in tracks for b in tr.boxes if b[2] > b[0]]
    assert min(widths) * 64 < 1  # at a 64-px video the thinnest box is under one pixel wide
    frames = np.zeros((16, 64, 64, 3), np.uint8)
    images = lvd.draw_boxes(frames, layout)
    assert len(images) == 16 and images[0].size == (64, 64)
    drawn = np.asarray(images[-1])
    assert drawn.any()  # the boxes are drawn, not skipped
    edge = planner.Layout("x", "", [[{"id": 0, "name": "x", "box": [511.9, 511.9, 0.05, 0.05]}]] * 6)
    assert len(lvd.draw_boxes(frames, edge)) == 16  # a sub-pixel box in the bottom-right corner


def test_progress_names_each_stage_and_marks_the_guided_steps(tiny_model_dir, layout_file, tmp_path, capsys):
    """stderr names the stages in order, and the denoising bar marks the guided steps 'G' (weak: the first 10 of
    12 steps here) and the others '#'."""
    run_cli(tiny_model_dir, tmp_path / "p", layout_file, "--steps", "12")
    err = capsys.readouterr().err
    stages = ["planning the layout", "loading the model", "denoising: 12 steps, LVD guidance on the first 10",
              "decoding", "saving"]
    where = [err.find(s) for s in stages]
    assert all(w >= 0 for w in where) and where == sorted(where), (where, err)
    final_bar = err.split("denoising ")[-1]  # the last redraw, after the guided steps
    assert "[" + "G" * 20 + "####]" in final_bar and "12/12" in final_bar, final_bar
    assert "fast layer" not in err  # the CPU runs the reference: nothing to compile


def test_the_fast_layer_is_prepared_in_a_thread_only_for_fast_cuda_runs():
    """The CLI starts Triton's set-up (fast.prepare) in a thread before loading the weights, only where the run
    uses the fast layer on CUDA; the thread ends by itself (here, without CUDA, fused.available() says no)."""
    for device, fast in (("cpu", None), ("cpu", True), ("cuda", False)):
        assert lvd.prepare_fast_layer(argparse.Namespace(device=device, fast=fast)) is None
    thread = lvd.prepare_fast_layer(argparse.Namespace(device="cuda:0", fast=None))
    assert thread is not None and thread.daemon
    thread.join(timeout=60)
    assert not thread.is_alive()

"""The README works as written (issue 6, acceptance 2 and 4): its main-job command, and its figures.

Main job. In a copy of the repository, the README's install command runs in a fresh virtualenv, then its
main-job command (`python lvd.py --prompt "A bear walks from the left to the right" --download`) runs
with HF_ENDPOINT pointing at a loopback fake hub (tests/hub_server.py) that serves the tiny checkpoint
(weights/make_tiny.py) under the real repository's name and file names. Only small-size flags are
appended (--frames 4 --height 64 --width 64 --steps 3 --device cpu); the weights land in the default
models/modelscope of the copy, the run in its default outputs/, and the planner uses the released
GPT-4 layout shipped in data/layouts/examples.json (no LLM is configured).
What "fresh virtualenv" means here: `python -m venv .venv` makes a new, empty environment; it is given
this interpreter's installed packages through a .pth file (and the old setuptools that ensurepip seeds
is removed, so that it does not shadow the one installed here), and pip runs with PIP_NO_INDEX=1. So the
README's `pip install -r requirements.txt` must find every requirement already satisfied: a requirement
that is missing here fails the test instead of being fetched (no network here). The real download from
PyPI is what .ci/run does.
Oracles: the file list of the issue and the tiny files' bytes (sha256), the fake hub's request log, the
released boxes written out by hand, and PIL reading the GIF.

Figures. `python scripts/readme_figures.py --out DIR` regenerates docs/figures; the regenerated and
the committed files are small, have the same sizes and frame counts, and show the released boxes where
they belong: the pixels on each box's edges, computed by hand from the released numbers, are red.
"""
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
from PIL import Image

from hub_server import serve_hub

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "ali-vilab/text-to-video-ms-1.7b"
DEMO = "A bear walks from the left to the right"
FAST = ["--frames", "4", "--height", "64", "--width", "64", "--steps", "3", "--device", "cpu"]
# what a CPU run (float32, so --variant fp32) needs: the list (fp16 text encoder and VAE, fp32 UNet)
NEEDED = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
          "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
          "tokenizer/tokenizer_config.json", "unet/config.json", "vae/config.json",
          "text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors",
          "vae/diffusion_pytorch_model.fp16.safetensors"]
# the released gpt-4-1106-preview layout for the demo prompt ([x, y, w, h] on 512), frame 6 clipped at x = 512
RELEASED = [[0, 256, 100, 100], [85, 256, 100, 100], [170, 256, 100, 100], [255, 256, 100, 100],
            [340, 256, 100, 100], [425, 256, 87, 100]]
SKIP_COPY = shutil.ignore_patterns(".git", ".venv", "venv", ".hypothesis", ".pytest_cache", "__pycache__", ".whl",
                                   ".gpu", "models", "outputs", "cache", "_out", "*.part")


def readme_main_job():
    """(install line, main-job line) from the README's 'Main job' code block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"\*\*Main job\*\*.*?```bash\n(.*?)```", text, re.S)
    assert m, "README.md has no **Main job** bash block"
    lines = [ln.strip() for ln in m.group(1).splitlines() if ln.strip()]
    install = [ln for ln in lines if "pip install" in ln]
    main = [ln for ln in lines if ln.startswith("python lvd.py")]
    assert len(install) == 1 and len(main) == 1, lines
    return install[0], main[0]


def clean_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "HF_", "LVD_", "VIRTUAL_ENV"))
           and k.upper() not in ("OPENAI_API_KEY", "PYTHONPATH", "PYTHONHOME", "HTTP_PROXY", "HTTPS_PROXY")}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "home" / ".cache"), NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", PIP_NO_INDEX="1", PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PYTHONDONTWRITEBYTECODE="1", OMP_WAIT_POLICY="PASSIVE", **extra)
    (tmp_path / "home").mkdir(exist_ok=True)
    return env


def sha(data):
    return hashlib.sha256(data).hexdigest()


def test_readme_main_job_command_in_a_fresh_venv(tiny_model_dir, tmp_path):
    install, main = readme_main_job()
    assert "--download" in shlex.split(main) and "--prompt" in shlex.split(main)
    repo = tmp_path / "lvd"
    shutil.copytree(ROOT, repo, ignore=SKIP_COPY)
    files = {str(p.relative_to(tiny_model_dir)).replace(os.sep, "/"): p.read_bytes()
             for p in Path(tiny_model_dir).rglob("*") if p.is_file()}
    assert set(NEEDED) < set(files)  # the fake hub holds more than is needed (fp16 UNet too)
    t0 = time.perf_counter()
    with serve_hub({REPO_ID: files}) as (url, hub):
        env = clean_env(tmp_path, HF_ENDPOINT=url)
        # 1. the README's install line, with the new venv seeing this interpreter's packages (see the docstring)
        venv_cmd, rest = install.split("&&", 1)
        assert venv_cmd.split() == ["python", "-m", "venv", ".venv"], install
        subprocess.run([sys.executable, "-m", "venv", ".venv"], cwd=repo, check=True, env=env, timeout=120)
        site = next((repo / ".venv" / "lib").glob("python*/site-packages"))
        paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        (site / "_lvd_test_parent_site.pth").write_text("\n".join(sorted(paths)) + "\n")
        # Python <= 3.11 seeds a venv with setuptools 65, which would shadow the newer one installed here
        # (torch asks for >= 77; with network pip would upgrade it): remove it so this interpreter's is seen
        subprocess.run([str(repo / ".venv" / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "setuptools"],
                       cwd=repo, env=env, capture_output=True, timeout=120)
        pip = subprocess.run(["bash", "-c", rest.strip()], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert pip.returncode == 0, pip.stdout + pip.stderr
        for req in (repo / "requirements.txt").read_text().split():
            assert f"Requirement already satisfied: {req}" in pip.stdout, (req, pip.stdout)
        t_install = time.perf_counter() - t0
        # 2. the main-job line as written, plus the small-size flags, in the activated venv
        cmd = f". .venv/bin/activate && {main} {shlex.join(FAST)}"
        run = subprocess.run(["bash", "-c", cmd], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        log = list(hub.log)
    t_run = time.perf_counter() - t0 - t_install
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and "lvd: wrote" in run.stdout

    # the weights: exactly the needed files, byte for byte, in the default folder of the copy
    dest = repo / "models" / "modelscope"
    got = sorted(str(p.relative_to(dest)).replace(os.sep, "/") for p in dest.rglob("*") if p.is_file())
    assert got == sorted(NEEDED + [".verified.json"])
    for rel in NEEDED:
        assert sha((dest / rel).read_bytes()) == sha(files[rel]), rel
    fetched = sorted({e["path"] for e in log if e.get("sent")})
    assert fetched == sorted(NEEDED)  # nothing else was downloaded (no fp16 UNet, no README)
    assert {e["repo"] for e in log if e["kind"] == "resolve"} == {REPO_ID}

    # the run folder: a finished video of the released layout
    runs = [d for d in (repo / "outputs").iterdir()]
    assert len(runs) == 1 and not runs[0].name.startswith("."), runs
    folder = runs[0]
    gif = Image.open(folder / "video.gif")
    assert gif.n_frames == 4 and gif.size == (64, 64)
    assert sorted(os.listdir(folder / "frames")) == [f"{k:04d}.png" for k in range(4)]
    settings = json.loads((folder / "run.json").read_text())
    assert settings["prompt"] == DEMO and settings["download"] is True and settings["guidance"] == "weak"
    assert settings["final_prompt"] == DEMO + ", forest background"
    layout = json.loads((folder / "layout.json").read_text())
    assert [[o["box"] for o in frame] for frame in layout["frames"]] == [[b] for b in RELEASED]
    assert layout["background"] == "forest"
    print(f"install {t_install:.1f} s, main job {t_run:.1f} s")


# -----------------------------------------------------------------------------
# the figures

def is_red(px):
    r, g, b = (int(v) for v in px[:3])
    return r > 200 and g < 120 and b < 120


def assert_box_drawn(img, ox, oy, side, box, where):
    """The box [x, y, w, h] (512 canvas) is outlined in red on the frame at (ox, oy) of `side` pixels."""
    x, y, w, h = box
    s = side / 512
    left, top, right, bottom = x * s, y * s, (x + w) * s - 1, (y + h) * s - 1
    mid_y, mid_x = int((top + bottom) / 2) + oy, int((left + right) / 2) + ox
    near = lambda pos: range(int(pos) - 1, int(pos) + 2)  # the edge within a pixel
    assert any(is_red(img[mid_y, ox + c]) for c in near(left) if 0 <= c < side), f"{where}: no left edge"
    assert any(is_red(img[mid_y, ox + c]) for c in near(right) if 0 <= c < side), f"{where}: no right edge"
    assert any(is_red(img[oy + r, mid_x]) for r in near(top)), f"{where}: no top edge"
    assert any(is_red(img[oy + r, mid_x]) for r in near(bottom)), f"{where}: no bottom edge"
    assert not is_red(img[oy + int(bottom) - 4, mid_x]), f"{where}: the box is filled, not outlined"
    if right + 5 < side:
        assert not is_red(img[oy + int(bottom) - 3, ox + int(right) + 5]), f"{where}: red right of the box"
    assert not is_red(img[oy + int(top) - 5, mid_x]), f"{where}: red above the box"


def interpolated(k, n):
    """The demo box at video frame k of n, by hand: x moves 85 px per keyframe (t = i/5), so x = 425·q_k."""
    q = k * (1 - 1e-5) / (n - 1)
    x = 425 * q
    right = x + 100 if q <= 0.8 else 440 + (512 - 440) * (q - 0.8) / 0.2  # the clipped last keyframe ends at 512
    return [x, 256, right - x, 100]


def check_figures(folder):
    import importlib.util
    spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "scripts" / "readme_figures.py")
    fig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fig)  # only its geometry constants and frame_origin are used
    for name in ("demo_layout.png", "demo_layout_16.png", "demo_layout_16.gif"):
        assert (folder / name).stat().st_size < 200_000, name
    six = np.asarray(Image.open(folder / "demo_layout.png").convert("RGB"))
    for i, box in enumerate(RELEASED):
        assert_box_drawn(six, *fig.frame_origin(i, fig.S6, 6), fig.S6, box, f"demo_layout.png frame {i + 1}")
    sixteen = np.asarray(Image.open(folder / "demo_layout_16.png").convert("RGB"))
    for k in range(16):
        assert_box_drawn(sixteen, *fig.frame_origin(k, fig.S16, 8), fig.S16, interpolated(k, 16),
                         f"demo_layout_16.png frame {k}")
    gif = Image.open(folder / "demo_layout_16.gif")
    assert gif.n_frames == 16
    for k in range(16):
        gif.seek(k)
        assert_box_drawn(np.asarray(gif.convert("RGB")), 0, 0, fig.S_GIF, interpolated(k, 16), f"GIF frame {k}")
    return {name: Image.open(folder / name).size for name in ("demo_layout.png", "demo_layout_16.png", "demo_layout_16.gif")}


def test_readme_figures_regenerate_and_show_the_released_layout(tmp_path):
    out = tmp_path / "figures"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_figures.py"), "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env=clean_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["demo_layout.png", "demo_layout_16.gif", "demo_layout_16.png"]
    fresh = check_figures(out)
    committed = check_figures(ROOT / "docs" / "figures")  # the committed files are the current ones
    assert fresh == committed


def test_readme_shows_the_figures_and_their_command():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("docs/figures/demo_layout.png", "docs/figures/demo_layout_16.gif"):
        assert name in text, f"README.md does not show {name}"
    assert "python scripts/readme_figures.py" in text


def test_readme_stays_short():
    """The README is for users: at most 12 KB, read as 12,000 bytes (the full tables live in docs/verification.md)."""
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 12_000, size
    assert (ROOT / "docs" / "verification.md").exists()

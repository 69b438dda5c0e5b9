"""The two layers stay apart: the reference modules never import the fast layer (fast/), and the reference's parity
tests pass in a copy of the project that has no fast/ folder at all.

Oracle: `sys.modules` in a fresh interpreter after importing each reference module (and after a reference video
through `lvd.generate(fast=False)`); pytest run in the copy.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ["unet3d", "unet_transformers", "vae", "text_encoder", "sampler", "attention", "tokens", "layout",
             "planner", "outputs", "cli_options", "lvd", "weights.checkpoint", "weights.download"]
# the reference's parity tests against diffusers / transformers and the guidance tests (~1 min on 2 cores)
PARITY = ["tests/test_unet3d.py", "tests/test_vae.py", "tests/test_guidance.py", "tests/test_pipeline.py"]


def run_python(code, cwd=ROOT, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_reference_modules_import_nothing_of_the_fast_layer(tiny_model_dir):
    out = run_python(f"""
        import importlib, sys
        for name in {REFERENCE!r}:
            importlib.import_module(name)
            fast = sorted(m for m in sys.modules if m == "fast" or m.startswith("fast."))
            print(name, fast)
        import lvd, torch
        pipe = lvd.load_pipeline({str(tiny_model_dir)!r})
        lvd.generate(pipe, "a bear", steps=2, frames=2, height=32, width=32, fast=False)
        print("generate", sorted(m for m in sys.modules if m == "fast" or m.startswith("fast.")))
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert [ln for ln in lines if ln.strip()] == [f"{name} []" for name in REFERENCE + ["generate"]], out.stdout


def test_the_check_sees_an_import_of_the_fast_layer():
    """The oracle can fail: the fast layer's own entry shows in sys.modules."""
    out = run_python("import sys, lvd, fast; print(sorted(m for m in sys.modules if m.startswith('fast')))")
    assert out.returncode == 0 and "'fast'" in out.stdout and "'fast.fused'" in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
def test_reference_parity_tests_pass_without_the_fast_folder(tmp_path):
    copy = tmp_path / "lvd-reference-only"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "fast", "__pycache__", ".pytest_cache",
                                                              "outputs", "models", ".venv", ".whl", ".gpu"))
    assert not (copy / "fast").exists()
    gone = run_python("import fast", cwd=copy)
    assert gone.returncode != 0 and "No module named 'fast'" in gone.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PARITY], cwd=copy,
                         env=env, capture_output=True, text=True, timeout=1200)
    tail = out.stdout[-3000:]
    assert out.returncode == 0, tail + out.stderr[-2000:]
    assert " passed" in tail and " failed" not in tail and " error" not in tail, tail

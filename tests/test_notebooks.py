"""The walkthrough notebooks (issue 6): each runs top to bottom on the tiny checkpoint on the CPU, and draws its pictures.

A small runner instead of nbclient: the code cells of one notebook are executed in order in one namespace,
with the notebooks/ folder as the working directory and LVD_MODEL_DIR unset (so the tiny checkpoint is
used). Like Jupyter, a cell's final expression is evaluated and its repr shown; every cell must show
something (a printed line, a value, or a picture), since each cell ends in a visible shape, number or
picture. The notebooks honour LVD_NOTEBOOK_OUT, so the pictures land in a temporary folder and are checked.

Checked in git, without running anything: nbformat 4 JSON with outputs cleared (outputs == [] and
execution_count None in every code cell), a markdown cell pointing to a spec section above every code
cell, and no function or class definitions in the notebooks (they import lvd's modules, never redefine).
"""
import ast
import contextlib
import io
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# the pictures each notebook must write (names without .png), from the list of contents
EXPECTED = {
    "01_layouts": ["01_keyframes", "01_interpolation_plot", "01_interpolation_frames", "01_presence"],
    "02_unet3d": ["02_params_per_block", "02_shapes"],
    "03_attention_energy": ["03_masks", "03_attention_0_red-ball", "03_energy_terms", "03_latent_gradient",
                            "03_energy_over_iterations", "03_attention_after_0_red-ball"],
    "04_sampling": ["04_timesteps", "04_x0_predictions", "04_unguided_vs_guided"],
}


def load(name):
    return json.loads((NOTEBOOKS / f"{name}.ipynb").read_text(encoding="utf-8"))


def code_cells(nb):
    return [("".join(c["source"]), i) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]


def run_cell(source, namespace, name):
    """exec a cell; a trailing expression is evaluated and printed, as Jupyter displays it. -> what it showed."""
    tree = ast.parse(source, filename=name)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(tree, name, "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), name, "eval"), namespace)
            if value is not None:
                print(repr(value))
    return buf.getvalue()


def test_all_notebooks_are_listed():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_outputs_cleared_and_cells_documented(name):
    nb = load(name)
    assert nb["nbformat"] == 4
    cells = nb["cells"]
    assert cells[0]["cell_type"] == "markdown"
    for i, c in enumerate(cells):
        if c["cell_type"] != "code":
            continue
        assert c["outputs"] == [] and c["execution_count"] is None, f"{name} cell {i}: outputs not cleared"
        above = "".join(cells[i - 1]["source"])
        assert cells[i - 1]["cell_type"] == "markdown", f"{name} cell {i}: no markdown cell above"
        if i > 1:  # the first code cell is the setup; every later one points to its spec section
            assert re.search(r"(lvd-method|modelscope-architecture)\.md`?\s*§\d", above), \
                f"{name} cell {i}: the markdown above names no spec section"
        tree = ast.parse("".join(c["source"]))
        defs = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        assert not defs, f"{name} cell {i} defines {defs}: notebooks import lvd's modules, never redefine"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    for var in ("LVD_MODEL_DIR", "LVD_MODEL", "OPENAI_API_KEY", "LVD_LLM_BASE_URL", "LVD_LLM_MODEL"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "pictures"
    monkeypatch.setenv("LVD_NOTEBOOK_OUT", str(out))
    monkeypatch.chdir(NOTEBOOKS)  # as Jupyter starts it
    monkeypatch.setattr(sys, "path", list(sys.path))  # the notebooks add the repo root and notebooks/
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the tiny checkpoint is written (and cached) here
    namespace = {"__name__": "__main__"}
    t0 = time.perf_counter()
    first = None
    for k, (source, i) in enumerate(code_cells(load(name))):
        shown = run_cell(source, namespace, f"{name}.ipynb[cell {i}]")
        assert shown.strip(), f"{name} cell {i} shows nothing: each cell must end in a shape, number or picture"
        first = shown if k == 0 else first
    seconds = time.perf_counter() - t0
    # the first cell says which weights it uses: the toy model for the attention and sampling notebooks
    assert ("TOY model" if name.startswith(("03", "04")) else "TINY random checkpoint") in first
    written = sorted(p.stem for p in out.glob("*.png"))
    assert set(EXPECTED[name]) <= set(written), f"missing pictures: {set(EXPECTED[name]) - set(written)}"
    for stem in written:
        with Image.open(out / f"{stem}.png") as im:
            a = np.asarray(im.convert("RGB"))
        # measured std ≥ 34 (8-bit levels); 5 = 6.8x
        assert a.shape[0] >= 32 and a.shape[1] >= 32 and a.std() > 5, f"{stem}.png is blank"
    print(f"{name}: {seconds:.1f} s, {len(written)} pictures")

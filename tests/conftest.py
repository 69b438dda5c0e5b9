"""Shared pytest setup: the repo root on sys.path, and where ../shared lives."""
import os
import sys

# idle OpenMP workers sleep instead of spinning: on a 2-core machine spinning threads starve the rest
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import random

import numpy as np
import pytest
import torch

# Without CUDA, Triton kernels (fast/kernels.py, tests/test_fused.py) run in Triton's interpreter on the CPU. Triton reads
# this when it is first imported, so it is set here, before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random model folder in the published diffusers layout (weights/make_tiny.py), made once per session."""
    from weights.make_tiny import make_tiny
    return make_tiny(str(tmp_path_factory.mktemp("tiny-model")), seed=0, fp16_variants=True)


@pytest.fixture(autouse=True)
def _seed_rngs():
    """Every test starts from the same RNG state (torch, numpy, random), so no test depends on what the tests run
    before it left behind: a test's random inputs, and so its measured errors, are the same in any order."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


@pytest.fixture(autouse=True)
def _own_kernel_markers(tmp_path, monkeypatch):
    """The markers that say an earlier run built a call's Triton kernels (fast/precompile.py) go to the test's own
    folder: no test finds one that another test, or an earlier session on the machine, left behind."""
    monkeypatch.setenv("LVD_KERNEL_MARKERS", str(tmp_path / "lvd-built"))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spin-waiting makes
    them many times slower (measured: 164 s vs 21 s for the three guidance test files); restored afterwards.
    A module uses it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_tf32():
    """fp32 on the GPU means fp32: cuDNN's default TF32 convolutions differ from run to run at ~1e-3. Restored
    afterwards. A module uses it with `pytestmark = pytest.mark.usefixtures("no_tf32")`."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def shared_or_skip(*parts):
    """Path under ../shared, or skip: a user's clone has no ../shared (CI and developers do)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared not present (a user's clone): {path} is needed for this test")
    return path

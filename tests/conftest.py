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

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random model folder in the published diffusers layout (weights/make_tiny.py), made once per session."""
    from weights.make_tiny import make_tiny
    return make_tiny(str(tmp_path_factory.mktemp("tiny-model")), seed=0, fp16_variants=True)


def shared_or_skip(*parts):
    """Path under ../shared, or skip: a user's clone has no ../shared (CI and developers do)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared not present (a user's clone): {path} is needed for this test")
    return path

"""Shared fixtures: one local Ray instance per test session, small generated datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A 2-CPU local Ray shared by every test that needs one (ray.init costs ~6 s)."""
    import ray

    if not ray.is_initialized():
        # The dashboard serves the state API that Ray Train V2 uses to clean up after stopped runs
        # (without it a trial stopped by ASHA keeps its placement group and later trials starve).
        ray.init(num_cpus=2, include_dashboard=True, logging_level="WARNING")
    yield ray
    ray.shutdown()


def write_image(path: Path, seed: int, size=(40, 30), mode: str = "RGB", fmt: str | None = None) -> Path:
    """A random image of ``size`` (w, h) in ``mode``."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def folder_tree(tmp_path) -> Path:
    """A class-per-folder tree: 3 classes x 10 JPEG/PNG images of assorted sizes, plus a README."""
    root = tmp_path / "tree"
    for c, name in enumerate(["astilbe", "bellflower", "crocus"]):
        for i in range(10):
            ext = "jpg" if i % 2 else "png"
            write_image(root / name / f"img_{i:02d}.{ext}", seed=100 * c + i, size=(30 + 3 * i, 24 + 2 * c))
    (root / "README.txt").write_text("not an image")
    (root / "crocus" / "notes.md").write_text("not an image either")
    return root

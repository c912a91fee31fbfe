"""Shards in the pipeline's own format written straight from generated pixels, for benchmarks.

Each class is a colour and every image that colour plus noise, so a model's loss falls, but nothing
is decoded: writing 50,000 images takes seconds. Rows are in random order, row groups sized as
preprocessing sizes them. Used by ``scale.py`` and ``gpu_check.py`` (which runs without Ray).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.loading import read_manifest
from pipeline.data.columns import FORMAT_VERSION, fixed_size_binary_column
from pipeline.data.preprocess import ROW_GROUP_BYTES

ROWS_PER_FILE = 1000


def write_shards(root: str, train: int, val: int, size: int, classes: int = 10) -> str:
    """``train`` + ``val`` images of ``size`` px under ``root`` with a manifest; reused when already there."""
    done = os.path.join(root, "manifest.json")
    sizes = {"train": train, "val": val, "test": 0}
    if os.path.exists(done):
        m = read_manifest(root)
        if m["split_sizes"] == sizes and m["image_size"] == size and m["num_classes"] == classes:
            return root
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (classes, 3))
    files: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    row_bytes = size * size * 3
    for split, n in (("train", train), ("val", val)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for start in range(0, n, ROWS_PER_FILE):
            m = min(ROWS_PER_FILE, n - start)
            labels = rng.integers(0, classes, m)
            noise = rng.integers(-40, 41, (m, size, size, 3))
            pixels = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8).reshape(m, -1)
            table = pa.table({"image": fixed_size_binary_column(pixels), "label": pa.array(labels, type=pa.int64()),
                              "path": pa.array([f"/synthetic/{split}/{start + i:07d}.png" for i in range(m)])})
            name = f"{split}/part-{start // ROWS_PER_FILE:05d}.parquet"
            pq.write_table(table, os.path.join(root, name), row_group_size=max(1, ROW_GROUP_BYTES // row_bytes),
                           compression="none", use_dictionary=["path"])
            files[split].append(name)
    manifest = {"format_version": FORMAT_VERSION, "class_names": [f"c{i}" for i in range(classes)], "num_classes": classes,
                "image_size": size, "image_shape": [size, size, 3], "dtype": "uint8", "resize_mode": "squash",
                "split_sizes": sizes, "files": files, "skipped": [], "num_skipped": 0}
    with open(done, "w") as f:
        json.dump(manifest, f)
    return root

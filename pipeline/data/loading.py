"""Shards -> tensors for a training worker.

Flowers datasets are a few thousand images, so a worker reads its part of a split once, straight
from Parquet with pyarrow, into one uint8 N x H x W x 3 tensor (moved to the GPU when there is
one) and never decodes again.
"""

from __future__ import annotations

import os

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.data.sources import DataError


@dataclass
class SplitTensors:
    images: torch.Tensor  # uint8, N x H x W x 3
    labels: torch.Tensor  # int64, N
    paths: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_manifest(shard_dir: str) -> dict:
    path = storage.join(shard_dir, "manifest.json")
    if not storage.exists(path):
        raise DataError(f"{shard_dir} holds no complete preprocessed dataset (manifest.json missing); run `python -m pipeline preprocess` first")
    return storage.read_json(path)


def gather_binary(column: pa.ChunkedArray, order: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Rows ``order`` of a column of fixed-size binary cells -> one (len(order), *shape) uint8 array.

    Each chunk's data buffer is viewed in place and scattered straight to its rows' destinations:
    one copy in all (large copies are what the load costs, not Python).
    """
    row = int(np.prod(shape))
    out = np.empty((len(order), row), dtype=np.uint8)
    dest_of = np.full(len(column), -1, dtype=np.int64)
    dest_of[order] = np.arange(len(order))
    start = 0
    for chunk in column.chunks:
        n = len(chunk)
        if n == 0:
            continue
        offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=offset_type)[chunk.offset : chunk.offset + n + 1]
        if not np.all(np.diff(offsets) == row):
            raise DataError(f"a Parquet column holds cells of another size than the manifest's {shape}; rebuild with --force")
        data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]].reshape(n, row)
        dest = dest_of[start : start + n]
        keep = dest >= 0
        if keep.all():
            out[dest] = data
        elif keep.any():
            out[dest[keep]] = data[keep]
        start += n
    return out.reshape(len(order), *shape)


def split_files(shard_dir: str, split: str, manifest: dict | None = None) -> list[str]:
    """The split's shard files as the manifest lists them, every one checked to be there."""
    manifest = manifest if manifest is not None else read_manifest(shard_dir)
    listed = manifest.get("files", {}).get(split)
    if listed is None:  # a manifest without a file list: whatever the folder holds
        return storage.list_files(storage.join(shard_dir, split), ".parquet")
    # Local manifests list paths relative to the shard folder, object-store ones full URIs.
    files = [name if storage.is_uri(name) or os.path.isabs(name) else storage.join(shard_dir, name) for name in listed]
    # One listing per folder the files are in, not a request per file (object-store builds keep
    # their files under their own prefix, see pipeline.data.preprocess).
    present = {f for folder in {storage.dirname(f) for f in files} for f in storage.list_files(folder, ".parquet")}
    missing = [name for name, f in zip(listed, files) if f not in present]
    if missing:
        raise DataError(f"{shard_dir}: {len(missing)} of the {len(listed)} {split} shard files in manifest.json are missing "
                        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); rebuild them with "
                        "`python -m pipeline preprocess --force`")
    return files


def load_split(
    shard_dir: str,
    split: str,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
) -> SplitTensors:
    """Rows ``rank::world_size`` of ``split`` (in path order, so every rank agrees) as tensors.

    ``world_size=1`` gives the whole split. The parts of different ranks are disjoint and
    together cover the split.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    manifest = read_manifest(shard_dir)
    shape = tuple(manifest["image_shape"])
    files = split_files(shard_dir, split, manifest)
    if not files:
        empty = torch.zeros((0, *shape), dtype=torch.uint8, device=device)
        return SplitTensors(empty, torch.zeros(0, dtype=torch.int64, device=device), [])
    fs, _ = storage.resolve(shard_dir)
    table = pq.ParquetDataset([storage.resolve(f)[1] for f in files], filesystem=fs, memory_map=not storage.is_uri(shard_dir)).read(
        columns=["path", "label", "image"]
    )
    expected = manifest.get("split_sizes", {}).get(split)
    if expected is not None and table.num_rows != expected:
        raise DataError(f"{shard_dir}: the {split} shards hold {table.num_rows} images, the manifest says {expected}; "
                        "the shards were changed after preprocessing: rebuild them with `python -m pipeline preprocess --force`")
    paths = np.asarray(table["path"].to_pylist(), dtype=object)
    order = np.argsort(paths, kind="stable")[rank::world_size]
    images = gather_binary(table["image"], order, shape)
    labels = table["label"].to_numpy()[order].astype(np.int64)
    return SplitTensors(
        torch.from_numpy(images).to(device),
        torch.from_numpy(labels).to(device),
        [str(p) for p in paths[order]],
    )

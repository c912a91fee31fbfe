"""Shards -> tensors for a training worker.

Flowers datasets are a few thousand images, so a worker reads its part of a split once, straight
from Parquet with pyarrow, into one uint8 N x H x W x 3 tensor (moved to the GPU when there is
one) and never decodes again. Each rank reads only the row groups holding its own rows.
"""

from __future__ import annotations

import os

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.data.columns import FORMAT_VERSION, fixed_size_binary_column, gather_binary  # noqa: F401 (re-exported)
from pipeline.data.row_groups import RowGroup, row_groups
from pipeline.data.sources import DataError


@dataclass
class SplitTensors:
    images: torch.Tensor  # uint8, N x H x W x 3
    labels: torch.Tensor  # int64, N
    paths: list[str]
    bytes_read: int = 0  # Parquet column-chunk bytes read from storage to build this part
    rows: tuple[int, int] | None = None  # this part's rows [start, stop) of the split, in storage order

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_manifest(shard_dir: str) -> dict:
    path = storage.join(shard_dir, "manifest.json")
    if not storage.exists(path):
        raise DataError(f"{shard_dir} holds no complete preprocessed dataset (manifest.json missing); run `python -m pipeline preprocess` first")
    manifest = storage.read_json(path)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{shard_dir} holds shards in format {version}, and this version of the pipeline reads format "
                        f"{FORMAT_VERSION}: rebuild them with `python -m pipeline preprocess --force` (same config), "
                        "or run `python -m pipeline run`, which preprocesses into a new folder")
    return manifest


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


def rank_range(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous rows ``[start, stop)`` of the split that ``rank`` trains on; sizes differ by at most one."""
    return rank * num_rows // world_size, (rank + 1) * num_rows // world_size


def load_split(
    shard_dir: str,
    split: str,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
) -> SplitTensors:
    """Rank ``rank``'s contiguous range of ``split`` (storage order: the manifest's files in turn) as tensors.

    Only the row groups overlapping that range are read, so the bytes read across all ranks stay
    about one copy of the split at any world size (``bytes_read`` says how many). Preprocessing
    writes rows in a seeded random order, so a range is a fair sample of the classes.
    ``world_size=1`` gives the whole split; the ranks' parts are disjoint and cover it.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    manifest = read_manifest(shard_dir)
    shape = tuple(manifest["image_shape"])
    files = split_files(shard_dir, split, manifest)
    fs, _ = storage.resolve(shard_dir)
    local = not storage.is_uri(shard_dir)
    groups = row_groups(files, fs, local)
    total = sum(g.num_rows for g in groups)
    expected = manifest.get("split_sizes", {}).get(split)
    if expected is not None and total != expected:
        raise DataError(f"{shard_dir}: the {split} shards hold {total} images, the manifest says {expected}; "
                        "the shards were changed after preprocessing: rebuild them with `python -m pipeline preprocess --force`")
    start, stop = rank_range(total, rank, world_size)
    # Each file's rows are copied into one array allocated up front and its table dropped, so the
    # load peaks at the part plus one file, not twice the part (all tables, then their copy).
    images = np.empty((stop - start, *shape), dtype=np.uint8)
    labels, paths, at, bytes_read, columns = [], [], 0, 0, ["path", "label", "image"]
    by_file: dict[str, list[RowGroup]] = {}
    for g in groups:
        if g.first_row < stop and g.first_row + g.num_rows > start:
            by_file.setdefault(g.file, []).append(g)
    for f, mine in by_file.items():  # files in storage order
        pf = pq.ParquetFile(storage.resolve(f)[1], filesystem=fs, memory_map=local)
        table = pf.read_row_groups([g.index for g in mine], columns=columns)
        lo = max(start - mine[0].first_row, 0)
        table = table.slice(lo, min(stop, mine[-1].first_row + mine[-1].num_rows) - mine[0].first_row - lo)
        gather_binary(table["image"], np.arange(table.num_rows), shape, out=images[at : at + table.num_rows])
        labels.append(table["label"].to_numpy().astype(np.int64))
        paths += [str(p) for p in table["path"].to_pylist()]
        at += table.num_rows
        del table
        names = set(columns)
        for g in mine:
            rg = pf.metadata.row_group(g.index)
            bytes_read += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)
                              if rg.column(c).path_in_schema in names)
    if at != len(images):
        raise DataError(f"{shard_dir}: the {split} shards gave {at} of the {len(images)} rows their metadata promised; "
                        "rebuild them with `python -m pipeline preprocess --force`")
    return SplitTensors(
        torch.from_numpy(images).to(device),
        torch.from_numpy(np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)).to(device),
        paths,
        bytes_read,
        (start, stop),
    )

"""Stream mode: Ray Data feeds a training split batch by batch instead of one tensor per worker.

The driver builds a dataset of the split's row groups (:func:`stream_dataset`); Ray Train splits it
across the workers (``streaming_split(equal=True)``: every rank gets the same number of rows, each
row goes to one rank per epoch). A worker iterates its shard once per epoch as Arrow batches,
pixels still uint8 bytes (:func:`epoch_batches`), and augments on its own device as in memory mode.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.data.loading import gather_binary, split_files
from pipeline.data.row_groups import read_row_group, row_groups

# What one read task asks of the cluster: stream mode leaves this much of the CPUs to its reads
# (pipeline.stages reserves it out of the workers' share), since workers normally hold them all.
READ_TASK_CPUS = 0.05
DATA_RESERVED_CPUS = 0.1
# Rows kept in each worker's shuffle buffer, in batches (the row groups' order is shuffled too).
SHUFFLE_BATCHES = 4


def part_bytes(manifest: dict[str, Any], split: str, world: int) -> int:
    """Bytes of uint8 pixels in one worker's part of ``split``."""
    n = manifest.get("split_sizes", {}).get(split, 0)
    return -(-n // max(world, 1)) * int(np.prod(manifest["image_shape"]))


def data_mode(tcfg: TrainConfig, manifest: dict[str, Any], world: int) -> str:
    """``memory`` or ``stream`` for ``train.data`` (auto: memory while a worker's part fits the budget)."""
    if tcfg.data != "auto":
        return tcfg.data
    return "memory" if part_bytes(manifest, "train", world) <= tcfg.memory_budget_gb * 1e9 else "stream"


def split_paths(shard_dir: str, split: str) -> list[str]:
    """The split's image paths in storage order (row ``i`` of the split is ``paths[i]``); paths only, no pixels."""
    fs, _ = storage.resolve(shard_dir)
    local = not storage.is_uri(shard_dir)
    paths: list[str] = []
    for f in split_files(shard_dir, split):
        paths += pq.ParquetFile(storage.resolve(f)[1], filesystem=fs, memory_map=local).read(columns=["path"])["path"].to_pylist()
    return paths


def stream_dataset(shard_dir: str, split: str, readers: int = 2, show_progress: bool = False):
    """A Ray Data dataset of ``split``: one block per row group, read by at most ``readers`` light
    tasks at a time, in a new order each epoch."""
    import ray.data

    files = split_files(shard_dir, split)
    fs, _ = storage.resolve(shard_dir)
    groups = row_groups(files, fs, not storage.is_uri(shard_dir))
    if not groups:
        raise ValueError(f"{shard_dir}: the {split} split is empty; nothing to stream")
    items = [{"file": g.file, "index": g.index, "first_row": g.first_row} for g in groups]
    # from_items + map rather than read_parquet: its file-listing task asks a whole CPU, which the
    # training workers hold (the same deadlock the label stage met, see pipeline.label).
    # The order is shuffled on the row-group references, before the reads: shuffling blocks is an
    # all-to-all step in Ray Data, which after the reads would hold the whole split's pixels in the
    # object store before the first batch. Unseeded, so each epoch's execution draws a new order.
    ds = ray.data.from_items(items, override_num_blocks=len(items)).randomize_block_order()
    # At 0.05 CPU a task, Ray would otherwise start dozens of read processes at once.
    ds = ds.map_batches(read_row_group, batch_size=1, num_cpus=READ_TASK_CPUS,
                        compute=ray.data.TaskPoolStrategy(size=max(1, readers)))
    ds.context.enable_progress_bars = show_progress
    from pipeline.data.idle_tick import IdleTick

    # Its executor would otherwise spin while the workers train (see pipeline.data.idle_tick).
    if IdleTick not in ds.context.custom_execution_callback_classes:
        ds.context.custom_execution_callback_classes = [*ds.context.custom_execution_callback_classes, IdleTick]
    return ds


def epoch_batches(shard: Any, batch_size: int, shape: tuple[int, ...], device: torch.device,
                  seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch of this worker's shard as (uint8 images N x H x W x 3, labels, rows) on ``device``;
    full batches only, so every rank takes the same number of steps."""
    pin = device.type == "cuda"
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=True, prefetch_batches=2,
                                    local_shuffle_buffer_size=SHUFFLE_BATCHES * batch_size, local_shuffle_seed=seed):
        n = batch.num_rows
        images = torch.from_numpy(gather_binary(batch["image"], np.arange(n), shape))
        labels = torch.from_numpy(batch["label"].to_numpy().astype(np.int64))
        rows = torch.from_numpy(batch["row"].to_numpy().astype(np.int64))
        if pin:  # pinned host memory lets the copy to the GPU overlap the step
            images, labels, rows = images.pin_memory(), labels.pin_memory(), rows.pin_memory()
        yield (images.to(device, non_blocking=pin), labels.to(device, non_blocking=pin), rows.to(device, non_blocking=pin))

"""Row groups of the shards, and the Ray Data read functions that fetch them.

Kept free of torch on purpose: stream mode's Ray Data read tasks run :func:`read_row_group` in
worker processes of their own, and a read worker that imported torch held ~390 MB instead of
~80 MB (measured with 50 read tasks). The label stage's actors run :func:`read_files`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int  # within its file
    first_row: int  # within the split, in storage order
    num_rows: int


def row_groups(files: list[str], fs, local: bool) -> list[RowGroup]:
    """Every row group of ``files`` from the files' footers alone (no pixels read)."""
    groups, first = [], 0
    for f in files:
        meta = pq.ParquetFile(storage.resolve(f)[1], filesystem=fs, memory_map=local).metadata
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            groups.append(RowGroup(f, i, first, n))
            first += n
    return groups


def read_row_group(batch: dict[str, Any]) -> pa.Table:
    """Ray Data UDF (stream mode): a batch of one row-group reference -> its image bytes, label and
    row number in the split."""
    file, index, first = str(batch["file"][0]), int(batch["index"][0]), int(batch["first_row"][0])
    fs, path = storage.resolve(file)
    table = pq.ParquetFile(path, filesystem=fs, memory_map=not storage.is_uri(file)).read_row_group(index, columns=["image", "label"])
    return table.append_column("row", pa.array(np.arange(first, first + table.num_rows, dtype=np.int64)))


def read_files(batch: dict[str, Any]) -> pa.Table:
    """The label stage's reader (run in its actors): a batch of items, each the rows ``[start, stop)``
    of a ``split`` and the row groups holding them (``groups``: JSON rows ``[file, index, first_row,
    num_rows]``) -> their ``path``, ``image``, ``split`` and ``chunk`` columns; ``chunk`` is ``start``
    (function matching pairs images within a chunk)."""
    tables = []
    for i, split in enumerate(batch["split"]):
        start = int(batch["start"][i])
        table = _read_range(json.loads(str(batch["groups"][i])), start, int(batch["stop"][i]))
        table = table.append_column("split", pa.array([str(split)] * table.num_rows, type=pa.string()))
        tables.append(table.append_column("chunk", pa.array(np.full(table.num_rows, start, dtype=np.int64))))
    return pa.concat_tables(tables)


def _read_range(groups: list[list[Any]], start: int, stop: int) -> pa.Table:
    """Rows ``[start, stop)`` of a split (positions in storage order) from the row groups holding them."""
    pieces = []
    for file, index, first, num_rows in groups:
        fs, inner = storage.resolve(str(file))
        table = pq.ParquetFile(inner, filesystem=fs, memory_map=not storage.is_uri(str(file))).read_row_group(
            int(index), columns=["path", "image"])
        lo, hi = max(start - first, 0), min(stop - first, num_rows)
        if hi > lo:
            pieces.append(table.slice(lo, hi - lo))
    return pa.concat_tables(pieces)


def group_items(groups: list[RowGroup], split: str) -> list[dict[str, Any]]:
    """:func:`read_files` items, one per row group of a split (what :func:`range_items` gives for
    the groups' own ranges, without its search)."""
    return [_item([g], split, g.first_row, g.first_row + g.num_rows) for g in groups]


def _item(groups: list[RowGroup], split: str, start: int, stop: int) -> dict[str, Any]:
    spec = [[g.file, g.index, g.first_row, g.num_rows] for g in groups]
    return {"file": groups[0].file, "split": split, "groups": json.dumps(spec), "start": start, "stop": stop}


def range_items(groups: list[RowGroup], split: str, ranges: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """:func:`read_files` items for the row ranges ``ranges`` of a split whose row groups are ``groups``."""
    return [_item([g for g in groups if g.first_row < stop and g.first_row + g.num_rows > start], split, start, stop)
            for start, stop in ranges]

"""The shard format's pixel column: a ``fixed_size_binary`` Arrow column of raw uint8 cells.

Free of torch, so Ray Data's read and write tasks (separate processes) can import it cheaply.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.data.sources import DataError

#: The shard layout this code reads and preprocess writes. 3: pixels in a ``fixed_size_binary``
#: column (2: ``binary`` cells with offsets; 1: rows grouped by class).
FORMAT_VERSION = 3


def fixed_size_binary_column(rows: np.ndarray) -> pa.Array:
    """(N, K) rows of any dtype -> an Arrow ``fixed_size_binary(K * itemsize)`` array over the same
    memory, without a copy (Parquet stores it as FIXED_LEN_BYTE_ARRAY, no offsets)."""
    rows = np.ascontiguousarray(rows)
    n = rows.shape[0]
    width = rows.nbytes // max(n, 1)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(rows.reshape(-1).view(np.uint8))])


def gather_binary(column: pa.ChunkedArray, order: np.ndarray, shape: tuple[int, ...],
                  out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``order`` of a ``fixed_size_binary`` column -> one (len(order), *shape) uint8 array
    (written into ``out`` when given: a C-contiguous uint8 array of that many bytes).

    Each chunk's data buffer is viewed in place and scattered straight to its rows' destinations:
    one copy in all (large copies are what the load costs, not Python).
    """
    row = int(np.prod(shape))
    if not pa.types.is_fixed_size_binary(column.type) or column.type.byte_width != row:
        raise DataError(f"a Parquet column holds {column.type} cells, not the manifest's {shape} "
                        f"(fixed_size_binary[{row}]); rebuild it with --force")
    if out is None:
        out = np.empty((len(order), row), dtype=np.uint8)
    elif out.dtype != np.uint8 or not out.flags.c_contiguous or out.size != len(order) * row:
        raise ValueError(f"out must be a C-contiguous uint8 array of {len(order)} x {row} bytes")  # else reshape would copy
    else:
        out = out.reshape(len(order), row)
    dest_of = np.full(len(column), -1, dtype=np.int64)
    dest_of[order] = np.arange(len(order))
    start = 0
    for chunk in column.chunks:
        n = len(chunk)
        if n == 0:
            continue
        if chunk.null_count:
            raise DataError("a Parquet image column has empty cells; rebuild it with --force")
        data = np.frombuffer(chunk.buffers()[1], dtype=np.uint8)[chunk.offset * row : (chunk.offset + n) * row].reshape(n, row)
        dest = dest_of[start : start + n]
        keep = dest >= 0
        if keep.all():
            out[dest] = data
        elif keep.any():
            out[dest[keep]] = data[keep]
        start += n
    return out.reshape(len(order), *shape)

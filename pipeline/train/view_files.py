"""Stream mode's teacher views: a file of the view store is read when a batch first needs its rows.

In memory mode a worker's rows are one range of the training split, so it reads the store's files
holding that range once, before training (:meth:`pipeline.train.steps.TeacherViews.bind`). In stream
mode Ray Data hands each worker whole row groups, in a new order every epoch, so no range is known
ahead. The label job writes one file per row group of the shards, and its manifest says which rows
each file holds (``file_rows``), so a streamed batch's rows name the files it needs. A worker then
holds the views of a few files at a time, not the whole split's, and each epoch reads about its own
share of the store, as it does of the images.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from pipeline import storage

# Files kept after use. A batch draws from a shuffle buffer of a few batches, which spans one or two
# row groups, so a file is still kept when the next batches need it again.
KEEP_FILES = 8


class ViewsByFile:
    """The training split's views, read file by file as rows are asked for (see the module's docstring)."""

    def __init__(self, path: str, manifest: dict[str, Any], split_paths: list[str], spans: list[tuple[int, int, str]],
                 keep: int = KEEP_FILES):
        self.path, self.manifest, self.paths, self.keep = path, manifest, split_paths, keep
        self.starts = np.array([a for a, _, _ in spans], dtype=np.int64)
        self.spans = spans
        self.cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor, Any]] = OrderedDict()

    @classmethod
    def for_store(cls, path: str, manifest: dict[str, Any], split_paths: list[str]) -> "ViewsByFile | None":
        """Views read by file for the training split ``split_paths`` (storage order), or None where
        the store cannot be read that way: written before files were mapped to their rows, a file
        without a readable row range, ranges that do not tile the split, or mixup partners (which
        may lie in any file)."""
        where = manifest.get("file_rows")
        if not isinstance(where, dict) or manifest.get("mixup_pairs") or manifest.get("images") != len(split_paths):
            return None
        spans = []
        for name in manifest.get("files", []):
            entry = where.get(name)
            if not (isinstance(entry, list) and len(entry) == 3 and all(isinstance(v, int) for v in entry[1:])):
                return None
            if entry[0] == "train":
                spans.append((entry[1], entry[2], name))
        spans.sort()
        bounds = [0] + [b for _, b, _ in spans]
        if not spans or [a for a, _, _ in spans] != bounds[:-1] or bounds[-1] != len(split_paths):
            return None
        return cls(path, manifest, split_paths, spans)

    def view(self, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """View ``k`` of the split's rows ``rows``: crop boxes (N x 4), flips (N) and the teacher's
        logits (N x C, float), on the host."""
        at_rows = rows.cpu().numpy().astype(np.int64)
        if len(at_rows) and (at_rows.min() < 0 or at_rows.max() >= len(self.paths)):
            raise ValueError(f"rows outside the training split's 0..{len(self.paths) - 1}")
        files = np.searchsorted(self.starts, at_rows, side="right") - 1
        needed = np.unique(files).tolist()
        parts = {f: self._file(f) for f in needed}
        n, classes = len(at_rows), int(self.manifest["num_classes"])
        boxes, flips, logits = torch.empty((n, 4)), torch.empty(n, dtype=torch.bool), torch.empty((n, classes))
        for f, (fboxes, fflips, flogits) in parts.items():
            out = np.nonzero(files == f)[0]
            local = torch.from_numpy(at_rows[out] - self.starts[f])
            out = torch.from_numpy(out)
            boxes[out], flips[out], logits[out] = fboxes[local, k], fflips[local, k], flogits[local, k].float()
        while len(self.cache) > max(self.keep, len(needed)):  # the batch's own files were used last
            self.cache.popitem(last=False)
        return boxes, flips, logits

    def _file(self, f: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """File ``f``'s views, row ``i`` being row ``start + i`` of the split (read on first use)."""
        if f in self.cache:
            self.cache.move_to_end(f)
            return self.cache[f]
        from pyarrow import ArrowException

        from pipeline.data.sources import DataError
        from pipeline.label import REBUILD, read_rows, views_from_table

        start, stop, name = self.spans[f]
        wanted = self.paths[start:stop]
        try:
            # a training file holds no validation rows
            store = views_from_table(read_rows(self.path, [storage.join(self.path, name)], wanted), self.manifest, 0,
                                     None, wanted)
        except (DataError, ArrowException, OSError, KeyError) as exc:
            raise DataError(f"the teacher view store {self.path} is damaged ({name}: {exc}); {REBUILD}") from None
        row = {p: i for i, p in enumerate(store.paths)}
        missing = [p for p in wanted if p not in row]
        if missing:  # the manifest says this file holds them
            raise DataError(f"the teacher view store {self.path} is damaged ({name} lacks {len(missing)} of its "
                            f"{len(wanted)} images, e.g. {missing[0]}); {REBUILD}")
        order = torch.tensor([row[p] for p in wanted], dtype=torch.long)
        self.cache[f] = (store.boxes[order], store.flips[order], store.logits[order])
        return self.cache[f]

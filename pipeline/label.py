"""The label stage: the teacher's outputs on K recorded views of every training image, computed once.

A view is a crop box in stored pixels plus a mirror flag, drawn with the student's augmentation
(``distill.augment`` or ``train.augment``) from a generator seeded by the image's path and
``train.seed``, so the views do not depend on how Ray splits the work. The teacher sees each box at
its own input size, the student later replays the same box at its crop size, so every student,
sweep trial and rerun gets the teacher's knowledge for the price of one inference pass per view
(FKD, Shen & Xing 2022; SRe2L's relabelling). ``K = 1`` with centre crops is function matching's
fixed teacher.

Ray Data hands the shards' row groups to a fixed pool of actors (``map_batches``) that read them,
run the frozen teacher on their views and write the rows: ``ray.num_workers`` actors, each with one
GPU (``num_gpus=1``) on a GPU cluster, on CPU otherwise. The store
is a folder ``<shard_dir>/teacher_views/<key>/``: Parquet files with one row per image and view
(``path``, ``view``, ``x1 y1 x2 y2``, ``flip``, the teacher's output; and for each validation
image one row with ``view`` -1: the teacher's output on the student's evaluation input, so that a
replaying student still reports its agreement with the teacher) and ``manifest.json``, written
last (teacher checkpoint id, K, augmentation, sizes, seed, counts, files). ``key`` is a fingerprint
of all of those, so identical requests reuse the store and any change builds a new one. Up to
:data:`FULL_LOGITS_MAX_CLASSES` classes the full logits are kept in fp16; above, the top
``distill.teacher_topk`` (their indices and fp16 logits).
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.config import PipelineConfig, TrainConfig, fingerprint, stage_train
from pipeline.data import augment
from pipeline.data.batches import batch_for_eval
from pipeline.data.loading import fixed_size_binary_column, gather_binary, read_manifest
from pipeline.data.row_groups import read_files
from pipeline.data.sources import DataError

# 3: the teacher's output on each validation image too (view -1), for the replaying student's
# agreement and teacher accuracy; fixed-size binary columns.
VIEWS_FORMAT = 3
FULL_LOGITS_MAX_CLASSES = 128
# Below every kept logit by far: a replayed top-k target puts (next to) no mass on the classes it
# does not list, without the NaN an -inf target gives in a KL.
TOPK_FILL_BELOW = 50.0
# Rows per mixup chunk: small enough that the label job labels a chunk in one batch, large
# enough that partners are varied (function matching pairs image i with i-1 of a shuffled batch).
PAIR_CHUNK = 64
REBUILD = "rebuild it with `python -m pipeline label --force` (or `run --force distill`)"


def pairing(cfg: PipelineConfig) -> dict[str, Any] | None:
    """Function matching's mixup pairs, or None when views are single images. Each image of view k
    is mixed with a partner drawn from its chunk of :data:`PAIR_CHUNK` rows, and chunks lie inside
    one training worker's range of rows (``ray.num_workers`` of them), so the worker that replays
    the view holds the partner's pixels too; another worker count needs another store."""
    d = cfg.distill
    if d.method != "funmatch" or d.teaching != "function_matching":
        return None
    return {"world": cfg.ray.num_workers, "chunk": PAIR_CHUNK, "fold": d.mixup_fold}


def view_augment(cfg: PipelineConfig) -> str:
    """How views are drawn: function matching always takes inception crops (as online); DeiT the
    student's augmentation."""
    return "inception" if cfg.distill.method == "funmatch" else stage_train(cfg, "distill").augment


def views_key(cfg: PipelineConfig, shard_dir: str, teacher_id) -> str:
    tcfg = stage_train(cfg, "distill")
    d = cfg.distill
    # Function matching's recipe is appended only for it, so that DeiT stores keep their keys.
    funmatch = ("funmatch", pairing(cfg)) if d.method == "funmatch" else ()
    return fingerprint("teacher-views", VIEWS_FORMAT, teacher_id, shard_dir, d.teacher_views, view_augment(cfg),
                       tcfg.crop_size, tcfg.inception_scale, d.teacher_input_size, d.teacher_topk, tcfg.seed,
                       tcfg.eval_transform, *funmatch)[:16]


def views_path(cfg: PipelineConfig, shard_dir: str, teacher_id) -> str:
    """Inside the shard directory (its splits are subfolders), so that every run on these shards,
    sweep trials with their own output folders included, finds the same views."""
    return storage.join(shard_dir, "teacher_views", views_key(cfg, shard_dir, teacher_id))


def draw_views(paths: list[str], height: int, width: int, kind: str, crop: int, scale: tuple[float, float], seed: int,
               k_views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K views of each image, (boxes N x K x 4, flips N x K), each image's from its own
    generator (seeded by its path and ``seed``): the same whoever draws them, in whatever order."""
    boxes, flips = [], []
    for path in paths:
        digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        b, f = augment.sample_views(k_views, height, width, kind, crop, scale, gen)
        boxes.append(b)
        flips.append(f)
    if not paths:
        return torch.zeros((0, k_views, 4)), torch.zeros((0, k_views), dtype=torch.bool)
    return torch.stack(boxes), torch.stack(flips)


def encode_outputs(logits: torch.Tensor, topk: int) -> dict[str, pa.Array]:
    """Teacher logits (rows x C) as Parquet columns: fp16 logits, or the top ``topk`` above
    :data:`FULL_LOGITS_MAX_CLASSES` classes."""
    if logits.shape[1] <= FULL_LOGITS_MAX_CLASSES:
        return {"logits": _binary_rows(logits.half().numpy())}
    values, index = torch.topk(logits.float(), min(topk, logits.shape[1]), dim=1)
    return {"topk_index": _binary_rows(index.int().numpy()), "topk_logit": _binary_rows(values.half().numpy())}


def decode_outputs(table: pa.Table, num_classes: int) -> "torch.Tensor | TopkLogits":
    """The teacher logits back from :func:`encode_outputs`' columns: dense fp16 (rows x C), or
    :class:`TopkLogits`, which expands rows to that form only when they are indexed."""
    if "logits" in table.column_names:
        return torch.from_numpy(_rows_of(table["logits"], np.float16, num_classes))
    index = torch.from_numpy(_rows_of(table["topk_index"], np.int32, None))
    values = torch.from_numpy(_rows_of(table["topk_logit"], np.float16, index.shape[1]))
    return TopkLogits(values, index, num_classes)


class TopkLogits:
    """The teacher's top-k logits per row (fp16 values, int32 classes), kept compact in memory.

    Indexing works on the leading dimensions as on a dense ``(..., C)`` tensor and stays compact;
    ``float()`` / ``half()`` give the dense rows, the classes a row does not list far below its
    smallest logit. Dense fp16 for ImageNet-1k at K = 10 would be about 26 GB in every worker;
    compact (k = 10) it is about 0.8 GB, and only a batch's rows are ever expanded."""

    dtype = torch.float16

    def __init__(self, values: torch.Tensor, index: torch.Tensor, num_classes: int):
        self.values, self.index, self.num_classes = values, index, num_classes

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.values.shape[:-1], self.num_classes))

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, at) -> "TopkLogits":
        return TopkLogits(self.values[at], self.index[at], self.num_classes)

    def view(self, *shape: int) -> "TopkLogits":
        lead, k = shape[:-1], self.values.shape[-1]
        return TopkLogits(self.values.view(*lead, k), self.index.view(*lead, k), self.num_classes)

    def to(self, device) -> "TopkLogits":
        return TopkLogits(self.values.to(device), self.index.to(device), self.num_classes)

    def float(self) -> torch.Tensor:
        values = self.values.float()
        fill = values.min(dim=-1, keepdim=True).values - TOPK_FILL_BELOW
        dense = fill.expand(*values.shape[:-1], self.num_classes).clone()
        return dense.scatter_(-1, self.index.long(), values)

    def half(self) -> torch.Tensor:
        return self.float().half()


def _binary_rows(rows: np.ndarray) -> pa.Array:
    return fixed_size_binary_column(rows)


def _rows_of(column: pa.ChunkedArray, dtype, width: int | None) -> np.ndarray:
    """A column of fixed-size binary cells -> (rows, width) of ``dtype``, read as the shards' images
    are (one copy); ``width=None`` takes it from the first cell (top-k rows)."""
    itemsize = np.dtype(dtype).itemsize
    if width is None:
        width = column.type.byte_width // itemsize
    rows = gather_binary(column, np.arange(len(column)), (width * itemsize,))
    return rows.view(dtype).reshape(len(column), width)


class _Labeler:
    """The frozen teacher of a label actor (or of the in-process path): a batch of stored images in,
    their K views' rows out (one per image and view)."""

    def __init__(self, teacher: str, settings: dict[str, Any], threads: int, use_gpu: bool, progress=None):
        from pipeline import checkpoints
        from pipeline.models import prefers_channels_last

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model, self.meta = checkpoints.load_model(teacher, self.device)
        self.model.eval()
        self.channels_last = prefers_channels_last(self.model, self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.s = settings
        self.progress = progress  # a Ray queue the driver counts labelled rows from, or None

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if not len(x):
            return torch.zeros((0, self.s["classes"]))
        return torch.cat([self.model(x[i : i + 64]).float().cpu() for i in range(0, len(x), 64)])

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        """Training rows -> K rows each (their views); validation rows -> one row each (view -1)."""
        s = self.s
        h, w = s["shape"][:2]
        is_val = np.asarray(batch["split"].to_pylist() if "split" in batch.column_names else ["train"] * batch.num_rows) == "val"
        images = torch.from_numpy(_rows_of(batch["image"], np.uint8, h * w * 3).reshape(batch.num_rows, h, w, 3)).to(self.device)
        all_paths = batch["path"].to_pylist()
        train_at, val_at = np.flatnonzero(~is_val), np.flatnonzero(is_val)
        paths = [all_paths[i] for i in train_at]
        boxes, flips = draw_views(paths, h, w, s["augment"], s["crop"], tuple(s["scale"]), s["seed"], s["k"])
        k, n = s["k"], len(paths)
        idx = torch.from_numpy(train_at).repeat_interleave(k)
        flat_boxes, flat_flips = boxes.reshape(-1, 4), flips.reshape(-1)
        x = self._render(images, idx, flat_boxes, flat_flips)
        pair_columns = {}
        if s["pairs"]:
            chunks = batch["chunk"].to_numpy()[train_at] if "chunk" in batch.column_names else np.full(n, -1)
            partner, lam = draw_pairs(chunks, paths, k, s["seed"], s["pairs"]["fold"])
            views = torch.arange(k).expand(n, k)
            xp = self._render(images, torch.from_numpy(train_at)[partner.reshape(-1)], boxes[partner, views].reshape(-1, 4),
                              flips[partner, views].reshape(-1))
            x = augment.mix(x, xp, lam.reshape(-1).to(x.device))
            pair_columns = {"partner": [paths[j] for j in partner.reshape(-1).tolist()], "lam": lam.reshape(-1).numpy()}
        logits = self._logits(x)
        # The student's evaluation input (its crop, its eval transform), seen at the teacher's size:
        # what an online teacher is shown in validation (pipeline.train.steps.DeitTask.eval_outputs).
        xv = batch_for_eval(images[torch.from_numpy(val_at).to(self.device)], TrainConfig(eval_transform=s["eval_transform"]),
                            s["crop"], self.meta["mean"], self.meta["std"], self.channels_last)
        val_logits = self._logits(xv if s["size"] == s["crop"] else augment.resize(xv, s["size"]))
        nv = len(val_at)
        columns = {
            "path": pa.array([p for p in paths for _ in range(k)] + [all_paths[i] for i in val_at], type=pa.string()),
            "view": pa.array(np.concatenate([np.tile(np.arange(k, dtype=np.int16), n), np.full(nv, -1, np.int16)])),
            **{name: pa.array(np.concatenate([flat_boxes[:, i].numpy().astype(np.float32), np.zeros(nv, np.float32)]))
               for i, name in enumerate(("x1", "y1", "x2", "y2"))},
            "flip": pa.array(np.concatenate([flat_flips.numpy(), np.zeros(nv, bool)])),
            **encode_outputs(torch.cat([logits, val_logits]), s["topk"]),
        }
        if pair_columns:  # a validation row is its own partner, unmixed
            columns["partner"] = pa.array(pair_columns["partner"] + [all_paths[i] for i in val_at], type=pa.string())
            columns["lam"] = pa.array(np.concatenate([pair_columns["lam"], np.ones(nv, np.float32)]).astype(np.float32))
        if self.progress is not None:
            try:
                self.progress.put_nowait(n * k + nv)
            except Exception:  # a full or vanished queue costs the bar a step, never the labels
                pass
        return pa.table(columns)

    def _render(self, images: torch.Tensor, idx: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        s = self.s
        return augment.render_views(images, idx.to(self.device), boxes.to(self.device), flips.to(self.device), s["size"],
                                    self.meta["mean"], self.meta["std"], s["mode"], self.channels_last)


def draw_pairs(chunks: np.ndarray, paths: list[str], k_views: int, seed: int, fold: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Function matching's mixup for each training row and view: the partner (a row of the same
    chunk, N x K indices into ``paths``) and lambda (N x K, U(0, 1), or max(u, 1 - u) with ``fold``).

    Within a chunk and view the partners follow one random cycle, so every image is mixed into
    exactly one other, like the rolled batch of online function matching. Each chunk's draws come
    from a generator seeded by its first path, so they do not depend on how the work is batched.
    """
    partner = torch.zeros((len(paths), k_views), dtype=torch.long)
    lam = torch.zeros((len(paths), k_views))
    for chunk in np.unique(chunks):
        members = torch.from_numpy(np.flatnonzero(chunks == chunk))
        members = members[torch.from_numpy(np.argsort([paths[i] for i in members.tolist()], kind="stable"))]
        digest = hashlib.sha256(f"{seed}:pairs:{paths[members[0]]}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        for k in range(k_views):
            cycle = members[torch.randperm(len(members), generator=gen)]
            partner[cycle, k] = torch.roll(cycle, 1)
            u = torch.rand(len(members), generator=gen)
            lam[members, k] = torch.maximum(u, 1 - u) if fold else u
    return partner, lam


@dataclass
class ViewStore:
    """A view store in memory (all of it, or the rows of some training images): per training image
    (``paths`` order) K boxes, flips and the teacher's logits (fp16, or :class:`TopkLogits`); per
    validation image (``val_paths`` order) the teacher's logits."""

    paths: list[str]
    boxes: torch.Tensor  # N x K x 4
    flips: torch.Tensor  # N x K
    logits: "torch.Tensor | TopkLogits"  # N x K x C
    manifest: dict[str, Any]
    val_paths: list[str]
    val_logits: "torch.Tensor | TopkLogits"  # M x C
    # function matching: each view's mixup partner (N x K rows of ``paths``) and lambda (N x K)
    partners: torch.Tensor | None = None
    lams: torch.Tensor | None = None


class PartnersElsewhere(ValueError):
    """Function-matching views of a worker's images are mixed with images another worker holds."""


def load_views(path: str, train_paths: list[str] | None = None, train_rows: tuple[int, int] | None = None) -> ViewStore:
    """Read and check a view store; a partial or damaged one is refused with what is wrong.

    ``train_paths``: read only the views of these training images (and every validation row), as a
    training worker does for its own part, so that its memory follows its part and not the split.
    Images the store lacks are left out (the caller says which it needed). ``train_rows``: where
    those images lie in the training split (``[start, stop)``, storage order), so that only the
    files holding those rows and the validation rows are read (see :func:`files_for_rows`)."""
    manifest_path = storage.join(path, "manifest.json")
    if not storage.is_file(manifest_path):
        raise DataError(f"the teacher view store {path} is incomplete (no manifest.json: its build did not finish); {REBUILD}")
    try:
        manifest = storage.read_json(manifest_path)
        files = [storage.join(path, f) for f in manifest["files"]]
        k, n, n_val = int(manifest["num_views"]), int(manifest["images"]), int(manifest["val_images"])
        int(manifest["num_classes"])  # checked here, read where the rows are decoded
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"the teacher view store {path} has an unreadable manifest.json ({exc}); {REBUILD}") from None
    check_files(path, manifest)
    if train_paths is not None and train_rows is not None:
        # falls back to every file if it picks none: a dataset of no files has no columns to filter
        files = [storage.join(path, f) for f in files_for_rows(manifest, train_rows)] or files
    try:
        table = read_rows(path, files, train_paths)
        if train_paths is None and table.num_rows != n * k + n_val:
            raise DataError(f"holds {table.num_rows} rows, its manifest says {n} images x {k} views and {n_val} validation images")
        return views_from_table(table, manifest, n_val, n if train_paths is None else None, train_paths)
    except (DataError, pa.ArrowException, OSError, KeyError) as exc:
        raise DataError(f"the teacher view store {path} is damaged ({exc}); {REBUILD}") from None


def check_files(path: str, manifest: dict[str, Any]) -> None:
    """Refuse a store that lacks any of the files its manifest lists."""
    # one listing, not one existence check per file (each a request on an object store)
    prefix = storage.resolve(path)[1].rstrip("/") + "/"
    present = {storage.resolve(f)[1][len(prefix):] for f in storage.list_files(path, ".parquet")}
    missing = [f for f in manifest["files"] if f not in present]
    if missing:
        raise DataError(f"the teacher view store {path} lacks {len(missing)} of its {len(manifest['files'])} files "
                        f"({missing[0]}, ...); {REBUILD}")


def views_from_table(table: pa.Table, manifest: dict[str, Any], n_val: int, expected: int | None,
                     train_paths: list[str] | None) -> ViewStore:
    """A :class:`ViewStore` from rows read out of a store: ``n_val`` of them validation rows
    (``view`` -1), the rest K per training image (``expected`` images, when known). Raises
    :class:`DataError` (or Arrow's and torch's own errors) where the rows are not what they must be."""
    k, classes = int(manifest["num_views"]), int(manifest["num_classes"])
    table = table.sort_by([("view", "ascending"), ("path", "ascending")])
    val, table = table.slice(0, n_val), table.slice(n_val)
    if n_val and (len(val) != n_val or val["view"].to_numpy().max() != -1):
        raise DataError("does not hold the teacher's output on every validation image")
    table = table.sort_by([("path", "ascending"), ("view", "ascending")])
    paths = table["path"].to_pylist()[::k]
    found = len(paths) if expected is None else expected
    if len(set(paths)) != found or table["view"].to_numpy().tolist() != list(range(k)) * found:
        raise DataError("does not hold exactly the K views of each image")
    boxes = torch.from_numpy(np.stack([table[c].to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1)).float()
    flips = torch.from_numpy(table["flip"].to_numpy(zero_copy_only=False).astype(bool))
    logits = decode_outputs(table, classes)
    val_logits = decode_outputs(val, classes)
    wanted = None if train_paths is None else set(train_paths)
    partners, lams = _pairs_of(table, paths, k, manifest, wanted) if "partner" in table.column_names else (None, None)
    return ViewStore(paths, boxes.view(found, k, 4), flips.view(found, k), logits.view(found, k, classes), manifest,
                     val["path"].to_pylist(), val_logits, partners, lams)


def files_for_rows(manifest: dict[str, Any], rows: tuple[int, int]) -> list[str]:
    """The store's files that may hold the training rows ``[start, stop)`` (positions in the split,
    storage order), and every file of validation rows: what a worker whose part is that range needs
    to read, about 1/world of the store's training files. A store written before files were mapped
    to their rows (no ``file_rows`` in its manifest) gives all its files."""
    where = manifest.get("file_rows")
    if not isinstance(where, dict):
        return list(manifest["files"])
    start, stop = rows
    keep = []
    for name in manifest["files"]:
        entry = where.get(name)
        if not (isinstance(entry, list) and len(entry) == 3 and all(isinstance(v, (int, float)) for v in entry[1:])):
            entry = ["train", 0, math.inf]  # unmapped (or unreadable): it may hold any row
        split, first, last = entry
        if split != "train" or (first < stop and last > start):
            keep.append(name)
    return keep


def read_rows(path: str, files: list[str], train_paths: list[str] | None) -> pa.Table:
    """The store's rows: all, or those of ``train_paths`` plus the validation rows. The scanner
    applies the filter to each record batch as it reads, so other parts' rows in ``files`` are held
    only a batch at a time."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, _ = storage.resolve(path)
    dataset = pads.dataset([storage.resolve(f)[1] for f in files], filesystem=fs, format="parquet")
    if train_paths is None:
        return dataset.to_table()
    wanted = pc.field("path").isin(pa.array(train_paths, type=pa.string())) | (pc.field("view") == -1)
    return dataset.to_table(filter=wanted)


def _pairs_of(table: pa.Table, paths: list[str], k: int, manifest: dict[str, Any],
              wanted: set[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each view's mixup partner as a row of ``paths``, and its lambda. ``wanted``: the images a
    worker asked for; a partner outside them belongs to another worker's part."""
    row = {p: i for i, p in enumerate(paths)}
    named = table["partner"].to_pylist()
    unknown = [p for p in named if p not in row]
    damaged = [p for p in unknown if wanted is None or p in wanted]
    if damaged:
        raise DataError(f"names mixup partners that are not among its images ({damaged[0]})")
    if unknown:
        world = (manifest.get("mixup_pairs") or {}).get("world", "?")
        raise PartnersElsewhere(
            f"the function-matching views mix {len(unknown)} of this worker's views with images another worker holds "
            f"(e.g. {unknown[0]}): they were paired for {world} training worker(s) in memory mode; train with that "
            "ray.num_workers and train.data=memory, or relabel")
    partners = torch.tensor([row[p] for p in named], dtype=torch.long).view(len(paths), k)
    return partners, torch.from_numpy(table["lam"].to_numpy().astype(np.float32)).view(len(paths), k)


def label_views(cfg: PipelineConfig, shard_dir: str, teacher: str, teacher_id, log=print, force: bool = False,
                tracker=None, in_process: bool = False) -> str:
    """The view store for this config and teacher (``teacher_id``: what identifies its weights, see
    :func:`pipeline.plan.teacher_identity`), built unless a complete one exists. A store whose
    build never finished is rebuilt; a damaged complete one is refused unless ``force``. ``in_process``:
    label in this process instead of a Ray Data job (the same store; for machines without Ray, such
    as the GPU check's)."""
    path = views_path(cfg, shard_dir, teacher_id)

    def reuse() -> bool:
        if storage.is_file(storage.join(path, "manifest.json")) and not force:
            load_views(path)  # refuse a damaged store now, not in every worker
            log(f"label: reusing {cfg.distill.teacher_views} teacher views per image from {path}")
            return True
        return False

    if reuse():
        return path
    if storage.is_uri(path):  # no lock on an object store: the manifest, written last, marks a store complete
        return _build(cfg, shard_dir, teacher, teacher_id, path, log, tracker, in_process)
    lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    with storage.build_lock(lock, lambda where: log(f"label: another run is labelling these views ({where}); waiting for it")):
        return path if reuse() else _build(cfg, shard_dir, teacher, teacher_id, path, log, tracker, in_process)


def run_label_stage(cfg: PipelineConfig, tracker=None, force: bool = False, log=print) -> dict[str, Any]:
    """``python -m pipeline label``: the view store the configured student would replay, built or
    reused; the result is saved as ``<output_dir>/label/result.json``."""
    from pipeline.config import ConfigError, to_yaml
    from pipeline.data.preprocess import built_shards
    from pipeline.plan import plan_stage, teacher_identity
    from pipeline.preflight import check_capacity

    if not cfg.distill.teacher_views:
        raise ConfigError("label: distill.teacher_views is 0 (the teacher runs online); set distill.teacher_views=K (e.g. 4) "
                          "to record K views per training image")
    plan = plan_stage(cfg, "distill", built_shards(cfg))
    if not plan.uses_teacher:
        raise ConfigError("label: distill.type=none trains without a teacher, so there is nothing to label; set distill.type=soft or hard")
    from pipeline.cluster import init_ray

    init_ray(cfg.ray, cfg.output_dir)
    check_capacity(cfg.ray)
    started = time.time()
    path = label_views(cfg, plan.shard_dir, plan.teacher, teacher_identity(plan.teacher), log, force=force, tracker=tracker)
    manifest = storage.read_json(storage.join(path, "manifest.json"))
    stage_dir = storage.join(storage.abspath(cfg.output_dir), "label")
    result = {"stage": "label", "store": path, "teacher": plan.teacher, "teacher_id": manifest["teacher"],
              "num_views": manifest["num_views"], "images": manifest["images"], "views": manifest["views"],
              "label_seconds": manifest["seconds"], "seconds": round(time.time() - started, 2),
              "result_file": storage.join(stage_dir, "result.json")}
    storage.write_text(storage.join(stage_dir, "config.yaml"), to_yaml(cfg))
    storage.write_json(result["result_file"], result)
    return result


def _settings(cfg: PipelineConfig, shard_dir: str, teacher_size: int) -> dict[str, Any]:
    tcfg = stage_train(cfg, "distill")
    manifest = read_manifest(shard_dir)
    crop = tcfg.crop_size or manifest["image_size"]
    kind = view_augment(cfg)
    if cfg.distill.method == "funmatch":  # the teacher sees the student's very tensor
        teacher_size = crop
    return {"k": cfg.distill.teacher_views, "augment": kind, "crop": crop, "scale": list(tcfg.inception_scale),
            "seed": tcfg.seed, "size": teacher_size, "mode": augment.view_mode(kind, crop, teacher_size), "pairs": pairing(cfg),
            "shape": manifest["image_shape"], "classes": manifest["num_classes"], "topk": cfg.distill.teacher_topk,
            "class_names": manifest["class_names"], "images": manifest["split_sizes"]["train"],
            "val_images": manifest["split_sizes"]["val"], "eval_transform": tcfg.eval_transform}


def _build(cfg: PipelineConfig, shard_dir: str, teacher: str, teacher_id, path: str, log, tracker, in_process: bool) -> str:
    from pipeline import checkpoints
    if not in_process:
        from pipeline.cluster import init_ray

        init_ray(cfg.ray, cfg.output_dir)
    meta = checkpoints.read_meta(teacher) if not teacher.startswith(("models:/", "runs:/")) else checkpoints.load_model(teacher)[1]
    s = _settings(cfg, shard_dir, cfg.distill.teacher_input_size or int(meta["input_size"]))
    if s["classes"] != len(meta["class_names"]):
        raise DataError(f"the teacher knows {len(meta['class_names'])} classes, the shards {s['classes']}: label with a teacher trained on them")
    gpu = cfg.ray.use_gpu
    actors = cfg.ray.num_workers
    # A CPU actor asks a sliver less than a training worker's share, a margin for anything Ray Data
    # may schedule beside the actors (the job itself needs no CPU: the actors read and write).
    cpus = 1.0 if gpu else max(0.01, cfg.ray.cpus_per_worker - 0.1)
    items = _label_items(shard_dir, s["pairs"])
    local = not storage.is_uri(path)
    work = f"{path}.partial-{uuid.uuid4().hex[:8]}" if local else path
    if local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for stale in glob.glob(f"{path}.partial-*"):  # left by a killed build (we hold the lock: none is live)
            shutil.rmtree(stale, ignore_errors=True)
    storage.delete_dir(path)
    where = "in this process" if in_process else f"{actors} {'GPU' if gpu else 'CPU'} actor(s)"
    log(f"label: {s['k']} views of {s['images']} training images through the teacher at {s['size']} px, {where} ...")
    t0 = time.perf_counter()
    try:
        if in_process:
            _label_here(items, work, teacher, s, gpu)
        else:
            _run_label_job(items, work, teacher, s, actors, cpus, gpu)
        seconds = time.perf_counter() - t0
        written = storage.list_files(work, ".parquet")
        prefix = storage.resolve(work)[1].rstrip("/") + "/"
        files = [storage.resolve(f)[1][len(prefix):] for f in written]
        manifest = {"format": VIEWS_FORMAT, "key": os.path.basename(path.split("?")[0]), "teacher": teacher_id if isinstance(teacher_id, (str, list)) else str(teacher_id),
                    "teacher_input_size": s["size"], "student_crop": s["crop"], "num_views": s["k"], "augment": s["augment"],
                    "inception_scale": s["scale"], "seed": s["seed"], "num_classes": s["classes"], "class_names": s["class_names"],
                    "encoding": "logits" if s["classes"] <= FULL_LOGITS_MAX_CLASSES else f"top{s['topk']}",
                    "images": s["images"], "views": s["images"] * s["k"], "val_images": s["val_images"],
                    "eval_transform": s["eval_transform"], "mixup_pairs": s["pairs"],
                    "files": files, "file_rows": _file_rows(items, files), "seconds": round(seconds, 2),
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        storage.write_json(storage.join(work, "manifest.json"), manifest)
        load_views(work)  # every image's K views are there before anyone may use them
        if local:
            os.rename(work, path)
    except BaseException:
        if local:
            shutil.rmtree(work, ignore_errors=True)
        raise
    # The rate counts every input the teacher saw: the training views and one per validation image,
    # the same total the progress bar counts.
    labelled = manifest["views"] + manifest["val_images"]
    rate = labelled / max(seconds, 1e-9)
    log(f"label: {labelled} views labelled ({manifest['views']} training, {manifest['val_images']} validation) "
        f"in {seconds:.0f} s ({rate:.1f} views/s); {path}")
    if tracker is not None:
        _track(tracker, cfg, manifest, path, rate)
    return path


def _file_rows(items: list[dict[str, Any]], files: list[str]) -> dict[str, list[Any]]:
    """Each written file's split and rows ``[start, stop)`` in it: the input it was labelled from
    (:func:`label_item` names a file by its input's number)."""
    by_name = {f"part-{number:05d}.parquet": item for number, item in enumerate(items)}
    return {f: [str(by_name[f]["split"]), int(by_name[f]["start"]), int(by_name[f]["stop"])] for f in files if f in by_name}


def _label_items(shard_dir: str, pairs: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The label job's inputs: one per row group of each split (small enough that the actors share
    the work evenly, and a row group is read whole); with mixup pairs, the training split as chunks
    of rows inside each training worker's range (see :func:`pairing`)."""
    from pipeline.data.loading import rank_range, split_files
    from pipeline.data.row_groups import group_items, range_items, row_groups

    fs, _ = storage.resolve(shard_dir)

    def groups_of(split: str):
        return row_groups(split_files(shard_dir, split), fs, not storage.is_uri(shard_dir))

    def by_group(split: str) -> list[dict[str, Any]]:
        return group_items(groups_of(split), split)

    if not pairs:
        return by_group("train") + by_group("val")
    groups = groups_of("train")
    total = sum(g.num_rows for g in groups)
    ranges = []
    for rank in range(pairs["world"]):
        start, stop = rank_range(total, rank, pairs["world"])
        ranges += [(a, min(a + pairs["chunk"], stop)) for a in range(start, stop, pairs["chunk"])]
    return range_items(groups, "train", ranges) + by_group("val")


def label_item(labeler: "_Labeler", item: dict[str, Any], number: int, work: str, batch: int = 32) -> int:
    """Read one input of the label job, label it ``batch`` images at a time (a mixup chunk whole, so
    its images find their partners) and write it as ``part-<number>.parquet`` in ``work``; returns
    the rows written. Named by the input, so a retried input overwrites its own file."""
    table = read_files({key: [value] for key, value in item.items()})
    step = table.num_rows if labeler.s["pairs"] and item["split"] == "train" else batch
    parts = [labeler(table.slice(j, step)) for j in range(0, table.num_rows, step)]
    if not parts:
        return 0
    out = pa.concat_tables(parts)
    fs, root = storage.resolve(work)
    pq.write_table(out, f"{root}/part-{number:05d}.parquet", filesystem=fs)
    return out.num_rows


def _label_here(items: list[dict[str, Any]], work: str, teacher: str, s: dict[str, Any], gpu: bool, batch: int = 256) -> None:
    """The label job without Ray: the same teacher over the same inputs, one Parquet file per input
    (in larger batches: no progress bar waits on them)."""
    labeler = _Labeler(teacher, s, torch.get_num_threads(), gpu)
    fs, root = storage.resolve(work)
    fs.create_dir(root, recursive=True)
    for number, item in enumerate(items):
        label_item(labeler, item, number, work, batch)


class _LabelActor:
    """A Ray Data actor of the label job: for each input it is given, reads it, labels it with the
    teacher it holds and writes its rows (see :func:`label_item`); only a row count goes back.

    Reading and writing here rather than in Ray Data's own read and write tasks: those tasks are
    short, and on a node whose CPUs the actors hold, Ray started a fresh worker process for many of
    them (2-3 s of CPU each for its imports): 33 of the 61 CPU seconds Ray used beside the teacher
    actors in a 3-minute run on 2 vCPUs (benchmarks/README.md). Here the images never pass through
    the object store either."""

    def __init__(self, teacher: str, settings: dict[str, Any], threads: int, use_gpu: bool, work: str, progress=None):
        self.labeler = _Labeler(teacher, settings, threads, use_gpu, progress)
        self.work = work

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [k for k in batch if k != "number"]
        rows = [label_item(self.labeler, {k: batch[k][i] for k in names}, int(batch["number"][i]), self.work)
                for i in range(len(batch["number"]))]
        return {"rows": np.asarray(rows, dtype=np.int64)}


def _run_label_job(items: list[dict[str, Any]], work: str, teacher: str, s: dict[str, Any], actors: int, cpus: float,
                   gpu: bool) -> None:
    """Run :func:`_label_job` and show its progress here: the actors count their rows into a queue
    (the job runs in a task of its own, whose Ray Data progress bars this console does not see)."""
    import ray
    from ray.util.queue import Queue

    from pipeline.console import CountProgress, verbose

    queue = Queue(maxsize=100_000, actor_options={"num_cpus": 0})
    progress = CountProgress("label", s["images"] * s["k"] + s["val_images"], "views")
    try:
        job = ray.remote(num_cpus=0, max_calls=1)(_label_job).remote(items, work, teacher, s, actors, cpus, gpu, queue,
                                                                             verbose())
        while not ray.wait([job], timeout=0.5)[0]:
            progress.advance(sum(queue.get_nowait_batch(queue.qsize())))
        ray.get(job)  # the job's error, if it failed
        progress.advance(sum(queue.get_nowait_batch(queue.qsize())))
    finally:
        progress.close()
        ray.kill(queue.actor)


def _label_job(items: list[dict[str, Any]], work: str, teacher: str, s: dict[str, Any], actors: int, cpus: float, gpu: bool,
               progress=None, show_bars: bool = False) -> None:
    """The Ray Data job, run as a task of its own (``max_calls=1``): its worker process exits when it
    ends, and the teacher actors it owns go with it. (Ray Data drops an actor pool by reference
    counting, and references can outlive the job in the process that ran it; actors left alive
    would hold the CPUs the student's workers need next.)"""
    import ray

    # Ray Data's bars, drawn in this task's process, reach no console unless the driver forwards
    # workers' output (--verbose), and the driver shows its own bar: no need to draw them here.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = show_bars
    from pipeline.data.idle_tick import QuietTick

    # Between the actors' batches (seconds each) the executor would step ten times a second for
    # nothing (see pipeline.data.idle_tick).
    context.custom_execution_callback_classes = [*context.custom_execution_callback_classes, QuietTick]
    fs, root = storage.resolve(work)
    fs.create_dir(root, recursive=True)
    ds = ray.data.from_items([{**item, "number": i} for i, item in enumerate(items)], override_num_blocks=max(1, len(items)))
    rows = ds.map_batches(_LabelActor, fn_constructor_kwargs={"teacher": teacher, "settings": s, "threads": int(round(cpus)) or 1,
                                                           "use_gpu": gpu, "work": work, "progress": progress},
                          batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                          num_cpus=cpus, num_gpus=1 if gpu else 0)
    rows.materialize()


def _track(tracker, cfg: PipelineConfig, manifest: dict[str, Any], path: str, rate: float) -> None:
    """The label stage as its own MLflow stage run (tag ``stage=label``), with what shaped the views."""
    run_id = tracker.stage_run("label", {"role": "label", "teacher_views_key": manifest["key"]}, cfg=cfg,
                               run_name=f"label K={manifest['num_views']} {manifest['teacher_input_size']} px")
    params = {k: manifest[k] for k in ("teacher", "num_views", "teacher_input_size", "student_crop", "augment", "inception_scale",
                                       "seed", "encoding")}
    tracker.log_params(run_id, {f"label.{k}": v for k, v in params.items()} | {"label.store": path})
    from pipeline.tracking import EpochLogger

    EpochLogger(tracker.uri, run_id, cfg.tracking.fail_fast, once_per_step=False).log(
        {"images": manifest["images"], "views": manifest["views"], "label_seconds": manifest["seconds"], "views_per_s": rate}, step=0)
    tracker.end(run_id)

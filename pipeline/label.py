"""The label step: the teacher's outputs on K recorded views of every training image, computed once.

A view is a crop box in stored pixels plus a mirror flag, drawn from a seeded generator with the
student's augmentation (``distill.augment`` or ``train.augment``). The teacher sees each box at its
own input size, the student later replays the same box at its crop size, so every student, sweep
trial and rerun gets the teacher's knowledge for the price of one inference pass per view
(FKD, Shen & Xing 2022; SRe2L's relabelling). ``K = 1`` with centre crops is function matching's
fixed teacher.

Stored as one tensor file (``torch.load(weights_only=True)``) under ``<shard_dir>/teacher_views/``,
named by a fingerprint of the teacher checkpoint, the shards, K and the augmentation, so identical
requests reuse it and any change rebuilds it.
"""

from __future__ import annotations

import io
import time

import torch

from pipeline import checkpoints, storage
from pipeline.config import PipelineConfig, fingerprint, stage_train
from pipeline.data import augment
from pipeline.data.loading import load_split, read_manifest
from pipeline.models import prefers_channels_last

VIEWS_FORMAT = 1


def views_key(cfg: PipelineConfig, shard_dir: str, teacher_id) -> str:
    tcfg = stage_train(cfg, "distill")
    d = cfg.distill
    return fingerprint("teacher-views", VIEWS_FORMAT, teacher_id, shard_dir, d.teacher_views, tcfg.augment,
                       tcfg.crop_size, tcfg.inception_scale, d.teacher_input_size, tcfg.seed)[:16]


def views_path(cfg: PipelineConfig, shard_dir: str, teacher_id) -> str:
    """Inside the shard directory (its splits are subfolders), so that every run on these shards,
    sweep trials with their own output folders included, finds the same views."""
    return storage.join(shard_dir, "teacher_views", f"{views_key(cfg, shard_dir, teacher_id)}.pt")


@torch.no_grad()
def label_views(cfg: PipelineConfig, shard_dir: str, teacher: str, teacher_id, log=print, force: bool = False,
                batch: int = 16) -> str:
    """The path of the views file for this config and teacher (``teacher_id``: what identifies its
    weights, see :func:`pipeline.plan.teacher_identity`), computed unless it already exists."""
    path = views_path(cfg, shard_dir, teacher_id)
    if storage.is_file(path) and not force:
        log(f"label: reusing {cfg.distill.teacher_views} teacher views per image from {path}")
        return path
    tcfg = stage_train(cfg, "distill")
    k_views = cfg.distill.teacher_views
    crop = tcfg.crop_size or read_manifest(shard_dir)["image_size"]
    model, meta = checkpoints.load_model(teacher)
    size = cfg.distill.teacher_input_size or int(meta["input_size"])
    channels_last = prefers_channels_last(model, torch.device("cpu"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train = load_split(shard_dir, "train")
    n, h, w = train.images.shape[:3]
    gen = torch.Generator().manual_seed(tcfg.seed * 7919 + 17)
    drawn = [augment.sample_views(n, h, w, tcfg.augment, crop, tuple(tcfg.inception_scale), gen) for _ in range(k_views)]
    boxes = torch.stack([b for b, _ in drawn], dim=1)  # N x K x 4
    flips = torch.stack([f for _, f in drawn], dim=1)  # N x K
    logits = torch.empty((n, k_views, len(meta["class_names"])), dtype=torch.float16)
    t0 = time.perf_counter()
    log(f"label: {k_views} views of {n} training images through the teacher at {size} px ...")
    mode = augment.view_mode(tcfg.augment, crop, size)
    for k in range(k_views):
        for i in range(0, n, batch):
            idx = torch.arange(i, min(i + batch, n))
            x = augment.render_views(train.images, idx, boxes[idx, k], flips[idx, k], size, meta["mean"], meta["std"], mode,
                                     channels_last)
            logits[idx, k] = model(x).half()
    seconds = time.perf_counter() - t0
    buffer = io.BytesIO()
    torch.save({"format": VIEWS_FORMAT, "paths": train.paths, "boxes": boxes, "flips": flips, "logits": logits,
                "teacher": str(teacher_id), "teacher_input_size": size, "student_crop": crop}, buffer)
    storage.write_bytes(path, buffer.getvalue())
    log(f"label: {n * k_views} views labelled in {seconds:.0f} s ({n * k_views / max(seconds, 1e-9):.1f} views/s); {path}")
    return path

"""Evaluate or apply a trained model with the preprocessing stored in its metadata."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.data.images import load_image
from pipeline.data.sources import DataError, list_class_folders
from pipeline.models import head_logits


def _eval_cfg(meta: dict[str, Any]) -> TrainConfig:
    return TrainConfig(eval_transform=meta.get("eval_transform", "resize"))


def model_inputs(images_u8: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """Stored-size uint8 NHWC images -> the normalised float batch the model was evaluated on."""
    from pipeline.data.batches import batch_for_eval

    return batch_for_eval(images_u8, _eval_cfg(meta), meta["input_size"], meta["mean"], meta["std"])


@torch.no_grad()
def predict_logits(model, images_u8: torch.Tensor, meta: dict[str, Any], batch: int = 128) -> dict[str, torch.Tensor]:
    """Logits of the model (for DeiT students also each head alone)."""
    model.eval()
    outs: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(images_u8), batch):
        x = model_inputs(images_u8[i : i + batch], meta)
        for k, v in head_logits(model, x).items():
            outs.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v) for k, v in outs.items()}


def accuracy_report(logits: dict[str, torch.Tensor], labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Top-1, per-class accuracy, confusion matrix (rows: true class) and count."""
    labels = labels.cpu()
    pred = logits["logits"].argmax(-1)
    k = len(class_names)
    confusion = torch.bincount(labels * k + pred, minlength=k * k).view(k, k)
    per_class = {name: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None) for i, name in enumerate(class_names)}
    report = {"top1": float((pred == labels).float().mean()) if len(labels) else 0.0, "count": int(len(labels)),
              "per_class": per_class, "confusion": confusion.tolist(), "class_names": class_names}
    for head in ("logits_cls", "logits_dist"):
        if head in logits:
            report[f"top1_{head.removeprefix('logits_')}"] = float((logits[head].argmax(-1) == labels).float().mean())
    return report


def load_folder(folder: str, meta: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, list[str], list[dict]]:
    """A class-per-folder tree as stored-size tensors, labelled by the model's class names."""
    names, files, _ = list_class_folders(folder)
    known = {n: i for i, n in enumerate(meta["class_names"])}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DataError(f"folders {unknown} are not classes of this model (it knows {meta['class_names']})")
    images, labels, paths, skipped = [], [], [], []
    for name, fs in zip(names, files):
        for f in fs:
            try:
                images.append(load_image(f, meta["image_size"], meta["resize_mode"]))
                labels.append(known[name])
                paths.append(f)
            except Exception as exc:
                skipped.append({"path": f, "reason": f"{type(exc).__name__}: {exc}"[:200]})
    if not images:
        raise DataError(f"no readable image in {folder}")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels), paths, skipped


def evaluate_folder(model_source: str, folder: str) -> dict[str, Any]:
    from pipeline.checkpoints import load_model

    model, meta = load_model(model_source)
    images, labels, _, skipped = load_folder(folder, meta)
    report = accuracy_report(predict_logits(model, images, meta), labels, meta["class_names"])
    report.update({"model": model_source, "data": os.path.abspath(folder), "skipped": skipped})
    return report


def predict_files(model_source: str, paths: list[str], top_k: int = 3) -> list[dict[str, Any]]:
    from pipeline.checkpoints import load_model

    model, meta = load_model(model_source)
    results = []
    for path in paths:
        try:
            img = torch.from_numpy(load_image(path, meta["image_size"], meta["resize_mode"]).copy())[None]
        except Exception as exc:
            results.append({"path": path, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        probs = predict_logits(model, img, meta)["logits"].softmax(-1)[0]
        top = probs.topk(min(top_k, len(probs)))
        results.append({"path": path, "top": [{"class": meta["class_names"][i], "prob": float(p)} for p, i in zip(top.values, top.indices)]})
    return results

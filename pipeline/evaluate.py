"""Evaluate or apply a trained model with the preprocessing stored in its metadata."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.config import TrainConfig
from pipeline.data.images import load_image
from pipeline.data.sources import DataError, list_class_folders
from pipeline.models import head_logits


#: Evaluation output -> metric name. Every place that reports a metric (the per-epoch series, the
#: published model's scores, ``evaluate``, the report, MLflow, ``result.json``) uses these names,
#: prefixed by the split it was measured on (``val_top1``, ``train_top1``) or by ``final_`` for the
#: published model in MLflow (``final_val_top1``).
HEAD_METRICS = {"logits": "top1", "logits_cls": "top1_cls", "logits_dist": "top1_dist", "teacher": "teacher_top1"}


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


class Scores:
    """Running sums of a model's evaluation outputs against the labels, kept on the outputs' device
    (no host sync per batch): count, loss, top-1 of every head, the teacher's top-1 and agreement
    when a teacher is evaluated beside the model, the distillation KL, and the confusion matrix.
    The one evaluator: training's per-epoch validation, ``evaluate`` and the report all score here."""

    def __init__(self, num_classes: int, with_kl: bool = False, keep_predictions: bool = False):
        self.num_classes, self.with_kl, self.keep_predictions = num_classes, with_kl, keep_predictions
        self.keys: list[str] = []
        self.sums: torch.Tensor | None = None
        self.confusion: torch.Tensor | None = None
        self.predictions: list[torch.Tensor] = []

    def add(self, out: dict[str, torch.Tensor], labels: torch.Tensor, kl: torch.Tensor | None = None) -> None:
        """One batch: ``out`` holds ``logits`` (and ``logits_*`` heads, ``teacher``), ``kl`` the
        batch's mean distillation loss when ``with_kl``. An empty batch still fixes the keys, so that
        ranks without rows reduce alike."""
        device = out["logits"].device
        if self.sums is None:
            self.keys = ["count", "loss"] + [HEAD_METRICS[k] for k in out] + (["agreement"] if "teacher" in out else [])
            self.keys += ["kl"] if self.with_kl and "teacher" in out else []
            self.sums = torch.zeros(len(self.keys), dtype=torch.float64, device=device)
            self.confusion = torch.zeros(self.num_classes**2, dtype=torch.float64, device=device)
        n = len(labels)
        pred = out["logits"].argmax(-1)
        vals = [torch.tensor(float(n), dtype=torch.float64, device=device),
                F.cross_entropy(out["logits"].float(), labels, reduction="sum").double() if n else 0.0]
        vals += [(v.argmax(-1) == labels).sum().double() for v in out.values()]
        if "teacher" in out:
            vals.append((pred == out["teacher"].argmax(-1)).sum().double())
        if "kl" in self.keys:
            vals.append(kl.double() * n if n and kl is not None else 0.0)
        self.sums += torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in vals])
        self.confusion += torch.bincount(labels * self.num_classes + pred, minlength=self.num_classes**2).double()
        if self.keep_predictions:
            self.predictions.append(pred.cpu())

    def all_reduce(self, world: int) -> None:
        """Sum across the ranks of a distributed evaluation (each rank scored its own rows)."""
        if world > 1 and dist.is_available() and dist.is_initialized() and self.sums is not None:
            packed = torch.cat([self.sums, self.confusion])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            self.sums, self.confusion = packed[: len(self.keys)], packed[len(self.keys) :]

    def result(self, class_names: list[str] | None = None) -> dict[str, Any]:
        """Metrics by name (means over the images), ``confusion`` (rows: true class) and, given the
        class names, ``per_class`` top-1 (None for a class without images)."""
        if self.sums is None:
            raise ValueError("nothing was scored")
        sums = self.sums.cpu().tolist()
        n = max(sums[0], 1.0)
        report: dict[str, Any] = {"count": int(sums[0])}
        report.update({k: v / n for k, v in zip(self.keys[1:], sums[1:])})
        k = self.num_classes
        confusion = self.confusion.cpu().round().long().view(k, k)
        report["confusion"] = confusion.tolist()
        if class_names is not None:
            report["per_class"] = {name: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None)
                                   for i, name in enumerate(class_names)}
            report["class_names"] = class_names
        if self.keep_predictions:
            report["predictions"] = torch.cat(self.predictions) if self.predictions else torch.zeros(0, dtype=torch.long)
        return report


def score(outputs, inputs, images_u8: torch.Tensor, labels: torch.Tensor, scores: Scores, batch: int = 256,
          kl=None) -> Scores:
    """Feed ``images_u8`` through ``inputs`` (uint8 -> model input) and ``outputs`` (input, the
    batch's row positions -> named logits) batch by batch into ``scores``; ``kl(student, teacher)``
    gives the batch's KL when the scores keep one. With no images at all the model still runs on
    one blank image, so the keys exist."""
    for i in range(0, max(len(images_u8), 1), batch):
        x = inputs(images_u8[i : i + batch])
        y = labels[i : i + batch]
        if len(y) == 0:
            out = outputs(torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=x.device), torch.zeros(1, dtype=torch.long))
            out = {k: v[:0] for k, v in out.items()}
        else:
            out = outputs(x, torch.arange(i, i + len(y)))
        scores.add(out, y, kl(out["logits"].float(), out["teacher"]) if kl is not None and len(y) and "teacher" in out else None)
    return scores


@torch.no_grad()
def evaluate_model(model, images_u8: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any], batch: int = 128,
                   keep_predictions: bool = False) -> dict[str, Any]:
    """A published model on stored images, as it was validated in training: top-1 per head, loss,
    per-class top-1 and the confusion matrix (see :class:`Scores`)."""
    model.eval()
    scores = Scores(len(meta["class_names"]), keep_predictions=keep_predictions)
    score(lambda x, _rows: {k: v.float() for k, v in head_logits(model, x).items()}, lambda u8: model_inputs(u8, meta),
          images_u8, labels, scores, batch)
    return scores.result(meta["class_names"])


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
    report = evaluate_model(model, images, labels, meta)
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

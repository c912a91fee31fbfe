"""Checkpoint directories: ``model.pt`` (weights), ``meta.json`` (how to rebuild and feed the model),
``train_state.pt`` (optimizer, scheduler, scaler, epoch, RNG: what resuming needs).

Everything is loaded with ``torch.load(weights_only=True)``: a file carrying a pickled payload is
refused, not executed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn as nn

from pipeline import storage
from pipeline.models import model_from_meta

MODEL_FILE, META_FILE, STATE_FILE = "model.pt", "meta.json", "train_state.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, incomplete or unsafe)."""


def save(directory: str, model_state: dict, meta: dict[str, Any], train_state: dict[str, Any] | None = None) -> None:
    os.makedirs(directory, exist_ok=True)
    torch.save(model_state, os.path.join(directory, MODEL_FILE))
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    if train_state is not None:
        torch.save(train_state, os.path.join(directory, STATE_FILE))


def _safe_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"refusing to load {path}: not a plain tensor file ({type(exc).__name__}: {str(exc)[:200]})") from None


def read_meta(directory: str) -> dict[str, Any]:
    """A checkpoint's ``meta.json``; ``directory`` may be local or an object-store URI."""
    path = storage.join(directory, META_FILE)
    if not storage.is_file(path):
        raise CheckpointError(f"{directory} is not a checkpoint of this pipeline ({META_FILE} missing)")
    return json.loads(storage.read_text(path))


def load_train_state(directory: str) -> dict[str, Any]:
    return _safe_load(os.path.join(directory, STATE_FILE))


def load_model(source: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A model and its metadata from a checkpoint directory (local or object store) or an MLflow
    ``models:/`` / ``runs:/`` URI."""
    if source.startswith(("models:/", "runs:/")):
        import mlflow

        info = mlflow.models.get_model_info(source)
        meta = dict(info.metadata or {})
        if "arch" not in meta:
            raise CheckpointError(f"{source} was not logged by this pipeline (no model metadata)")
        model = mlflow.pytorch.load_model(source, map_location=device)
    else:
        if not storage.is_dir(source):
            raise CheckpointError(f"model path {source!r} does not exist (give a checkpoint directory or a models:/ URI)")
        with storage.local_dir(source) as local:
            meta = read_meta(local)
            model = model_from_meta(meta)
            model.load_state_dict(_safe_load(os.path.join(local, MODEL_FILE)))
    return model.to(device).eval(), meta

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


def _brief(exc: BaseException, limit: int = 200) -> str:
    """An exception as one bounded line: these messages end up as a CLI's single error line."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"


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
        raise CheckpointError(f"refusing to load {path}: not a plain tensor file ({_brief(exc)})") from None


def read_meta(directory: str) -> dict[str, Any]:
    """A checkpoint's ``meta.json``; ``directory`` may be local or an object-store URI."""
    path = storage.join(directory, META_FILE)
    if not storage.is_file(path):
        raise CheckpointError(f"{directory} is not a checkpoint of this pipeline ({META_FILE} missing)")
    try:
        meta = json.loads(storage.read_text(path))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({_brief(exc, 120)}); the checkpoint is damaged, train it again") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a JSON object; the checkpoint is damaged, train it again")
    return meta


REQUIRED_META = {"arch": str, "create_kwargs": dict}


def _check_meta(meta: dict[str, Any], where: str) -> None:
    """What rebuilding and feeding a published model needs, with the type each must have."""
    for key, kind in REQUIRED_META.items():
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{where}: meta.json lacks {key!r} (or it is not a {kind.__name__}); not a model this pipeline published")
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{where}: meta.json 'class_names' must be a list of strings")


def load_train_state(directory: str) -> dict[str, Any]:
    return _safe_load(os.path.join(directory, STATE_FILE))


def load_model(source: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A model and its metadata from a checkpoint directory (local or object store) or an MLflow
    ``models:/`` / ``runs:/`` URI (logged by :mod:`pipeline.model_store`; other formats are refused)."""
    if source.startswith(("models:/", "runs:/")):
        from pipeline import model_store

        return model_store.load(source, device)
    if not storage.is_dir(source):
        raise CheckpointError(f"model path {source!r} does not exist (give a checkpoint directory or a models:/ URI)")
    with storage.local_dir(source) as local:
        meta = read_meta(local)
        _check_meta(meta, source)
        try:
            model = model_from_meta(meta)
        except Exception as exc:  # unknown architecture, bad constructor arguments
            raise CheckpointError(f"{source}: cannot rebuild {meta['arch']!r} from meta.json ({_brief(exc)})") from None
        state = _safe_load(os.path.join(local, MODEL_FILE))
        try:
            model.load_state_dict(state)
        except Exception as exc:
            raise CheckpointError(f"{source}: model.pt does not fit {meta['arch']!r} ({_brief(exc)})") from None
    names = meta.get("class_names")
    classes = getattr(model, "num_classes", None)
    if names is not None and isinstance(classes, int) and classes != len(names):
        raise CheckpointError(f"{source}: meta.json names {len(names)} classes but the model has {classes} outputs")
    return model.to(device).eval(), meta

"""Models in MLflow without pickle: what is logged, registered and loaded back.

``mlflow.pytorch`` stores a pickled module (or a ``torch.export`` program, which fixes the batch
size); loading either runs whatever the file contains, so anyone who can write to an MLflow store
could run code on every ``predict --model models:/...``. Instead each model is logged in our own
flavor, ``kd_pipeline``: the same two files as a checkpoint directory (``model.pt``, a plain state
dict, and ``meta.json``, how to rebuild the architecture) plus MLflow's ``MLmodel`` with the
signature. Loading downloads those files and goes through :func:`pipeline.checkpoints.load_model`
(``torch.load(weights_only=True)``); a model in any other format is refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

FLAVOR = "kd_pipeline"
FORMAT = 1


class ModelStoreError(ValueError):
    """A model URI that cannot be loaded safely (not ours, incomplete, or unreachable)."""


class _CheckpointFlavor:
    """The flavor object ``mlflow.models.Model.log`` drives: it only needs ``save_model``."""

    __name__ = FLAVOR

    @staticmethod
    def save_model(path: str, mlflow_model, model_state: dict, meta: dict[str, Any], signature=None,
                   requirements: list[str] | None = None, **_ignored) -> None:
        from pipeline.checkpoints import META_FILE, MODEL_FILE

        os.makedirs(path, exist_ok=True)
        torch.save(model_state, os.path.join(path, MODEL_FILE))
        with open(os.path.join(path, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        if requirements:
            with open(os.path.join(path, "requirements.txt"), "w") as f:
                f.write("\n".join(requirements) + "\n")
        if signature is not None:
            mlflow_model.signature = signature
        mlflow_model.add_flavor(FLAVOR, format=FORMAT, weights=MODEL_FILE, meta=META_FILE,
                                loader="pipeline.checkpoints.load_model (torch.load weights_only=True)")
        mlflow_model.save(os.path.join(path, "MLmodel"))


def log_model(model: torch.nn.Module, meta: dict[str, Any], example: torch.Tensor, registered_name: str | None,
              requirements: list[str]) -> tuple[str, int | None]:
    """Log ``model`` (state dict + meta) to the active run; returns its model URI and registered version."""
    from mlflow.models import Model, infer_signature

    with torch.no_grad():
        out = model(example).float().numpy()
    signature = infer_signature(example.numpy(), out)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    info = Model.log(artifact_path=None, name="model", flavor=_CheckpointFlavor, registered_model_name=registered_name,
                     metadata=meta, model_state=state, meta=meta, signature=signature, requirements=requirements)
    return info.model_uri, info.registered_model_version


def download(uri: str, into: str) -> str:
    """Download the model at an MLflow URI (``models:/``, ``runs:/``) into ``into``; returns the
    local directory, checked to be in our flavor before any file in it is read as weights."""
    import mlflow
    import yaml

    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=into)
    except Exception as exc:
        raise ModelStoreError(f"cannot fetch {uri} from the tracking store {mlflow.get_tracking_uri()!r}: "
                              f"{type(exc).__name__}: {str(exc)[:200]} (give the store with --tracking-uri)") from None
    mlmodel = os.path.join(local, "MLmodel")
    flavors = {}
    if os.path.isfile(mlmodel):
        with open(mlmodel) as f:
            flavors = (yaml.safe_load(f) or {}).get("flavors", {}) or {}
    if FLAVOR not in flavors:
        found = ", ".join(sorted(flavors)) or "no MLmodel flavors"
        raise ModelStoreError(f"refusing {uri}: it was not logged by this pipeline ({found}); models in other "
                              f"formats may carry pickled code and are never loaded")
    return local


def load(uri: str, device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model and meta at an MLflow URI, loaded without unpickling anything."""
    from pipeline.checkpoints import load_model

    with tempfile.TemporaryDirectory(prefix="kd-model-") as tmp:
        return load_model(download(uri, tmp), device)

"""Models in the MLflow store are logged and loaded without unpickling: a planted pickled model,
registered like ours, is refused by every loader and its payload never runs."""

import os

import pytest
import torch

from pipeline import checkpoints, model_store
from pipeline.models import build_student


class Payload(torch.nn.Module):
    """A module whose unpickling writes a marker file: what an attacker would register."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.lin = torch.nn.Linear(3, 2)

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


@pytest.fixture
def store(tmp_path):
    import mlflow

    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("models", artifact_location=(tmp_path / "artifacts").as_uri())
    yield exp
    mlflow.set_tracking_uri(before)


def _student():
    model, meta = build_student("resnet10t", "none", 3, 32, 0.0)
    meta = {**meta, "class_names": ["a", "b", "c"], "num_classes": 3, "input_size": 32, "image_size": 32,
            "eval_transform": "resize", "stage": "distill"}
    return model.eval(), meta


def test_logged_model_round_trips_through_registry_and_run_uris(store):
    import mlflow

    model, meta = _student()
    x = torch.randn(2, 3, 32, 32)
    with mlflow.start_run(experiment_id=store) as run:
        uri, _ = model_store.log_model(model, meta, x, "safe-student", requirements=["timm"])
    for source in (uri, "models:/safe-student/1", f"runs:/{run.info.run_id}/model"):
        loaded, lmeta = checkpoints.load_model(source)
        assert lmeta["arch"] == "resnet10t" and lmeta["class_names"] == ["a", "b", "c"]
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x))


def test_planted_pickled_model_is_refused_and_never_runs(store, tmp_path):
    import mlflow
    import mlflow.pytorch

    marker = tmp_path / "pwned"
    with mlflow.start_run(experiment_id=store):
        mlflow.pytorch.log_model(Payload(str(marker)), name="model", registered_model_name="planted",
                                 serialization_format="pickle", metadata={"arch": "resnet10t"})
        run_id = mlflow.active_run().info.run_id
    marker.unlink(missing_ok=True)  # mlflow.pytorch reloads the model while logging it: the attacker's side
    for source in ("models:/planted/1", f"runs:/{run_id}/model"):
        with pytest.raises(model_store.ModelStoreError, match="it was not logged by this pipeline"):
            checkpoints.load_model(source)
    assert not marker.exists()


def test_unknown_model_names_the_store(store):
    with pytest.raises(model_store.ModelStoreError, match="cannot fetch models:/nothing-here/1 from the tracking store"):
        checkpoints.load_model("models:/nothing-here/1")

"""A stage tracked over HTTP by a real `mlflow server`, checked through MLflow's REST API."""

import socket

import pytest
from pipeline.data.preprocess import preprocess
from tests.mlflow_servers import start_mlflow_server, stop_server
from pipeline.stages import run_training_stage
from pipeline.tracking import tracked
from tests.conftest import free_port
from tests.mlflow_rest import metric_steps, rest, runs, tags
from tests.test_training import small_config


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    proc = start_mlflow_server(str(store), port=port, log_path=str(store / "server.log"))
    yield {"url": f"http://127.0.0.1:{port}", "port": port}
    stop_server(proc)


def test_stage_tracked_over_http_is_visible_through_the_rest_api(ray_local, server, tmp_path):
    cfg = small_config(tmp_path, f"tracking.uri={server['url']}", "tracking.experiment=over-http", "ray.num_workers=1",
                       "teacher.epochs=2")
    preprocess(cfg, log=lambda *_: None)
    with tracked(cfg, "teacher") as tracker:
        result = run_training_stage(cfg, "teacher", tracker)
    assert result["mlflow"]["tracking_uri"] == server["url"]  # no fallback to a local store

    url = server["url"]
    found = runs(url, "over-http")
    (teacher,) = [r for r in found if tags(r).get("stage") == "teacher"]
    (parent,) = [r for r in found if tags(r).get("pipeline.invocation") == "teacher"]
    assert teacher["info"]["status"] == "FINISHED" and parent["info"]["status"] == "FINISHED"
    assert tags(teacher)["mlflow.parentRunId"] == parent["info"]["run_id"]
    run_id = teacher["info"]["run_id"]
    assert metric_steps(url, run_id, "val_top1") == [1, 2]
    assert metric_steps(url, run_id, "train_loss") == [1, 2]
    params = {p["key"]: p["value"] for p in teacher["data"]["params"]}
    assert params["teacher.epochs"] == "2"

    models = rest(url, "registered-models/search", max_results=100)["registered_models"]
    (model,) = [m for m in models if m["name"] == "over-http-teacher"]
    versions = rest(url, "model-versions/search", filter="name='over-http-teacher'")["model_versions"]
    assert [v["run_id"] for v in versions] == [run_id] and model["name"] == "over-http-teacher"
    artifacts = {f["path"] for f in rest(url, "artifacts/list", run_id=run_id).get("files", [])}
    assert {"learning_curves.png", "confusion_val.png", "config.yaml"} <= artifacts


def _external_ip() -> str | None:
    """This machine's address on its default route (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
        return None if ip.startswith("127.") else ip
    except OSError:
        return None


def test_the_server_the_project_starts_listens_on_loopback_only(server):
    ip = _external_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address to try")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ip, server["port"]), timeout=5).close()
    socket.create_connection(("127.0.0.1", server["port"]), timeout=5).close()

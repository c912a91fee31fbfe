"""The MLflow server down at the start, or going away mid-run: training goes on, and every epoch's
metrics arrive exactly once (on the server when it is back, in a local fallback store, or in the
stage's unsent file)."""

import json
import socket
import threading
import warnings

from mlflow.tracking import MlflowClient
from pipeline.data.preprocess import preprocess
from tests.mlflow_servers import start_mlflow_server, stop_server
from pipeline.stages import run_training_stage
from pipeline.tracking import tracked
from tests.conftest import free_port
from tests.jobs import wait_for
from tests.mlflow_rest import metric_steps, runs, tags
from tests.test_training import small_config

EPOCHS = 8


def test_server_outage_mid_run_loses_no_metric_and_duplicates_none(ray_local, tmp_path):
    store, port = tmp_path / "store", free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = small_config(tmp_path, f"tracking.uri={url}", "tracking.experiment=outage", "ray.num_workers=1",
                       f"teacher.epochs={EPOCHS}", "teacher.mode=full")
    preprocess(cfg, log=lambda *_: None)
    outcome = {}

    def train():
        try:
            with tracked(cfg, "teacher") as tracker:
                outcome["result"] = run_training_stage(cfg, "teacher", tracker, log=lambda *_: None)
        except BaseException as exc:  # surfaced by the assertion below
            outcome["error"] = exc

    server = start_mlflow_server(str(store), port=port, log_path=str(tmp_path / "server.log"))
    worker = threading.Thread(target=train)
    try:
        worker.start()
        run_id = wait_for(lambda: _teacher_run_with_an_epoch(url), 300, "the first epoch's metrics on the server")
        stop_server(server)
        server = None
        seen = _checkpoints(tmp_path)
        # Training goes on while the server is down: a new epoch is checkpointed.
        wait_for(lambda: _checkpoints(tmp_path) - seen, 300, "an epoch while the server is down", every=0.2)
        server = start_mlflow_server(str(store), port=port, log_path=str(tmp_path / "server.log"))
        worker.join(600)
        assert "error" not in outcome, outcome.get("error")
        assert [h["epoch"] for h in outcome["result"]["history"]] == list(range(1, EPOCHS + 1))
        delivered = metric_steps(url, run_id, "train_loss")
        unsent_file = tmp_path / "teacher" / "mlflow_unsent.jsonl"
        kept = [json.loads(line)["step"] for line in unsent_file.read_text().splitlines()
                if json.loads(line)["key"] == "train_loss"] if unsent_file.exists() else []
        assert sorted(delivered + kept) == list(range(1, EPOCHS + 1)), (delivered, kept)
    finally:
        worker.join(600)
        if server is not None:
            stop_server(server)


def _teacher_run_with_an_epoch(url):
    try:
        for run in runs(url, "outage"):
            if tags(run).get("stage") == "teacher" and metric_steps(url, run["info"]["run_id"], "train_loss"):
                return run["info"]["run_id"]
    except Exception:  # the experiment may not exist yet
        return None
    return None


def _checkpoints(tmp_path) -> set[str]:
    """Names of the teacher's checkpoints (old ones are deleted as new ones come: compare names, not counts)."""
    return {p.name for p in tmp_path.glob("ray_results/teacher-*/checkpoint_*")}


def test_unreachable_tracking_server_does_not_stop_training(ray_local, tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = small_config(tmp_path, f"tracking.uri=http://127.0.0.1:{port}", "ray.num_workers=1", "teacher.epochs=2",
                       "teacher.pretrained=none", "teacher.model=resnet10t", "teacher.mode=full", "data.synthetic.images_per_class=16")
    preprocess(cfg, log=lambda *_: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracked(cfg, "teacher") as tracker:
            result = run_training_stage(cfg, "teacher", tracker, log=lambda *_: None)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert any("unreachable" in str(w.message) for w in caught)
    fallback = tmp_path / "mlflow_fallback.db"
    assert fallback.is_file() and result["mlflow"]["run_id"]
    client = MlflowClient(f"sqlite:///{fallback}")
    assert [m.step for m in client.get_metric_history(result["mlflow"]["run_id"], "train_loss")] == [1, 2]


def test_fallback_store_for_object_store_outputs_is_in_the_base_directory(tmp_path, monkeypatch):
    """SQLite needs a local file: with outputs in a bucket the fallback goes to the base directory, and
    no local directory named after the URI appears in the working directory."""
    from pipeline.config import load_config
    from pipeline.tracking import Tracker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base, cwd = tmp_path / "base", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PIPELINE_BASE_DIR", str(base))
    cfg = load_config(None, ["output_dir=s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http",
                             f"tracking.uri=http://127.0.0.1:{port}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(cfg, "teacher").start()
    tracker.finish()
    assert tracker.uri == f"sqlite:///{base / 'mlflow_fallback.db'}"
    assert (base / "mlflow_fallback.db").is_file() and any("unreachable" in str(w.message) for w in caught)
    assert list(cwd.iterdir()) == []

"""Tracking stores that answer but cannot be used, and credentials in URIs: detected at the start,
with the same fallback as an unreachable server; nothing dropped silently, no secret echoed."""

import json
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config, to_yaml
from pipeline.tracking import EpochLogger, Tracker
from tests.conftest import free_port


def _start(tmp_path, uri):
    cfg = load_config(None, [f"output_dir={tmp_path / 'out'}", f"tracking.uri={uri}", "tracking.experiment=unusable"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(cfg, "teacher").start()
    return tracker, [str(w.message) for w in caught]


def _fallback_holds_a_run(tmp_path, tracker):
    fallback = f"sqlite:///{tmp_path / 'out' / 'mlflow_fallback.db'}"
    assert tracker.uri == fallback and tracker.parent_id
    assert MlflowClient(fallback).get_run(tracker.parent_id).info.run_name == "teacher"


def test_sqlite_uri_on_a_file_that_is_not_a_database_falls_back(tmp_path):
    junk = tmp_path / "notes.db"
    junk.write_text("these are my notes, not a database\n" * 50)
    tracker, said = _start(tmp_path, f"sqlite:///{junk}")
    _fallback_holds_a_run(tmp_path, tracker)
    assert any("unusable" in m and "mlflow_fallback.db" in m for m in said), said
    assert junk.read_text().startswith("these are my notes")  # left as it was


class _EmptyAnswers(BaseHTTPRequestHandler):
    def _empty(self):
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _empty

    def log_message(self, *args):
        pass


@pytest.fixture
def empty_server():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _EmptyAnswers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_server_that_answers_200_with_nothing_falls_back(tmp_path, empty_server):
    tracker, said = _start(tmp_path, empty_server)
    _fallback_holds_a_run(tmp_path, tracker)
    assert any("unusable" in m for m in said), said


def test_metrics_without_any_run_are_kept_in_the_unsent_file(tmp_path):
    unsent = tmp_path / "mlflow_unsent.jsonl"
    logger = EpochLogger(None, None, fallback_path=str(unsent))
    logger.log({"train_loss": 0.5, "val_top1": 0.25}, 1)
    logger.log({"train_loss": 0.4, "val_top1": 0.5}, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.close()
    rows = [json.loads(line) for line in unsent.read_text().splitlines()]
    assert sorted((r["key"], r["step"]) for r in rows) == [("train_loss", 1), ("train_loss", 2), ("val_top1", 1), ("val_top1", 2)]


def test_credentials_in_uris_are_never_echoed(tmp_path):
    dead = f"http://alice:s3cr3t-pw@127.0.0.1:{free_port()}/"
    tracker, said = _start(tmp_path, dead)
    assert said and not any("s3cr3t-pw" in m for m in said), said
    params = MlflowClient(tracker.uri).get_run(tracker.parent_id).data.params
    assert params["tracking.uri"] == f"http://***@127.0.0.1:{dead.rsplit(':', 1)[1]}"
    assert not any("s3cr3t-pw" in v for v in params.values())
    cfg = load_config(None, [f"tracking.uri={dead}", "data.path=https://bob:hunter2@example.com/flowers.tgz"])
    text = to_yaml(cfg)
    assert "s3cr3t-pw" not in text and "hunter2" not in text and "***@example.com" in text

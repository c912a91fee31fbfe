"""Several invocations started together on a SQLite store that does not exist yet: MLflow creates
its tables without a lock of its own, so unguarded they race, one falls back to another store and
the file can be left half-migrated for good. Every run must land in the store it asked for."""

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Each process does its slow imports, says it is ready, then waits for one shared start signal,
# so the stores' first openings fall within milliseconds of each other.
STARTER = """
import json, os, sys, time, warnings
from mlflow.tracking import MlflowClient  # noqa: F401  (imported before the start signal)
from pipeline.config import load_config
from pipeline.tracking import Tracker

out, uri, here, name = sys.argv[1:5]
cfg = load_config(None, [f"output_dir={out}", f"tracking.uri={uri}", "tracking.experiment=together"])
open(os.path.join(here, f"ready-{name}"), "w").close()
while not os.path.exists(os.path.join(here, "go")):
    time.sleep(0.002)
tracker = Tracker(cfg, name)
try:  # every tracker call opens the store this way; once, without the retries that could hide a race
    tracker._client().search_experiments(max_results=1)
    first = None
except Exception as exc:
    first = f"{type(exc).__name__}: {exc}"[:300]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tracker.start()
print(json.dumps({"first": first, "uri": tracker.uri, "parent": tracker.parent_id, "said": [str(w.message) for w in caught]}))
"""


def test_runs_started_together_on_a_new_store_all_land_in_it(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    names = [f"run-{i}" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path / "out"), uri, str(tmp_path), name], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{n}").exists() for n in names) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        time.sleep(0.05)
    (tmp_path / "go").write_text("")
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(names), [err[-2000:] for _, err in outputs]
    started = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [s["first"] for s in started] == [None] * len(names), started
    assert [s["uri"] for s in started] == [uri] * len(names), started  # nobody fell back to mlflow_fallback.db
    assert not [m for s in started for m in s["said"] if "MLflow" in m], started
    client = MlflowClient(uri)  # and the store is whole: it opens and holds one run per invocation
    exp = client.get_experiment_by_name("together")
    assert sorted(r.info.run_name for r in client.search_runs([exp.experiment_id])) == names
    assert not (tmp_path / "out" / "mlflow_fallback.db").exists()


def test_the_lock_file_is_named_after_the_database_file_not_the_uri(tmp_path, monkeypatch):
    from pipeline.tracking import ready_store

    ready_store(f"sqlite:///{tmp_path}/runs.db?timeout=30")  # a query is not part of the file name
    assert sorted(p.name for p in tmp_path.iterdir()) == [".runs.db.lock", "runs.db"]
    memory = tmp_path / "cwd"
    memory.mkdir()
    monkeypatch.chdir(memory)  # where a lock for the relative name ":memory:" would land
    ready_store("sqlite:///:memory:?cache=shared")  # nothing on disk to guard
    assert list(memory.iterdir()) == []

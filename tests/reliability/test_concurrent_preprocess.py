"""Two runs of the same dataset into the same output_dir at once: one builds (or trains), the other
waits and reuses; no run deletes the other's work, and one complete copy is left."""

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_two_concurrent_runs_leave_one_copy_of_the_shards_and_train_the_teacher_once(ray_cluster, tmp_path):
    """Two invocations of `preprocess` then `teacher` started together on a new output_dir: one
    decodes while the other waits and reuses; one trains the teacher while the other waits for it
    and finds the stage up to date (without the stage lock both trained into one Ray run). The test
    holds the teacher's lock until both wait on it, so the two always meet there."""
    import threading

    from pipeline import storage
    from mlflow.tracking import MlflowClient

    from pipeline.data import synthetic

    photos = synthetic.generate(tmp_path / "photos", 5, 60, 64, seed=0)  # a finished tree, as real photos are
    common = [f"output_dir={tmp_path / 'out'}", "data.source=folder", f"data.path={photos}", "data.image_size=48",
              f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=together"]
    teacher = ["teacher.model=resnet10t", "teacher.pretrained=none", "teacher.mode=full", "teacher.epochs=1",
               "teacher.batch_size=16", "teacher.crop_size=40", "ray.num_workers=1"]
    command = " && ".join(shlex.join([sys.executable, "-m", "pipeline", stage, *common, *extra])
                          for stage, extra in (("preprocess", []), ("teacher", teacher)))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"], "PYTHONUNBUFFERED": "1"}
    waiting = "teacher: another run is training this stage"
    with storage.build_lock(str(tmp_path / "out" / ".locks" / "stage-teacher.lock")):
        runs = [subprocess.Popen(["sh", "-c", command], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for _ in range(2)]
        lines = [[], []]
        readers = [threading.Thread(target=lambda r=r, out=out: out.extend(r.stdout), daemon=True) for r, out in zip(runs, lines)]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + 300
        while not all(any(waiting in line for line in out) for out in lines):
            assert time.monotonic() < deadline and all(r.poll() is None for r in runs), lines
            time.sleep(0.2)
    for r, reader in zip(runs, readers):
        r.wait(timeout=600)
        reader.join(timeout=60)
    outputs = ["".join(out) for out in lines]
    assert [r.returncode for r in runs] == [0, 0], outputs
    built = [o for o in outputs if "with Ray Data ->" in o]
    assert len(built) == 1, outputs  # the other one waited and reused the copy
    shards = tmp_path / "out" / "shards"
    copies = [d for d in shards.iterdir() if d.is_dir()]
    assert len(copies) == 1 and not [d for d in shards.iterdir() if ".partial-" in d.name]
    manifest = json.loads((copies[0] / "manifest.json").read_text())
    listed = [f for files in manifest["files"].values() for f in files]
    assert listed and all((copies[0] / f).is_file() for f in listed)
    assert sum(manifest["split_sizes"].values()) == 5 * 60
    trained = [o for o in outputs if "training teacher" in o]
    assert len(trained) == 1, outputs
    assert "teacher: up to date" in next(o for o in outputs if o not in trained), outputs
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("together")
    teacher_runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'teacher'")
    assert len(teacher_runs) == 1
    assert [len(client.get_metric_history(teacher_runs[0].info.run_id, "val_top1"))] == [1]  # its one epoch, once


def test_object_store_builds_never_remove_a_live_run_s_files(ray_local, object_store, tmp_path):
    """On an object store (no lock, no rename) each build writes under its own prefix; a rebuild
    removes only builds whose owner has ended, and the manifest lists exactly the new build's files."""
    import socket
    import time

    from pipeline import storage
    from pipeline.config import load_config
    from pipeline.data import synthetic
    from pipeline.data.loading import load_split
    from pipeline.data.preprocess import STALE_BUILD_S, preprocess

    photos = synthetic.generate(tmp_path / "photos", 3, 12, 40, seed=1)
    cfg = load_config(None, [f"output_dir={object_store('builds')}", "data.source=folder", f"data.path={photos}",
                             "data.image_size=32", "data.val_fraction=0.25"])
    dest = preprocess(cfg, log=lambda m: None)["shard_dir"]
    first_build = {f.split("/build-")[1].split("/")[0] for f in storage.read_json(storage.join(dest, "manifest.json"))["files"]["train"]}
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)  # a process of this host that has ended
    now, host = time.time(), socket.gethostname()
    planted = {  # another run's build in each state its owner can be in
        "build-live": {"host": host, "pid": os.getppid(), "started_at": now},
        "build-dead": {"host": host, "pid": dead_pid, "started_at": now},
        "build-far-young": {"host": "another-node", "pid": 1, "started_at": now - 60},
        "build-far-old": {"host": "another-node", "pid": 1, "started_at": now - STALE_BUILD_S - 60},
    }
    for name, owner in planted.items():
        storage.write_json(storage.join(dest, name, "owner.json"), owner)
        storage.write_bytes(storage.join(dest, name, "train", "part-0.parquet"), b"in progress")

    lines = []
    preprocess(cfg, force=True, log=lines.append)
    tops = {storage.resolve(f)[1].split(storage.resolve(dest)[1] + "/")[1].split("/")[0] for f in storage.list_files(dest)}
    assert {"build-live", "build-far-young"} <= tops  # runs that may still be writing keep their files
    assert not tops & {"build-dead", "build-far-old", f"build-{next(iter(first_build))}"}
    assert any("removed 3 earlier build(s)" in line for line in lines), lines
    manifest = storage.read_json(storage.join(dest, "manifest.json"))
    (new_build,) = {f.split("/build-")[1].split("/")[0] for fs in manifest["files"].values() for f in fs}
    assert f"build-{new_build}" in tops and new_build not in first_build
    assert len(load_split(dest, "train")) + len(load_split(dest, "val")) == 3 * 12

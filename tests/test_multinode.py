"""A multi-node rehearsal on one machine: the session's Ray head plus a second node joined with
`ray start --address`, with `ray.placement_strategy=STRICT_SPREAD` so each training worker runs on
its own node. A local `output_dir` is refused before any work; with an object store (the suite's S3
server) preprocess, the teacher and a 2-worker student succeed with their workers on both nodes,
the checkpoints land in the bucket, and a worker killed on the second node resumes from the last one.
The second node leaves the cluster when the module ends (the other tests expect one node)."""

import json
import os
import subprocess
import time

import pytest

from tests.conftest import RAY, free_port, wait_for_output

SECOND = "second_node"


def _alive_nodes(ray):
    return [n for n in ray.nodes() if n.get("Alive")]


def _wait_for(condition, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(1.0)


@pytest.fixture(scope="module")
def two_nodes(ray_cluster, ray_local, tmp_path_factory):
    """Joins a 1-CPU node (custom resource ``second_node``) to the session's cluster; yields its node id."""
    ray = ray_local
    log = open(tmp_path_factory.mktemp("node2") / "ray-start.log", "w")
    low = free_port()
    taken = set(range(low, low + 201))  # the workers' range: Ray refuses a component port inside it

    def port() -> int:  # a free port outside the workers' range and distinct from the others
        while (p := free_port()) in taken:
            pass
        taken.add(p)
        return p

    cmd = [RAY, "start", f"--address={ray_cluster['address']}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
           f"--resources={json.dumps({SECOND: 1})}", f"--node-manager-port={port()}", f"--object-manager-port={port()}",
           f"--metrics-export-port={port()}", f"--dashboard-agent-listen-port={port()}",
           f"--dashboard-agent-grpc-port={port()}", f"--runtime-env-agent-port={port()}",
           f"--min-worker-port={low}", f"--max-worker-port={low + 200}", "--disable-usage-stats", "--block"]
    # --block: this process owns the node's raylet and workers, and takes them down when terminated.
    node = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: len(_alive_nodes(ray)) == 2, "the second node to join")
        (second,) = [n["NodeID"] for n in _alive_nodes(ray) if n.get("Resources", {}).get(SECOND)]
        yield second
    finally:
        node.terminate()
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
        _wait_for(lambda: len(_alive_nodes(ray)) == 1, "the second node to leave", timeout=120)
        log.close()


def _overrides(out, tmp):
    return [
        f"output_dir={out}", f"tracking.uri=sqlite:///{tmp}/mlflow.db", "tracking.experiment=multinode",
        f"data.cache_dir={tmp}/cache", "data.synthetic.num_classes=3", "data.synthetic.images_per_class=24",
        "data.synthetic.image_size=40", "data.image_size=36", "data.val_fraction=0.25", "train.crop_size=32",
        "ray.num_workers=2", "ray.cpus_per_worker=0.9", "ray.placement_strategy=STRICT_SPREAD", "train.max_failures=1",
        "teacher.model=resnet10t", "teacher.pretrained=none", "teacher.mode=full", "teacher.epochs=1", "teacher.batch_size=16",
        "distill.student=resnet10t", "distill.type=soft", "distill.epochs=3", "distill.batch_size=16", "distill.drop_path=0.0",
        "distill.teacher_views=2",  # the student replays the label step's views (their store in the bucket too)
    ]


def test_a_local_output_dir_is_refused_before_any_work(two_nodes, tmp_path, capsys):
    from pipeline.cli import main as cli_main

    code = cli_main(["run", *_overrides(tmp_path / "out", tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "the Ray cluster has 2 nodes" in err and "s3://" in err, err
    assert not (tmp_path / "out" / "shards").exists() and not (tmp_path / "mlflow.db").exists()


def test_the_pipeline_spans_both_nodes_on_an_object_store_and_resumes_a_worker_killed_there(two_nodes, object_store, tmp_path,
                                                                                            capfd):
    from mlflow.tracking import MlflowClient

    from pipeline import storage
    from pipeline.config import load_config
    from pipeline.data.preprocess import preprocess
    from pipeline.stages import run_training_stage
    from pipeline.tracking import tracked

    out = object_store("multinode")
    cfg = load_config(None, _overrides(out, tmp_path))
    seen = tmp_path / "nodes"
    seen.mkdir()
    marker = tmp_path / "killed-once"

    def note_node_and_kill_on_second_once(epoch, rank, seen=str(seen), marker=str(marker), second=two_nodes):
        """Runs in the workers: records where each rank runs; kills the one on the second node after epoch 2, once."""
        import os
        import time

        import ray

        node = ray.get_runtime_context().get_node_id()
        with open(os.path.join(seen, f"rank{rank}-epoch{epoch}-{os.getpid()}"), "w") as f:
            f.write(node)
        if epoch == 2 and node == second and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(4)  # lets Ray's controller collect this epoch's report first
            os._exit(1)

    preprocess(cfg, log=lambda *_: None)
    with tracked(cfg, "run") as tracker:
        teacher = run_training_stage(cfg, "teacher", tracker, log=lambda *_: None, show_progress=False)
        student = run_training_stage(cfg, "distill", tracker, log=lambda *_: None, show_progress=False,
                                     after_epoch=note_node_and_kill_on_second_once)
    assert teacher["best_checkpoint"].startswith("s3://") and student["best_checkpoint"].startswith("s3://")
    assert marker.exists(), "the worker on the second node was not killed"
    nodes = {f.read_text() for f in seen.iterdir()}
    assert len(nodes) == 2 and two_nodes in nodes  # the ranks ran on both nodes
    assert len({f.name.rsplit("-", 1)[1] for f in seen.iterdir() if f.name.startswith("rank")}) > 2  # workers restarted
    assert [h["epoch"] for h in student["history"]] == [1, 2, 3]
    # a replaying student resumes like an online one, and still reports its agreement with the teacher
    views_key = MlflowClient(cfg.tracking.uri).get_run(student["mlflow"]["run_id"]).data.tags.get("teacher_views_key")
    assert views_key and any(f.split("?")[0].endswith(f"teacher_views/{views_key}/manifest.json") for f in storage.list_files(out))
    assert all("val_agreement" in h and "val_teacher_top1" in h for h in student["history"])
    assert student["metrics"]["val_agreement"] == student["history"][student["best_epoch"] - 1]["val_agreement"]
    steps = sorted(m.step for m in MlflowClient(cfg.tracking.uri).get_metric_history(student["mlflow"]["run_id"], "train_loss"))
    assert steps == [1, 2, 3]  # the epoch re-run after the restart is logged once
    # Every checkpoint, whichever node wrote it, is in the bucket under the stage's Ray run.
    files = storage.list_files(storage.join(out, "ray_results"))
    checkpoints = {os.path.dirname(storage.resolve(f)[1]) for f in files if f.split("?")[0].endswith("/model.pt")}
    assert len([c for c in checkpoints if "/distill-" in c]) >= 2, sorted(checkpoints)
    assert storage.is_file(storage.join(student["best_checkpoint"], "model.pt"))
    # The restarted workers began from a checkpoint, not from scratch (both nodes' logs reach this driver).
    seen_logs = wait_for_output(capfd, "[distill] resuming after epoch")
    assert "[distill] resuming after epoch" in seen_logs, seen_logs[-2000:]
    assert 1 <= int(seen_logs.split("[distill] resuming after epoch ")[1].split()[0]) <= 2

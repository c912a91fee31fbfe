"""Stream mode (``train.data=stream``): Ray Data feeds the training loop. Each epoch covers distinct
rows across the ranks, the streamed pixels are the stored ones, and a stage trains, and resumes
after a killed worker, as in memory mode."""

import glob
import os
import threading

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.loading import load_split
from pipeline.data.preprocess import preprocess
from pipeline.data.streaming import data_mode, epoch_batches, split_paths, stream_dataset
from tests.conftest import wait_for_output

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def small(ray_local, tmp_path_factory):
    cfg = load_config(None, _small_overrides(tmp_path_factory.mktemp("stream")))
    return cfg, preprocess(cfg, log=lambda *_: None)["shard_dir"]


def _small_overrides(out) -> list[str]:
    return [
        f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", "tracking.experiment=stream",
        "data.synthetic.images_per_class=48", "data.synthetic.image_size=48", "data.image_size=36", "data.val_fraction=0.25",
        "data.rows_per_shard=20", "ray.num_workers=2", "train.crop_size=32", "train.data=stream", "train.max_failures=1",
        "teacher.epochs=3", "teacher.batch_size=32", "teacher.lr=0.02", "teacher.scale_lr=false",
    ]


def test_auto_streams_only_what_does_not_fit_a_worker():
    cfg = load_config(None, ["train.memory_budget_gb=1"])
    manifest = {"split_sizes": {"train": 20_000}, "image_shape": [128, 128, 3]}  # 0.98 GB of pixels
    assert data_mode(cfg.train, manifest, 1) == "memory" and data_mode(cfg.train, manifest, 2) == "memory"
    manifest["split_sizes"]["train"] = 50_000  # 2.5 GB: 1.2 GB per worker at 2, 0.6 GB at 4
    assert data_mode(cfg.train, manifest, 2) == "stream" and data_mode(cfg.train, manifest, 4) == "memory"
    assert data_mode(load_config(None, ["train.data=stream"]).train, manifest, 4) == "stream"


def test_each_epoch_streams_distinct_stored_rows_to_the_ranks(small):
    _, shard_dir = small
    whole = load_split(shard_dir, "train")
    assert split_paths(shard_dir, "train") == whole.paths  # row numbers mean the same in both modes
    world, batch = 2, 8
    shards = stream_dataset(shard_dir, "train").streaming_split(world, equal=True)
    orders = []
    for epoch in range(2):
        seen: list[list[int]] = [[] for _ in range(world)]
        failures: list[BaseException] = []

        def consume(rank, epoch=epoch, seen=seen, failures=failures):
            try:
                check(rank, epoch, seen)
            except BaseException as exc:  # re-raised below: a thread's failure would only be a warning
                failures.append(exc)

        def check(rank, epoch, seen):
            for images, labels, rows in epoch_batches(shards[rank], batch, tuple(whole.images.shape[1:]), whole.images.device,
                                                      seed=epoch * 10 + rank):
                assert len(rows) == batch  # full batches only: every rank takes the same steps
                assert np.array_equal(images.numpy(), whole.images[rows].numpy())  # the stored pixels, uint8
                assert labels.tolist() == whole.labels[rows].tolist()
                seen[rank] += rows.tolist()

        threads = [threading.Thread(target=consume, args=(r,)) for r in range(world)]  # a split is read by all ranks at once
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        if failures:
            raise failures[0]
        rows = seen[0] + seen[1]
        assert len(seen[0]) == len(seen[1]) == (len(whole) // world) // batch * batch
        assert len(set(rows)) == len(rows)  # no row twice in an epoch, on one rank or across ranks
        orders.append(rows)
    assert orders[0] != orders[1]  # reshuffled each epoch


def test_a_streamed_teacher_learns_and_resumes_after_a_killed_worker(small, tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    from pipeline.stages import run_training_stage
    from pipeline.tracking import tracked

    cfg, _ = small
    marker = tmp_path / "killed-once"

    def kill_rank_1_after_epoch_2_once(epoch, rank, marker=str(marker)):
        import os
        import time

        if epoch == 2 and rank == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(4)  # lets Ray's controller collect this epoch's report first
            os._exit(1)

    with tracked(cfg, "teacher") as tracker:
        result = run_training_stage(cfg, "teacher", tracker, log=lambda *_: None, after_epoch=kill_rank_1_after_epoch_2_once)
    assert marker.exists(), "the fault was not injected"
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert result["metrics"]["val_top1"] > 1 / NUM_CLASSES + 0.4, result["history"]  # as the memory-mode teacher in test_training
    steps = sorted(m.step for m in MlflowClient(cfg.tracking.uri).get_metric_history(result["mlflow"]["run_id"], "train_loss"))
    assert steps == [1, 2, 3]  # an epoch run twice is logged once
    seen = wait_for_output(capfd, "[teacher] resuming after epoch")
    assert "[teacher] resuming after epoch" in seen, seen[-2000:]


def test_a_student_replays_teacher_views_in_stream_mode(small):
    """Stream mode with the label step's views: each worker reads the view files its streamed row
    groups need (tests/test_teacher_views.py checks the views themselves). With alpha 1 the student
    learns from the replayed teacher outputs alone, so it learns only if each streamed image gets
    its own views' targets."""
    from pipeline.stages import run_training_stage
    from pipeline.tracking import tracked

    cfg, shard_dir = small
    with tracked(cfg, "teacher") as tracker:  # reused when the test above has trained it
        teacher = run_training_stage(cfg, "teacher", tracker, log=lambda *_: None)
    overrides = ["distill.student=resnet10t", "distill.type=soft", "distill.alpha=1.0", "distill.teacher_views=2", "distill.epochs=4",
                 "distill.batch_size=32", "distill.lr=0.02", "distill.scale_lr=false", "distill.name=streamed-views"]
    student_cfg = load_config(None, [*_small_overrides(cfg.output_dir), *overrides])
    with tracked(student_cfg, "distill") as tracker:
        result = run_training_stage(student_cfg, "distill", tracker, log=lambda *_: None)
    assert result["label_seconds"] is not None and [h["epoch"] for h in result["history"]] == [1, 2, 3, 4]
    assert result["metrics"]["val_top1"] > 1 / NUM_CLASSES + 0.15, (teacher["metrics"], result["history"])
    assert result["metrics"]["val_agreement"] > 1 / NUM_CLASSES + 0.1, (teacher["metrics"], result["history"])
    # the store those workers replayed is one they read file by file
    from pipeline import storage
    from pipeline.train.view_files import ViewsByFile

    (store,) = glob.glob(os.path.join(shard_dir, "teacher_views", "*", "manifest.json"))
    assert ViewsByFile.for_store(os.path.dirname(store), storage.read_json(store), split_paths(shard_dir, "train")) is not None


def test_the_stream_executor_pauses_only_when_nothing_runs(small, monkeypatch):
    """Ray Data's scheduling loop does not wait when no task runs; the stream dataset's callback sleeps
    then (and only then), so the loop stops spinning on the cores the training workers need."""
    from types import SimpleNamespace

    from pipeline.data import idle_tick

    _, shard_dir = small
    assert idle_tick.IdleTick in stream_dataset(shard_dir, "train").context.custom_execution_callback_classes
    slept = []
    monkeypatch.setattr(idle_tick.time, "sleep", slept.append)

    def executor(*active):
        # Ray's executor keeps a dict keyed by operator; iterating a list of operators reads the same
        return SimpleNamespace(_topology=[SimpleNamespace(num_active_tasks=lambda n=n: n) for n in active])

    tick = idle_tick.IdleTick()
    tick.on_execution_step(executor(0, 2))  # a read in flight: the loop already blocks in ray.wait
    assert slept == []
    tick.on_execution_step(executor(0, 0))
    tick.on_execution_step(SimpleNamespace())  # an executor that does not say: treated as idle
    assert slept == [idle_tick.IDLE_TICK_S] * 2


def test_the_label_jobs_executor_pauses_only_after_a_step_that_did_nothing(monkeypatch):
    """The label job's tasks take seconds: a scheduling step that submitted nothing and got nothing
    back is followed by a pause, any other step at once."""
    from types import SimpleNamespace

    from pipeline.data import idle_tick

    slept = []
    monkeypatch.setattr(idle_tick.time, "sleep", slept.append)

    def executor(*done):
        ops = [SimpleNamespace(metrics=SimpleNamespace(num_tasks_submitted=s, num_task_outputs_generated=o)) for s, o in done]
        return SimpleNamespace(_topology=ops)

    tick = idle_tick.QuietTick()
    tick.on_execution_step(executor((1, 0), (0, 0)))  # the first step: nothing to compare with
    tick.on_execution_step(executor((1, 1), (1, 0)))  # an output came back and a task went out
    assert slept == []
    tick.on_execution_step(executor((1, 1), (1, 0)))  # nothing happened since
    assert slept == [idle_tick.QUIET_TICK_S]
    tick.on_execution_step(executor((1, 1), (1, 1)))  # the actor answered: the next step comes at once
    assert slept == [idle_tick.QUIET_TICK_S]
    tick.on_execution_step(SimpleNamespace())  # an executor that does not say: never paused
    tick.on_execution_step(SimpleNamespace())
    assert slept == [idle_tick.QUIET_TICK_S]

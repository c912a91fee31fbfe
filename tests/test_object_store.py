"""The whole pipeline with ``output_dir`` on an object store (a local S3 server): shards, Ray
checkpoints, published models, teacher-logit cache, plots, sweep and report all land in the bucket,
nothing lands on local disk, a second run skips every stage by reading the bucket, and the models
read back from it score what was recorded."""

import os

import pytest
from mlflow.tracking import MlflowClient

from pipeline import storage
from pipeline.checkpoints import load_model
from pipeline.cli import main as cli_main
from pipeline.data.loading import load_split
from pipeline.evaluate import evaluate_model


@pytest.fixture(scope="module")
def bucket_run(ray_local, object_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("object-store")
    out = object_store("pipeline")
    uri = f"sqlite:///{tmp}/mlflow.db"
    overrides = [
        f"output_dir={out}", f"tracking.uri={uri}", "tracking.experiment=objstore", f"data.cache_dir={tmp}/cache",
        "data.synthetic.num_classes=3", "data.synthetic.images_per_class=24", "data.synthetic.image_size=40",
        "data.image_size=36", "data.val_fraction=0.25", "train.crop_size=32", "ray.num_workers=1", "ray.cpus_per_worker=0.9",
        "teacher.model=resnet10t", "teacher.pretrained=none", "teacher.mode=full", "teacher.epochs=2", "teacher.batch_size=16",
        "distill.method=funmatch", "distill.teaching=fixed_teacher", "distill.student=resnet10t", "distill.epochs=2",
        "distill.batch_size=16", "distill.drop_path=0.0",
        "tune.in_run=true", "tune.space={distill.lr: {type: choice, values: [0.01, 0.001]}}", "tune.search=grid",
        "tune.num_samples=1", "tune.scheduler=none",
    ]
    # The base directory (relative paths, a default MLflow store) is also the working directory, so a
    # URI mistaken for a local path (os.path.abspath("s3://...")) would leave a directory here.
    base = tmp / "base"
    base.mkdir()
    os.environ["PIPELINE_BASE_DIR"] = str(base)
    previous_cwd = os.getcwd()
    os.chdir(base)
    try:
        first = cli_main(["run", *overrides])
        objects = storage.list_files(out)
        second = cli_main(["run", *overrides])
        report = cli_main(["report", *overrides, "--latency-runs", "2", "--throughput-runs", "1"])
    finally:
        os.chdir(previous_cwd)
        del os.environ["PIPELINE_BASE_DIR"]
    return {"out": out, "uri": uri, "tmp": tmp, "base": base, "codes": (first, second, report), "objects": objects}


def _names(run, out):
    prefix = storage.resolve(out)[1] + "/"
    return [storage.resolve(o)[1][len(prefix):] for o in run["objects"]]


def test_every_output_lands_in_the_bucket_and_none_on_local_disk(bucket_run):
    assert bucket_run["codes"] == (0, 0, 0)
    names = _names(bucket_run, bucket_run["out"])

    def has(pattern_start, pattern_end=""):
        return any(n.startswith(pattern_start) and n.endswith(pattern_end) for n in names)

    assert has("shards/", "/manifest.json") and has("shards/", ".parquet")
    for stage in ("teacher", "distill/funmatch-fixed_teacher"):
        for f in ("best/model.pt", "best/meta.json", "result.json", "learning_curves.png", "confusion_val.png", "config.yaml"):
            assert f"{stage}/{f}" in names, f"{stage}/{f} missing from the bucket"
        assert f"{stage}/best/train_state.pt" not in names  # the published model carries no optimizer state
    assert has("teacher_cache/", ".pt")  # fixed_teacher logits, computed once on the driver
    assert has("ray_results/teacher-", "/model.pt") and has("ray_results/teacher-", "/train_state.pt")
    assert has("ray_results/distill-", "/mlflow_run_id")
    assert has("sweeps/sweep-distill-", "/result.json") and has("sweeps/sweep-distill-", "/trials.md")
    assert has("sweeps/sweep-distill-", "/model.pt")  # trial checkpoints, written by Ray Tune/Train
    (sweep_result,) = [n for n in names if n.startswith("sweeps/") and n.endswith("/result.json") and n.count("/") == 2]
    sweep = storage.read_json(storage.join(bucket_run["out"], sweep_result))
    assert len(sweep["trials"]) == 2 and not any(t["error"] for t in sweep["trials"])
    # The best trial's checkpoint is found in the bucket and its model registered from there.
    assert sweep["best"]["best_checkpoint"].startswith("s3://") and storage.is_dir(sweep["best"]["best_checkpoint"])
    assert sweep["mlflow"]["registered_model"]
    assert list(bucket_run["base"].iterdir()) == []
    assert not any(n.startswith("report/") for n in names)  # written by the later report call


def test_a_second_run_skips_every_stage_by_reading_the_bucket(bucket_run):
    client = MlflowClient(bucket_run["uri"])
    exp = client.get_experiment_by_name("objstore")
    trained = client.search_runs([exp.experiment_id], "tags.role = 'teacher'")
    assert len(trained) == 1  # the second run created no new teacher run
    parents = client.search_runs([exp.experiment_id], "tags.`pipeline.invocation` = 'run'")
    assert len(parents) == 2
    later = max(parents, key=lambda r: r.info.start_time)
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{later.info.run_id}'")
    assert children == []


def test_models_read_back_from_the_bucket_score_what_was_recorded(bucket_run):
    client = MlflowClient(bucket_run["uri"])
    exp = client.get_experiment_by_name("objstore")
    for role in ("teacher", "funmatch-fixed_teacher"):
        runs = client.search_runs([exp.experiment_id], f"tags.role = '{role}' and attributes.status = 'FINISHED'")
        (run,) = [r for r in runs if "trial_id" not in r.data.tags]  # the stage's run, not a sweep trial's
        best = run.data.tags["best_checkpoint"]
        assert best == storage.join(bucket_run["out"], "teacher" if role == "teacher" else f"distill/{role}", "best")
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == [1, 2]
        model, meta = load_model(best)
        shard_dir = run.data.tags["shard_dir"]
        assert storage.is_uri(shard_dir)
        val = load_split(shard_dir, "val")
        top1 = evaluate_model(model, val.images, val.labels, meta)["top1"]
        assert top1 == pytest.approx(run.data.metrics["final_val_top1"])


def test_the_report_reads_models_from_the_bucket_and_writes_into_it(bucket_run):
    report_dir = storage.join(bucket_run["out"], "report")
    assert storage.is_file(storage.join(report_dir, "report.md"))
    table = storage.read_text(storage.join(report_dir, "report.md"))
    assert "teacher" in table and "funmatch-fixed_teacher" in table
    rows = storage.read_json(storage.join(report_dir, "report.json"))["rows"]
    assert {r["role"] for r in rows} >= {"teacher", "funmatch-fixed_teacher"}
    assert all(r["size_mb"] > 0 for r in rows)

"""The whole pipeline as a Ray job: `ray job submit` against `ray start --head`, outputs where configured,
stages skipped on resubmission and redone with --force."""

import uuid

from mlflow.tracking import MlflowClient

from pipeline.cli import main as cli_main

from tests.jobs import SMALL_DEMO, job_logs, submit


def _runs(uri, experiment, stage=None):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if stage is None or r.data.tags.get("stage") == stage]


def test_pipeline_job_lands_outputs_at_configured_paths_and_skips_finished_stages(ray_cluster, tmp_path):
    dashboard = ray_cluster["dashboard"]
    # Relative paths, resolved against PIPELINE_BASE_DIR: never inside the job's copy of the working directory.
    args = [*SMALL_DEMO, "output_dir=out", "tracking.uri=sqlite:///mlflow.db"]
    env = {"PIPELINE_BASE_DIR": str(tmp_path)}
    first_id = f"e2e-{uuid.uuid4().hex[:8]}"
    first = submit(dashboard, args, submission_id=first_id, env=env,
                   entrypoint_prefix="echo CWD=$PWD; echo LISTING: $(ls -A); ")
    text = first.stdout + first.stderr
    assert first.returncode == 0 and "succeeded" in text, text[-5000:]

    # The upload left out the virtualenv and outputs; the job ran in Ray's temporary copy.
    logs = job_logs(dashboard, first_id).splitlines()
    listing_line = next(line for line in logs if line.startswith("LISTING: "))
    listing = set(listing_line.split()[1:])
    assert {"pipeline", "jobs", "configs"} <= listing and not {".venv", "outputs", ".git"} & listing, listing_line
    cwd = next(line for line in logs if line.startswith("CWD="))
    assert "working_dir_files" in cwd

    out = tmp_path / "out"
    manifests = list(out.glob("shards/*/manifest.json"))
    assert len(manifests) == 1
    for stage_dir in (out / "teacher", out / "distill" / "deit-soft"):
        assert (stage_dir / "best" / "model.pt").is_file() and (stage_dir / "best" / "meta.json").is_file()
    assert list(out.glob("ray_results/teacher-*/checkpoint_*")) and list(out.glob("ray_results/distill-*/checkpoint_*"))

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (parent,) = [r for r in _runs(uri, "job") if r.data.tags.get("pipeline.invocation") == "run"]
    assert parent.info.status == "FINISHED"
    client = MlflowClient(uri)
    for stage in ("teacher", "distill"):
        (run,) = _runs(uri, "job", stage)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
        assert run.data.tags["best_checkpoint"] == str(out / ("teacher" if stage == "teacher" else "distill/deit-soft") / "best")
    assert {m.name for m in client.search_registered_models()} >= {"job-teacher", "job-student"}
    # Artifacts (models, plots) sit beside the store, not in MLflow's default ./mlruns of the job's copy.
    assert list((tmp_path / "mlruns").glob("models/*/artifacts/MLmodel"))
    # The job's last lines say where everything is.
    assert str(out / "teacher" / "best") in text and parent.info.run_id in text

    # Resubmitted unchanged: every stage is skipped, no new stage run.
    again = submit(dashboard, args, submission_id=f"e2e-{uuid.uuid4().hex[:8]}", env=env)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-5000:]
    assert "teacher: up to date" in text and "distill: up to date" in text and "preprocess: reusing" in text
    assert len(_runs(uri, "job", "teacher")) == 1 and len(_runs(uri, "job", "distill")) == 1

    # --force teacher retrains the teacher; the student, whose teacher changed, follows; the shards stay.
    forced = submit(dashboard, [*args, "--force", "teacher"], submission_id=f"e2e-{uuid.uuid4().hex[:8]}", env=env)
    text = forced.stdout + forced.stderr
    assert forced.returncode == 0, text[-5000:]
    assert "preprocess: reusing" in text and "teacher: up to date" not in text and "distill: up to date" not in text
    assert len(_runs(uri, "job", "teacher")) == 2 and len(_runs(uri, "job", "distill")) == 2

    # The comparison report reads the same store: teacher and student, measured side by side.
    assert cli_main(["report", "--config", "configs/demo.yaml", f"output_dir={out}", f"tracking.uri={uri}",
                     "tracking.experiment=job", "--latency-runs", "3", "--throughput-runs", "1"]) == 0
    rows = (out / "report" / "report.csv").read_text().splitlines()
    roles = {row.split(",")[0] for row in rows[1:]}
    assert roles == {"teacher", "deit-soft"}, rows

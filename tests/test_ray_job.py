"""The whole pipeline as a Ray job: `ray job submit` against `ray start --head`, outputs where configured,
stages skipped on resubmission and redone with --force."""

import json
import os
import re
import subprocess
import sys
import urllib.parse
import uuid

import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main as cli_main

from tests.conftest import free_port
from tests.browser import page_text, require_chromium, screenshot
from tests.jobs import SMALL_DEMO, job_logs, submit
from tests.mlflow_servers import stop_server, wait_until_healthy


def _runs(uri, experiment, stage=None):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if stage is None or r.data.tags.get("stage") == stage]


@pytest.fixture(scope="module")
def demo_job(ray_cluster, tmp_path_factory):
    """The demo preset (shrunk) submitted once as a Ray job: its base directory, store and output."""
    tmp_path = tmp_path_factory.mktemp("job")
    # Relative paths, resolved against PIPELINE_BASE_DIR: never inside the job's copy of the working directory.
    args = [*SMALL_DEMO, "output_dir=out", "tracking.uri=sqlite:///mlflow.db"]
    env = {"PIPELINE_BASE_DIR": str(tmp_path)}
    first_id = f"e2e-{uuid.uuid4().hex[:8]}"
    first = submit(ray_cluster["dashboard"], args, submission_id=first_id, env=env,
                   entrypoint_prefix="echo CWD=$PWD; echo LISTING: $(ls -A); ")
    return {"base": tmp_path, "args": args, "env": env, "id": first_id, "text": first.stdout + first.stderr,
            "returncode": first.returncode, "uri": f"sqlite:///{tmp_path}/mlflow.db"}


def test_pipeline_job_lands_outputs_at_configured_paths_and_skips_finished_stages(ray_cluster, demo_job):
    dashboard = ray_cluster["dashboard"]
    tmp_path, args, env, first_id, text = demo_job["base"], demo_job["args"], demo_job["env"], demo_job["id"], demo_job["text"]
    assert demo_job["returncode"] == 0 and "succeeded" in text, text[-5000:]

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
    for stage_dir in (out / "teacher", out / "distill" / "deit-soft", out / "distill" / "baseline"):
        assert (stage_dir / "best" / "model.pt").is_file() and (stage_dir / "best" / "meta.json").is_file()
    assert list(out.glob("ray_results/teacher-*/checkpoint_*")) and list(out.glob("ray_results/distill-*/checkpoint_*"))

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (parent,) = [r for r in _runs(uri, "job") if r.data.tags.get("pipeline.invocation") == "run"]
    assert parent.info.status == "FINISHED"
    client = MlflowClient(uri)
    # The demo trains the teacher, the distilled student and the same student alone: the three-way comparison.
    runs = {r.data.tags["role"]: r for r in _runs(uri, "job") if "role" in r.data.tags}
    assert set(runs) == {"teacher", "deit-soft", "baseline"}
    for role, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == [1, 2]
        assert run.data.tags["best_checkpoint"] == str(out / ("teacher" if role == "teacher" else f"distill/{role}") / "best")
    assert {m.name for m in client.search_registered_models()} >= {"job-teacher", "job-student"}
    # Each role's latest registered version is reachable by its alias, tagged and described.
    for name, role in (("job-teacher", "teacher"), ("job-student", "deit-soft"), ("job-student", "baseline")):
        version = client.get_model_version_by_alias(name, role)
        assert version.run_id == runs[role].info.run_id and version.tags["role"] == role
        assert float(version.tags["val_top1"]) == pytest.approx(runs[role].data.metrics["final_val_top1"], abs=1e-4)
        assert "val top-1" in version.description
    # Artifacts (models, plots) sit beside the store, not in MLflow's default ./mlruns of the job's copy.
    assert list((tmp_path / "mlruns").glob("models/*/artifacts/MLmodel"))
    # The job's last lines say where everything is.
    assert str(out / "teacher" / "best") in text and parent.info.run_id in text
    # What the job printed (its driver's output, not a terminal): a quiet console. One line per
    # stage start and end and per epoch, the summary with each model's accuracy, the commands to
    # look further; none of Ray's per-report dicts, worker or controller lines, nothing twice.
    printed = [line for line in logs if not line.startswith(("CWD=", "LISTING: "))]
    assert len(printed) <= 40, "\n".join(printed)
    assert not [line for line in printed if "TrainingReport(" in line or "pid=" in line or "core_worker" in line], printed
    assert len(set(printed)) == len(printed), [line for line in printed if printed.count(line) > 1]
    header = next(i for i, line in enumerate(printed) if line.startswith("stage ") and "val top-1" in line)
    table = {line.split()[0]: line for line in printed[header + 1 : header + 5]}
    assert set(table) == {"preprocess", "teacher", "deit-soft", "baseline"}, printed[header:]
    assert f"{runs['deit-soft'].data.metrics['final_val_top1']:.3f}" in table["deit-soft"]
    assert any("mlflow ui --backend-store-uri" in line and "/#/experiments/" in line for line in printed)
    assert any(line.startswith("compare the models: ") and " -m pipeline report " in line for line in printed)
    epoch_lines = [line for line in printed if ": epoch " in line]
    assert len(epoch_lines) == 6 and all("val_top1" in line for line in epoch_lines)  # 2 epochs x 3 models

    # Resubmitted unchanged: every stage is skipped, no new stage run.
    again = submit(dashboard, args, submission_id=f"e2e-{uuid.uuid4().hex[:8]}", env=env)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-5000:]
    assert "teacher: up to date" in text and "deit-soft: up to date" in text and "baseline: up to date" in text
    assert "preprocess: reusing" in text
    assert len(_runs(uri, "job", "teacher")) == 1 and len(_runs(uri, "job", "distill")) == 2

    # --force teacher retrains the teacher; the student, whose teacher changed, follows; the baseline,
    # which has no teacher, and the shards stay.
    forced = submit(dashboard, [*args, "--force", "teacher"], submission_id=f"e2e-{uuid.uuid4().hex[:8]}", env=env)
    text = forced.stdout + forced.stderr
    assert forced.returncode == 0, text[-5000:]
    assert "preprocess: reusing" in text and "teacher: up to date" not in text and "deit-soft: up to date" not in text
    assert "baseline: up to date" in text
    assert len(_runs(uri, "job", "teacher")) == 2 and len(_runs(uri, "job", "distill")) == 3

    # The comparison report reads the same store: teacher and student, measured side by side.
    assert cli_main(["report", "--config", "configs/demo.yaml", f"output_dir={out}", f"tracking.uri={uri}",
                     "tracking.experiment=job", "--latency-runs", "3", "--throughput-runs", "1"]) == 0
    rows = (out / "report" / "report.csv").read_text().splitlines()
    roles = {row.split(",")[0] for row in rows[1:]}
    assert roles == {"teacher", "deit-soft", "baseline"}, rows


def test_the_mlflow_ui_opens_on_the_training_runs_and_compares_them(demo_job, tmp_path):
    """A real `mlflow ui` on the store the demo made, read by a headless Chromium: the link the
    pipeline prints opens the experiment's training runs (not MLflow 3's GenAI overview), and the
    compare view of teacher, student and baseline shows their names, roles and key numbers."""
    require_chromium()
    assert demo_job["returncode"] == 0, demo_job["text"][-3000:]
    uri = demo_job["uri"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("job")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    latest = {}
    for run in client.search_runs([exp.experiment_id], filter_string="tags.role LIKE '%'", order_by=["attributes.start_time ASC"]):
        latest[run.data.tags["role"]] = run
    assert set(latest) == {"teacher", "deit-soft", "baseline"}
    # The README's filters, against the real store.
    students = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'distill'")
    assert {r.data.tags["role"] for r in students} == {"deit-soft", "baseline"}
    trained = client.search_runs([exp.experiment_id], filter_string="tags.role LIKE '%'")
    assert {r.data.tags["role"] for r in trained} == {"teacher", "deit-soft", "baseline"}
    assert all(r.data.tags.get("pipeline.invocation") is None for r in trained)  # no parent runs among them

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True, cwd=demo_job["base"])
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(base, 180, server)
        # The page the run's summary names (summary.mlflow_ui_hint).
        runs_page = page_text(f"{base}/#/experiments/{exp.experiment_id}?workflowType=machine_learning", ["matching runs"])
        assert f"Runs - Experiment {exp.experiment_id}" in runs_page and "Token Usage" not in runs_page
        ids = [latest[r].info.run_id for r in ("teacher", "deit-soft", "baseline")]
        compare = (f"{base}/#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}"
                   f"&experiments={urllib.parse.quote(json.dumps([exp.experiment_id]))}")
        names = [latest[r].info.run_name for r in ("teacher", "deit-soft", "baseline")]
        text = page_text(compare, [*names, "final_val_top1"])
        assert names[0].startswith("teacher ") and names[2].startswith("baseline ")
        for key in ("final_val_top1", "val_top1", "distill.type", "distill.alpha", "teacher.model", "role"):
            assert key in text, key
        roles = re.search(r" role (\S+) (\S+) (\S+) ", text)  # the role tags, one per compared run
        assert roles and set(roles.groups()) == {"teacher", "deit-soft", "baseline"}, text[-3000:]
        shot = os.environ.get("MLFLOW_UI_SCREENSHOT")  # set it to refresh the README's picture
        screenshot(compare, shot or str(tmp_path / "compare.png"))
    finally:
        stop_server(server)

"""A `ray job submit` run stopped mid-stage (`ray job stop`) continues from its last checkpoint when resubmitted."""

import subprocess
import uuid

from mlflow.tracking import MlflowClient

from tests.conftest import RAY
from tests.jobs import SMALL_DEMO, job_logs, job_status, submit, wait_for

TEACHER_EPOCHS = 8


def test_resubmitted_job_resumes_the_stopped_stage_from_its_last_checkpoint(ray_cluster, tmp_path):
    dashboard = ray_cluster["dashboard"]
    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*SMALL_DEMO, "distill.baseline=false", f"output_dir={out}", f"tracking.uri={uri}", f"teacher.epochs={TEACHER_EPOCHS}",
            "teacher.mode=full", "tracking.experiment=stopped"]
    first_id = f"stop-{uuid.uuid4().hex[:8]}"
    started = submit(dashboard, args, submission_id=first_id, wait=False)
    assert started.returncode == 0, started.stderr[-3000:]

    wait_for(lambda: list(out.glob("ray_results/teacher-*/checkpoint_*")), 600, "the teacher's first checkpoint", every=0.5)
    stop = subprocess.run([RAY, "job", "stop", "--address", dashboard, first_id], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    wait_for(lambda: job_status(dashboard, first_id) == "STOPPED", 120, "the job to stop")
    done_before = len(list(out.glob("ray_results/teacher-*/checkpoint_*")))
    assert not (out / "teacher" / "result.json").exists(), "the job was stopped too late to test a mid-stage stop"

    second_id = f"stop-{uuid.uuid4().hex[:8]}"
    resumed = submit(dashboard, args, submission_id=second_id)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-5000:]
    logs = job_logs(dashboard, second_id)
    # The driver's progress display says where it picked up (the workers' own lines stay in Ray's logs).
    marker = "teacher tf_efficientnet_lite0: resuming after epoch "
    assert marker in logs, logs[-4000:]
    resumed_after = int(logs.split(marker)[1].split()[0])
    assert 1 <= resumed_after <= max(done_before, 1) + 1 and resumed_after < TEACHER_EPOCHS

    # One teacher run in MLflow, reused by the second job, with every epoch exactly once.
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("stopped")
    (teacher,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "teacher"]
    assert teacher.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(teacher.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, TEACHER_EPOCHS + 1)), steps
    assert (out / "distill" / "deit-soft" / "best" / "model.pt").is_file()
    # The stopped job closed its own parent run as KILLED (SIGTERM from `ray job stop` is handled).
    parents = sorted(r.info.status for r in client.search_runs([exp.experiment_id])
                     if r.data.tags.get("pipeline.invocation") == "run")
    assert parents == ["FINISHED", "KILLED"], parents

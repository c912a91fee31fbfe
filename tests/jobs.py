"""Helpers for tests that drive the pipeline through `ray job submit` against the session's `ray start --head`."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.conftest import RAY

REPO = Path(__file__).resolve().parents[1]

# The demo preset, shrunk to a couple of minutes on 2 CPUs.
SMALL_DEMO = [
    "--config", "configs/demo.yaml",
    "data.synthetic.images_per_class=40", "data.synthetic.image_size=48", "data.image_size=40", "train.crop_size=32",
    "teacher.epochs=2", "teacher.batch_size=32", "distill.epochs=2", "distill.batch_size=32", "tracking.experiment=job",
]


def submit(dashboard: str, args: list[str], submission_id: str | None = None, wait: bool = True,
           env: dict[str, str] | None = None, entrypoint_prefix: str = "", timeout: float = 900) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- python jobs/pipeline.py ARGS` (blocking unless ``wait`` is False)."""
    cmd = [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(REPO)]
    if submission_id:
        cmd += ["--submission-id", submission_id]
    if env:
        cmd += ["--runtime-env-json", json.dumps({"env_vars": env})]
    if not wait:
        cmd.append("--no-wait")
    entry = f"{entrypoint_prefix}python jobs/pipeline.py " + " ".join(args)
    return subprocess.run([*cmd, "--", "bash", "-c", entry] if entrypoint_prefix else [*cmd, "--", *entry.split()],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def job_status(dashboard: str, submission_id: str) -> str:
    """SUCCEEDED, FAILED, STOPPED, RUNNING or PENDING, as `ray job status` prints it."""
    out = subprocess.run([RAY, "job", "status", "--address", dashboard, submission_id], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    for phrase, status in (("succeeded", "SUCCEEDED"), ("was stopped", "STOPPED"), ("failed", "FAILED")):
        if f"Job '{submission_id}' {phrase}" in text:
            return status
    for status in ("RUNNING", "PENDING", "STOPPED", "FAILED", "SUCCEEDED"):
        if f"Status for job '{submission_id}': {status}" in text:
            return status
    return text


def job_logs(dashboard: str, submission_id: str) -> str:
    return subprocess.run([RAY, "job", "logs", "--address", dashboard, submission_id], capture_output=True, text=True,
                          timeout=60).stdout


def wait_for(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

"""Access: the Ray clusters the project starts keep Ray's token authentication on; the MLflow server
it starts listens on loopback (``tests/test_mlflow_server.py::test_the_server_the_project_starts_listens_on_loopback_only``)."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Start Ray the way `python -m pipeline ...` does when no cluster is given, with the user's default
# environment (no RAY_AUTH_MODE), then knock on the dashboard's job API without a token.
PROBE = """
import json, urllib.error, urllib.request
import ray
from pipeline.cluster import init_ray
from pipeline.config import RayConfig
init_ray(RayConfig())
url = ray._private.worker.global_worker.node.address_info["webui_url"]
try:
    code = urllib.request.urlopen(f"http://{url}/api/jobs/", timeout=20).status
except urllib.error.HTTPError as exc:
    code = exc.code
print("PROBE", json.dumps({"status": code}))
ray.shutdown()
"""


def _get(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        return urllib.request.urlopen(req, timeout=20).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_local_ray_started_by_the_pipeline_requires_a_token():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["RAY_ADDRESS"] = "local"  # a new local instance, as on a machine with no cluster running
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    line = next((l for l in out.stdout.splitlines() if l.startswith("PROBE ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-3000:]
    assert json.loads(line[6:])["status"] == 401


def test_cluster_started_with_ray_start_refuses_requests_without_the_token(ray_cluster):
    token_file = Path.home() / ".ray" / "auth_token"
    if not token_file.is_file():
        pytest.fail("ray start created no ~/.ray/auth_token: token authentication is off")
    jobs_api = f"{ray_cluster['dashboard']}/api/jobs/"
    assert _get(jobs_api) == 401
    assert _get(jobs_api, "not-the-token") == 403  # a wrong token: forbidden
    assert _get(jobs_api, token_file.read_text().strip()) == 200

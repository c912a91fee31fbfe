"""Shared fixtures: one local Ray instance per test session, small generated datasets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# `ray start` turns Ray's token authentication on; clients (this process as a driver, `ray job`)
# must say so to send the token from ~/.ray/auth_token.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Dummy AWS credentials for the local S3 server (`object_store`): set before `ray start` so that Ray's
# workers inherit them, and so that nothing in the tests can ever reach a real AWS account.
os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})


RAY = str(Path(sys.executable).with_name("ray"))
# As an activated virtualenv would: `ray start` and the jobs it runs find this environment's python.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU Ray head started with `ray start --head` on free loopback ports, shared by the whole session.

    One cluster for everything: tests connect to it with ``ray.init(address=...)`` and submit jobs to
    its dashboard. (Two Ray instances on one machine break Ray Train V2's placement-group cleanup,
    which looks the cluster up by address.) `ray stop` runs at the end, also after failures; it stops
    every Ray process of this user on this machine, so do not run the tests beside your own cluster.
    """
    gcs, dashboard = free_port(), free_port()
    cmd = [RAY, "start", "--head", "--num-cpus=2", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--metrics-export-port={free_port()}", "--disable-usage-stats"]
    # `ray start` refuses to run without a token; `ray.init()` would make one, so on a fresh machine the
    # outcome depended on which test ran first. Make it (only if missing) before starting.
    subprocess.run([RAY, "get-auth-token", "--generate"], capture_output=True, timeout=60)
    try:
        started = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            pytest.fail(f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard}"}
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def ray_local(ray_cluster):
    """This test process connected to the session's cluster as a driver."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"], logging_level="WARNING")
    yield ray


@pytest.fixture(scope="session")
def object_store():
    """An S3-compatible server (moto) on a free loopback port, with a bucket; yields a function that
    gives a fresh ``s3://`` prefix carrying the endpoint in its query, as a MinIO user would write it."""
    import itertools
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http"
    try:
        fs, _ = pafs.FileSystem.from_uri(f"s3://pipeline-tests?{query}&allow_bucket_creation=true")
        fs.create_dir("pipeline-tests")
        counter = itertools.count()
        yield lambda name="run": f"s3://pipeline-tests/{name}-{next(counter)}?{query}"
    finally:
        server.stop()


def write_image(path: Path, seed: int, size=(40, 30), mode: str = "RGB", fmt: str | None = None) -> Path:
    """A random image of ``size`` (w, h) in ``mode``."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def folder_tree(tmp_path) -> Path:
    """A class-per-folder tree: 3 classes x 10 JPEG/PNG images of assorted sizes, plus a README."""
    root = tmp_path / "tree"
    for c, name in enumerate(["astilbe", "bellflower", "crocus"]):
        for i in range(10):
            ext = "jpg" if i % 2 else "png"
            write_image(root / name / f"img_{i:02d}.{ext}", seed=100 * c + i, size=(30 + 3 * i, 24 + 2 * c))
    (root / "README.txt").write_text("not an image")
    (root / "crocus" / "notes.md").write_text("not an image either")
    return root


def wait_for_output(capfd, text: str, tries: int = 30) -> str:
    """What the workers printed (Ray forwards their lines to this process a little later), read
    until ``text`` shows up or ``tries`` half-seconds pass; the caller asserts on it."""
    import time

    seen = ""
    for _ in range(tries):
        seen += "".join(capfd.readouterr())
        if text in seen:
            break
        time.sleep(0.5)
    return seen

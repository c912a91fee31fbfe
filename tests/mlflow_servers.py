"""Start and stop a real MLflow server for the tests that need one (``mlflow-server`` runs it in
the foreground for users; the suite needs it in the background and ready)."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request

from pipeline.servers import LOOPBACK, mlflow_server_command, server_url


def wait_until_healthy(url: str, timeout: float = 180.0, process: subprocess.Popen | None = None) -> None:
    """Poll ``<url>/health`` until it answers; raise (with the reason) if it never does or the server exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the MLflow server exited with code {process.returncode} before answering at {url}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=3) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no MLflow server answered at {url} within {timeout:.0f} s")


def start_mlflow_server(store_dir: str, host: str = LOOPBACK, port: int = 5000, log_path: str | None = None,
                        timeout: float = 180.0) -> subprocess.Popen:
    """Start the server in the background (its own process group) and wait until it answers."""
    os.makedirs(os.path.abspath(os.path.expanduser(store_dir)), exist_ok=True)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(mlflow_server_command(store_dir, host, port), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        if log is not subprocess.DEVNULL:
            log.close()  # the server holds its own descriptor
    try:
        wait_until_healthy(server_url(host, port), timeout, proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stop the server and the workers it forked (the whole process group)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

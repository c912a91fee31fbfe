"""An MLflow tracking server for the pipeline's runs, bound to loopback unless told otherwise.

An MLflow server has no authentication by default: whoever reaches its port can read and delete
every run and model. So it listens on 127.0.0.1; to share it, put it behind an SSH tunnel or a
reverse proxy with authentication rather than binding 0.0.0.0.
"""

from __future__ import annotations

import os
import sys

LOOPBACK = "127.0.0.1"


def server_url(host: str, port: int) -> str:
    """The URL clients use for a server bound to ``host`` (loopback for a wildcard bind; IPv6 bracketed)."""
    if host in ("0.0.0.0", "::", ""):
        host = LOOPBACK
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def mlflow_server_command(store_dir: str, host: str = LOOPBACK, port: int = 5000, workers: int = 1) -> list[str]:
    """``mlflow server`` with a SQLite store and served artifacts under ``store_dir``."""
    store = os.path.abspath(os.path.expanduser(store_dir))
    return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", str(workers),
            "--backend-store-uri", f"sqlite:///{os.path.join(store, 'mlflow.db')}",
            "--serve-artifacts", "--artifacts-destination", os.path.join(store, "artifacts")]

"""Talking to an MLflow server through its REST API only (what any other tool would see)."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request


def rest(url: str, path: str, body: dict | None = None, **query) -> dict:
    full = f"{url}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"}, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


def runs(url: str, experiment: str) -> list[dict]:
    exp = rest(url, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    return rest(url, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000}).get("runs", [])


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def metric_steps(url: str, run_id: str, key: str) -> list[int]:
    return [m["step"] for m in rest(url, "metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])]

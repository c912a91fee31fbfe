"""What a command says when it ends: each stage's model, val top-1, agreement and time, and the exact
commands that open the runs in MLflow and compare the models."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

MLFLOW_UI_PORT = 5000


def _venv_tool(name: str) -> str:
    """``name`` beside this interpreter (``.venv/bin/mlflow``), relative to the current directory when inside it."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        return name
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def mlflow_ui_hint(tracking_uri: str | None, experiment_id: str | None) -> str:
    """How to see the runs: the command that serves a local store and the page to open."""
    # workflowType: MLflow 3 would open the experiment on its GenAI overview, not on its training runs.
    page = f"/#/experiments/{experiment_id}?workflowType=machine_learning" if experiment_id else ""
    if not tracking_uri or not experiment_id:
        return "no MLflow store was reachable (see the warnings above)"
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri.rstrip('/')}{page}"
    ui = f"{_venv_tool('mlflow')} ui --backend-store-uri {shlex.quote(tracking_uri)} --port {MLFLOW_UI_PORT}"
    return f"{ui}, then open http://127.0.0.1:{MLFLOW_UI_PORT}{page}"


def report_hint(args) -> str:
    """The ``report`` command for the same config and overrides as this invocation."""
    argv = [_venv_tool("python"), "-m", "pipeline", "report"]
    if getattr(args, "config", None):
        argv += ["--config", args.config]
    argv += list(getattr(args, "overrides", None) or [])
    return "compare the models: " + shlex.join(argv)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def training_row(result: dict[str, Any]) -> tuple[str, ...]:
    """(stage, model, val top-1, agreement, time, where) for a training stage's result."""
    scores = result.get("metrics", {})
    seconds = result.get("seconds")
    status = "reused" if result.get("skipped") else (f"{seconds:.0f} s" if seconds is not None else "-")
    if not result.get("skipped") and seconds is not None and result.get("label_seconds") is not None:
        # a distilled student's time includes the label step, which later students reuse: say how much
        status += f" ({result['label_seconds']:.0f} s label)"
    return (result.get("role", result["stage"]), result.get("arch", "-"), _fmt(scores.get("val_top1")), _fmt(scores.get("val_agreement")),
            status, result["best_checkpoint"])


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def print_run_summary(results: dict[str, Any], args) -> None:
    """The last lines of ``run``: one row per stage, then how to look at the runs and compare the models."""
    rows = [("stage", "model", "val top-1", "agreement", "time", "output")]
    pre = results["preprocess"]
    images = sum(pre["split_sizes"].values())
    rows.append(("preprocess", f"{images} images, {len(pre['class_names'])} classes", "-", "-",
                 "reused" if pre.get("reused") else f"{pre.get('seconds', 0):.0f} s", pre["shard_dir"]))
    for key in ("teacher", "distill", "baseline"):
        if key in results:
            rows.append(training_row(results[key]))
    if "sweep" in results:
        r = results["sweep"]
        rows.append(("sweep", f"{len(r.get('trials', []))} trials", "-", "-", "reused" if r.get("skipped") else "done", r["sweep_dir"]))
    print(table(rows))
    m = results["mlflow"]
    print(f"MLflow: experiment {m['experiment']!r}, parent run {m.get('parent_run_id') or '-'}")
    print(f"        {mlflow_ui_hint(m.get('tracking_uri'), m.get('experiment_id'))}")
    print(report_hint(args))

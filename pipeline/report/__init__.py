"""The comparison report: every trained model of an experiment side by side.

For the latest FINISHED stage run of each role (teacher, baseline, deit-soft, deit-hard,
funmatch-<teaching>) in an MLflow experiment, the report loads the published model and measures,
on CPU and on the real validation images of the run's shards:

* val top-1, recomputed here (and the value the run recorded),
* parameters, size on disk of ``model.pt``,
* latency per image at batch 1 (median of timed runs after warm-up) and images/s at batch 64,
  with a fixed number of torch threads that the report records,
* agreement with the teacher: how often the student's argmax equals the teacher's.

It writes ``<output_dir>/report/`` (report.md, report.csv, report.json, two PNG plots) and, unless
told not to, logs the same to a ``report`` run in the experiment. The files are written before any
MLflow call, so an unreachable server loses nothing but the run.

Which run represents a role: the FINISHED stage run with that ``role`` tag that ended last. Sweep
trials (runs tagged ``sweep`` / ``trial_id``) are skipped, since a trial is an experiment with one
setting, not the model the pipeline published; a role that exists *only* as sweep trials is
represented by the trial tagged ``best_trial`` (else the latest trial), flagged in the notes.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from typing import Any, Callable

import torch

from pipeline import storage
from pipeline.report.measure import (DEFAULT_LATENCY_RUNS, DEFAULT_THREADS, DEFAULT_THROUGHPUT_RUNS, THROUGHPUT_BATCH, WARMUP_RUNS,
                                     _Splits, load_run_model, measure_run, measure_speed, torch_threads)
from pipeline.report.render import COLUMNS, MISSING_MD, cell, markdown_table, write_csv, write_json, write_markdown
from pipeline.report.runs import (ROLE_ORDER, STAGES, ReportError, _finished_runs, _what_to_run_first, find_experiment_id,
                                  is_sweep_trial, role_sort_key, select_runs)

__all__ = [
    "REPORT_SUBDIR", "METRIC_KEYS", "report_metrics", "log_report_run", "build_report", "add_arguments", "run_with_config",
    "print_summary",
    # re-exported from the submodules
    "STAGES", "ROLE_ORDER", "ReportError", "find_experiment_id", "is_sweep_trial", "select_runs", "role_sort_key",
    "THROUGHPUT_BATCH", "WARMUP_RUNS", "DEFAULT_THREADS", "DEFAULT_LATENCY_RUNS", "DEFAULT_THROUGHPUT_RUNS",
    "torch_threads", "load_run_model", "measure_speed", "measure_run",
    "COLUMNS", "MISSING_MD", "cell", "markdown_table", "write_markdown", "write_csv", "write_json",
]

REPORT_SUBDIR = "report"

# Per-role values logged as metrics of the report run: <role>_<key>.
METRIC_KEYS = ("val_top1", "val_top1_recorded", "params", "size_mb", "latency_ms", "images_per_s", "val_agreement")


# ---------------------------------------------------------------- MLflow


def report_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``<role>_<key>`` for every measured value (roles contain only letters, digits, - and _)."""
    out = {}
    for r in rows:
        for key in METRIC_KEYS:
            if r.get(key) is not None:
                out[f"{r['role']}_{key}"] = float(r[key])
    return out


def log_report_run(uri: str, experiment_id: str, rows: list[dict[str, Any]], settings: dict[str, Any],
                   files: list[str], rewrite_json: Callable[[str], None]) -> str | None:
    """A ``report`` run with per-role metrics and the files as artifacts; None when MLflow fails."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import attempt, git_commit

    client = MlflowClient(uri)
    ok, run_id = attempt(lambda: client.create_run(experiment_id, run_name="report", tags={
        "pipeline.invocation": "report", "git_commit": git_commit()}).info.run_id, "create the report run", False)
    if not ok:
        return None
    rewrite_json(run_id)  # the JSON on disk and the artifact name the run they belong to
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in report_metrics(rows).items()]
    params = [Param(k, str(v)) for k, v in settings.items()] + [Param(f"{r['role']}_run_id", r["run_id"]) for r in rows]
    sent, _ = attempt(lambda: client.log_batch(run_id, metrics=metrics, params=params), "log the report metrics", False)
    for path in files:
        sent &= attempt(lambda: client.log_artifact(run_id, path), f"log {os.path.basename(path)}", False)[0]
    attempt(lambda: client.set_terminated(run_id, "FINISHED" if sent else "FAILED"), "end the report run", False)
    return run_id


# ---------------------------------------------------------------- the report


def build_report(tracking_uri: str, experiment: str, output_dir: str, log_to_mlflow: bool = True,
                 latency_runs: int = DEFAULT_LATENCY_RUNS, threads: int | None = None,
                 throughput_runs: int = DEFAULT_THROUGHPUT_RUNS, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the latest finished model of every role in ``experiment``; write and log the report.

    Returns rows, skipped runs, file paths and the MLflow report run id (None when not logged)."""
    from mlflow.tracking import MlflowClient

    from pipeline import plots

    threads = DEFAULT_THREADS if threads is None else threads
    if min(latency_runs, throughput_runs, threads) < 1:
        raise ValueError(f"latency_runs, throughput_runs and threads must be >= 1 (got {latency_runs}, {throughput_runs}, {threads})")
    client = MlflowClient(tracking_uri)
    experiment_id = find_experiment_id(client, experiment, tracking_uri)
    finished = _finished_runs(client, experiment_id)
    chosen = select_runs(finished)
    if not chosen:
        untagged = sum(1 for r in finished if r.data.tags.get("stage") in STAGES)
        older = (f" ({untagged} finished stage run(s) predate the role/best_checkpoint/shard_dir tags the report needs)"
                 if untagged else "")
        raise ReportError(f"experiment {experiment!r} at {tracking_uri} holds no FINISHED teacher/distill run with a role tag"
                          f"{older}; {_what_to_run_first(experiment, tracking_uri)}")

    rows, skipped, splits, teacher, per_image = [], [], _Splits(), None, {}
    # Other processes' load is what makes latencies noisy: recorded so a reader can judge them.
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with torch_threads(threads):
        for role, run in chosen.items():  # teacher first: the others are compared with it
            log(f"report: measuring {role} (run {run.info.run_id})")
            try:
                row, preds = measure_run(run, role, tracking_uri, splits, teacher, latency_runs, throughput_runs)
            except Exception as exc:  # one unloadable model should not hide the others
                reason = f"{type(exc).__name__}: {str(exc)[:300]}"
                warnings.warn(f"report: {role} (run {run.info.run_id}) left out: {reason}", stacklevel=2)
                skipped.append({"role": role, "run_id": run.info.run_id, "reason": reason})
                continue
            if role == "teacher":
                teacher = preds
            rows.append(row)
            per_image[role] = preds
    if not rows:
        raise ReportError("no model of experiment {!r} could be measured: {}".format(
            experiment, "; ".join(f"{s['role']}: {s['reason']}" for s in skipped)))

    settings = {"experiment": experiment, "tracking_uri": tracking_uri, "threads": threads, "latency_runs": latency_runs,
                "throughput_runs": throughput_runs, "throughput_batch": THROUGHPUT_BATCH, "torch": torch.__version__,
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
                "load_average_1m": round(load_at_start, 2) if load_at_start is not None else None}
    report_dir = storage.join(storage.abspath(output_dir), REPORT_SUBDIR)
    names = {"markdown": "report.md", "csv": "report.csv", "json": "report.json",
             "plots": ["accuracy_vs_latency.png", "accuracy_agreement.png"]}
    report = {"settings": settings, "rows": rows, "skipped": skipped, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "mlflow_report_run_id": None}
    run_id = None
    # Written locally first (uploaded at the end when output_dir is an object store).
    with storage.staged_dir(report_dir) as local:
        at = {k: [os.path.join(local, n) for n in v] if isinstance(v, list) else os.path.join(local, v) for k, v in names.items()}
        write_markdown(at["markdown"], rows, settings, skipped)
        write_csv(at["csv"], rows)
        write_json(at["json"], report)
        plots.plot_accuracy_vs_latency(rows, at["plots"][0])
        plots.plot_accuracy_agreement(rows, at["plots"][1])
        if log_to_mlflow:
            def rewrite_json(rid: str) -> None:
                report["mlflow_report_run_id"] = rid
                write_json(at["json"], report)

            files = [at["markdown"], at["csv"], at["json"], *at["plots"]]
            run_id = log_report_run(tracking_uri, experiment_id, rows, settings, files, rewrite_json)
    paths = {k: [storage.join(report_dir, n) for n in v] if isinstance(v, list) else storage.join(report_dir, v) for k, v in names.items()}
    # per_image stays in memory (not in report.json): each role's val paths, predictions and hits.
    return {"stage": "report", "rows": rows, "skipped": skipped, "settings": settings, "report_dir": report_dir,
            "files": paths, "mlflow": {"tracking_uri": tracking_uri, "experiment": experiment, "run_id": run_id},
            "per_image": per_image}


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser, with_config: bool = True) -> argparse.ArgumentParser:
    """The report's options; ``with_config=False`` when the caller already adds --config and overrides."""
    if with_config:
        from pipeline.config import CONFIG_HELP

        parser.add_argument("--config", "-c", help=CONFIG_HELP)
    parser.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment of the config)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: tracking.uri, MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--output-dir", help="the report goes to OUTPUT_DIR/report/ (default: output_dir of the config)")
    parser.add_argument("--latency-runs", type=int, default=DEFAULT_LATENCY_RUNS, help="timed single-image runs per model (median)")
    parser.add_argument("--throughput-runs", type=int, default=DEFAULT_THROUGHPUT_RUNS,
                        help=f"timed batches of {THROUGHPUT_BATCH} per model (median)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch CPU threads while measuring (default {DEFAULT_THREADS}: comparable across machines)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the files only; no report run in MLflow")
    if with_config:
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def run_with_config(cfg, args: argparse.Namespace) -> dict[str, Any]:
    """The report for a loaded config, command-line values winning; prints the table and the paths."""
    from pipeline.config import _absolute, absolute_tracking_uri
    from pipeline.tracking import tracking_uri

    # Command-line paths resolve like config paths (against PIPELINE_BASE_DIR inside a Ray job).
    result = build_report(
        tracking_uri=absolute_tracking_uri(getattr(args, "tracking_uri", None)) or tracking_uri(cfg),
        experiment=getattr(args, "experiment", None) or cfg.tracking.experiment,
        output_dir=_absolute(getattr(args, "output_dir", None)) or cfg.output_dir,
        log_to_mlflow=not getattr(args, "no_mlflow", False),
        latency_runs=getattr(args, "latency_runs", DEFAULT_LATENCY_RUNS),
        throughput_runs=getattr(args, "throughput_runs", DEFAULT_THROUGHPUT_RUNS),
        threads=getattr(args, "threads", None),
    )
    print_summary(result)
    return result


def print_summary(result: dict[str, Any]) -> None:
    """Print the table, any left-out runs, where the files are and the MLflow report run."""
    print(markdown_table(result["rows"]), end="")
    for s in result["skipped"]:
        print(f"report: {s['role']} (run {s['run_id']}) left out: {s['reason']}")
    files = result["files"]
    print(f"report: {result['settings']['threads']} torch thread(s); files in {result['report_dir']} "
          f"({', '.join(os.path.basename(p) for p in [files['markdown'], files['csv'], files['json'], *files['plots']])})")
    run_id = result["mlflow"]["run_id"]
    if run_id:
        print(f"report: MLflow run {run_id} in experiment {result['mlflow']['experiment']} ({result['mlflow']['tracking_uri']})")

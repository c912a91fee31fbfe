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
import csv
import io
import json
import os
import platform
import statistics
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from pipeline import storage

REPORT_SUBDIR = "report"
STAGES = ("teacher", "distill")
# Fixed roles first, in the order one reads a distillation comparison; funmatch-* and others after.
ROLE_ORDER = ("teacher", "baseline", "deit-soft", "deit-hard")
THROUGHPUT_BATCH = 64
WARMUP_RUNS = 3
# One thread by default: figures then compare across machines with different core counts, and other
# processes on a shared machine barely disturb them (oversubscribed OpenMP threads wait on each other:
# measured on 2 busy CPUs, DeiT-tiny took 200 ms/img with 2 threads against 18-44 ms with 1).
DEFAULT_THREADS = 1
DEFAULT_LATENCY_RUNS, DEFAULT_THROUGHPUT_RUNS = 30, 5

# (row key, Markdown header): report.md and report.csv hold the same cells; the CSV uses the keys as header.
COLUMNS = (
    ("role", "role"),
    ("arch", "model"),
    ("val_top1", "val top-1"),
    ("val_top1_recorded", "val top-1 (recorded)"),
    ("params_m", "params (M)"),
    ("size_mb", "size (MB)"),
    ("latency_ms", "latency ms/img @bs1"),
    ("images_per_s", f"img/s @bs{THROUGHPUT_BATCH}"),
    ("agreement", "agreement with teacher"),
    ("run_id", "run id"),
)
_DECIMALS = {"val_top1": 4, "val_top1_recorded": 4, "params_m": 3, "size_mb": 3, "latency_ms": 3, "images_per_s": 1,
             "agreement": 4}
MISSING_MD = "—"  # a value that does not exist (the teacher's agreement); an empty cell in the CSV

# Per-role values logged as metrics of the report run: <role>_<key>.
METRIC_KEYS = ("val_top1", "val_top1_recorded", "params", "size_mb", "latency_ms", "images_per_s", "agreement")


class ReportError(ValueError):
    """Nothing to report on (no experiment, no finished stage run, no loadable model)."""


# ---------------------------------------------------------------- finding the runs


def _what_to_run_first(experiment: str, uri: str) -> str:
    return (f"train something first with the same tracking store and experiment, e.g. "
            f"`python -m pipeline run --config configs/demo.yaml tracking.experiment={experiment} tracking.uri={uri}` "
            f"(or the teacher / distill stages)")


def find_experiment_id(client, experiment: str, uri: str) -> str:
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as exc:
        raise ReportError(f"cannot read the MLflow store at {uri}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if exp is None:
        raise ReportError(f"MLflow experiment {experiment!r} does not exist at {uri}; {_what_to_run_first(experiment, uri)}")
    return exp.experiment_id


def _finished_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def is_sweep_trial(run) -> bool:
    tags = run.data.tags
    return "trial_id" in tags or "sweep" in tags or tags.get("pipeline.invocation") == "trial"


def _ended(run) -> tuple[int, int]:
    # A resumed stage run keeps its first start time, so "latest" means the one that ended last.
    return (run.info.end_time or 0, run.info.start_time or 0)


def select_runs(runs: list) -> dict[str, Any]:
    """The run that represents each role: see the module docstring for the rule."""
    by_role: dict[str, list] = {}
    for run in runs:
        tags = run.data.tags
        if run.info.status == "FINISHED" and tags.get("role") and tags.get("stage") in STAGES:
            by_role.setdefault(tags["role"], []).append(run)
    chosen = {}
    for role, candidates in by_role.items():
        published = [r for r in candidates if not is_sweep_trial(r)]
        if published:
            chosen[role] = max(published, key=_ended)
        else:
            chosen[role] = max(candidates, key=lambda r: (r.data.tags.get("best_trial") == "true", *_ended(r)))
    return dict(sorted(chosen.items(), key=lambda kv: role_sort_key(kv[0])))


def role_sort_key(role: str) -> tuple[int, str]:
    return (ROLE_ORDER.index(role), "") if role in ROLE_ORDER else (len(ROLE_ORDER), role)


# ---------------------------------------------------------------- loading and measuring


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _mlflow_uri(uri: str) -> Iterator[None]:
    """``runs:/`` URIs are resolved against MLflow's global tracking URI."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def _serialized_size(model: torch.nn.Module) -> int:
    """Bytes of the state dict as ``torch.save`` writes it: what model.pt would weigh."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def load_run_model(run, uri: str) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """The run's model from its ``best_checkpoint`` directory, else from ``runs:/<id>/model``.

    Returns (model, meta, info) where info says where it came from, its size and any note."""
    from pipeline.checkpoints import MODEL_FILE, load_model, read_meta

    ckpt = run.data.tags.get("best_checkpoint", "")
    logged = f"runs:/{run.info.run_id}/model"
    notes: list[str] = []

    def from_checkpoint():
        model, meta = load_model(ckpt)
        return model, meta, {"source": ckpt, "size_bytes": storage.size(storage.join(ckpt, MODEL_FILE)),
                             "size_source": MODEL_FILE, "notes": notes}

    complete = bool(ckpt) and storage.is_file(storage.join(ckpt, MODEL_FILE))
    overwritten = False
    if complete:
        # Stage directories are reused: a later run (another experiment, same output_dir) may have
        # replaced the files. The Ray run that wrote them is in meta.json, this run's in its tags.
        owner = str(read_meta(ckpt).get("checkpoint_id", "")).split("/")[0]
        ray_run = run.data.tags.get("ray_run", "")
        overwritten = bool(owner and ray_run and owner != ray_run)
        if not overwritten:
            return from_checkpoint()
        notes.append(f"{ckpt} now holds Ray run {owner}, not this run's {ray_run}")
    else:
        notes.append(f"checkpoint {ckpt or '(no best_checkpoint tag)'} is missing or incomplete")
    try:
        with _mlflow_uri(uri):
            model, meta = load_model(logged)
    except Exception as exc:
        if overwritten:  # no logged model: the files in the directory are the best there is
            notes.append("no logged model either: measured what the directory holds")
            return from_checkpoint()
        raise ReportError(f"run {run.info.run_id}: {notes[-1]}, and no logged model at {logged} "
                          f"({type(exc).__name__}: {str(exc)[:200]})") from None
    notes.append("model loaded from MLflow; size is its serialized state dict")
    return model, meta, {"source": logged, "size_bytes": _serialized_size(model), "size_source": "serialized state_dict", "notes": notes}


def _median_seconds(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def measure_speed(model: torch.nn.Module, images_u8: torch.Tensor, meta: dict[str, Any], latency_runs: int,
                  throughput_runs: int) -> tuple[float, float]:
    """(median ms per image at batch 1, images/s at batch 64) of the forward pass on CPU.

    Inputs are preprocessed before timing: the figures are the model's cost, not the resize's."""
    from pipeline.evaluate import model_inputs

    model.eval()
    n = len(images_u8)
    singles = model_inputs(images_u8[: min(n, latency_runs)], meta)
    batch = model_inputs(images_u8[torch.arange(THROUGHPUT_BATCH) % n], meta).contiguous()
    state = {"i": 0}

    def one():
        i = state["i"] % len(singles)  # cycle through real images rather than timing one over and over
        state["i"] += 1
        model(singles[i : i + 1])

    for _ in range(WARMUP_RUNS):
        one()
    latency = _median_seconds(one, latency_runs)
    model(batch)  # warm-up at the larger shape (allocator, oneDNN kernels)
    per_batch = _median_seconds(lambda: model(batch), throughput_runs)
    return latency * 1000.0, THROUGHPUT_BATCH / per_batch


class _Splits:
    """Validation splits by shard directory, read once each."""

    def __init__(self):
        self._cache: dict[str, Any] = {}

    def val(self, shard_dir: str):
        from pipeline.data.loading import load_split

        key = os.path.realpath(shard_dir) if "://" not in shard_dir else shard_dir
        if key not in self._cache:
            split = load_split(shard_dir, "val")
            if len(split) == 0:
                raise ReportError(f"{shard_dir} has an empty validation split")
            self._cache[key] = split
        return self._cache[key]


def _agreement(pred: torch.Tensor, paths: list[str], teacher: dict[str, Any] | None) -> tuple[float | None, str | None]:
    """Fraction of val images on which ``pred`` equals the teacher's argmax, when both saw the same images."""
    if teacher is None:
        return None, "no teacher measured in this report: no agreement"
    if paths != teacher["paths"]:
        return None, "validation images differ from the teacher's (other shards): no agreement"
    return float((pred == teacher["pred"]).float().mean()), None


def measure_run(run, role: str, uri: str, splits: _Splits, teacher: dict[str, Any] | None, latency_runs: int,
                throughput_runs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One report row, and (paths, predictions) for agreement with later rows."""
    from pipeline.evaluate import accuracy_report, predict_logits
    from pipeline.models import count_parameters

    tags, metrics = run.data.tags, run.data.metrics
    shard_dir = tags.get("shard_dir")
    if not shard_dir:
        raise ReportError(f"run {run.info.run_id} ({role}) has no shard_dir tag")
    val = splits.val(shard_dir)
    model, meta, info = load_run_model(run, uri)
    with torch.inference_mode():
        logits = predict_logits(model, val.images, meta)
    accuracy = accuracy_report(logits, val.labels, meta["class_names"])
    pred = logits["logits"].argmax(-1)
    latency_ms, images_per_s = measure_speed(model, val.images, meta, latency_runs, throughput_runs)
    notes = list(info["notes"])
    if is_sweep_trial(run):
        notes.append(f"sweep trial {tags.get('trial_id', '?')} (no published run for this role)")
    agreement = None
    if role != "teacher":
        agreement, why = _agreement(pred, val.paths, teacher)
        if why:
            notes.append(why)
    params = count_parameters(model)
    row = {
        "role": role, "arch": meta["arch"], "run_id": run.info.run_id, "run_name": run.info.run_name,
        "stage": tags.get("stage"), "method": tags.get("method"),
        "val_top1": accuracy["top1"], "val_count": accuracy["count"],
        "val_top1_recorded": metrics.get("final_val_top1", metrics.get("best_val_acc")),
        "test_top1_recorded": metrics.get("final_test_top1"),
        "params": params, "params_m": round(params / 1e6, 3),
        "size_bytes": info["size_bytes"], "size_mb": round(info["size_bytes"] / 1e6, 3), "size_source": info["size_source"],
        "latency_ms": latency_ms, "images_per_s": images_per_s, "agreement": agreement,
        "input_size": meta.get("input_size"), "model_source": info["source"], "shard_dir": shard_dir,
        "ended": run.info.end_time, "sweep_trial": is_sweep_trial(run), "notes": notes,
    }
    for head in ("top1_cls", "top1_dist"):
        if head in accuracy:
            row[f"val_{head}"] = accuracy[head]
    return row, {"paths": val.paths, "pred": pred}


# ---------------------------------------------------------------- writing


def cell(row: dict[str, Any], key: str) -> str:
    """The text of one table cell (shared by the Markdown and the CSV); '' for a missing value."""
    value = row.get(key)
    if value is None:
        return ""
    if key in _DECIMALS:
        return f"{float(value):.{_DECIMALS[key]}f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row, k) or MISSING_MD for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: str, rows: list[dict[str, Any]], settings: dict[str, Any], skipped: list[dict[str, str]]) -> str:
    parts = [f"# Model comparison: experiment `{settings['experiment']}`\n",
             f"CPU, {settings['threads']} torch thread(s), torch {settings['torch']}, {settings['machine']} "
             f"({settings['cpus']} CPUs, load average {settings['load_average_1m']} at start); "
             f"latency: median of {settings['latency_runs']} single-image runs after {WARMUP_RUNS} warm-up; "
             f"throughput: median of {settings['throughput_runs']} batches of {THROUGHPUT_BATCH}. "
             f"Val top-1 recomputed on each run's validation split; agreement = share of validation images "
             f"on which the model's top class equals the teacher's.\n",
             markdown_table(rows)]
    notes = [f"- **{r['role']}**: {n}" for r in rows for n in r["notes"]]
    notes += [f"- **{s['role']}** (run {s['run_id']}) left out: {s['reason']}" for s in skipped]
    if notes:
        parts.append("Notes:\n\n" + "\n".join(notes) + "\n")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def write_csv(path: str, rows: list[dict[str, Any]]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([k for k, _ in COLUMNS])
        for row in rows:
            w.writerow([cell(row, k) for k, _ in COLUMNS])
    return path


def write_json(path: str, report: dict[str, Any]) -> str:
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_latency(rows: list[dict[str, Any]], path: str) -> str:
    """Val top-1 against ms per image, one labelled point per role, area ~ parameters."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    biggest = max(r["params"] for r in rows)
    for i, r in enumerate(rows):
        ax.scatter(r["latency_ms"], r["val_top1"], s=40 + 400 * r["params"] / biggest, alpha=0.6,
                   c="tab:orange" if r["role"] == "teacher" else "tab:blue")
        # Models of one architecture sit on top of each other: stagger their labels vertically.
        ax.annotate(f"{r['role']} ({r['arch']})", (r["latency_ms"], r["val_top1"]), textcoords="offset points",
                    xytext=(8, 8 + 11 * (i % 4)), fontsize=8)
    latencies = [r["latency_ms"] for r in rows]
    if max(latencies) / max(min(latencies), 1e-9) > 20:
        ax.set_xscale("log")
    if ax.get_xscale() == "log":
        ax.set_xlim(right=max(latencies) * 3)
    else:
        ax.set_xlim(0, max(latencies) * 1.5)  # from zero: distances then read as ratios
    ax.set_xlabel("CPU latency, ms / image (batch 1)")
    ax.set_ylabel("val top-1")
    ax.set_ylim(0, 1.1)
    ax.set_title("accuracy vs latency (orange: teacher; marker area ~ parameters)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_accuracy_agreement(rows: list[dict[str, Any]], path: str) -> str:
    """Grouped bars per role: val top-1 and agreement with the teacher (absent for the teacher)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 4))
    xs = range(len(rows))
    width = 0.38
    bars = ax.bar([x - width / 2 for x in xs], [r["val_top1"] for r in rows], width, label="val top-1")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    agree = [(x, r["agreement"]) for x, r in zip(xs, rows) if r["agreement"] is not None]
    if agree:
        bars = ax.bar([x + width / 2 for x, _ in agree], [a for _, a in agree], width, label="agreement with teacher")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)  # makes an agreement of 0 visible too
    ax.set_xticks(list(xs), [r["role"] for r in rows], rotation=20, ha="right")
    ax.set_ylim(0, 1.25)
    ax.legend(loc="upper right", ncol=2, fontsize=8)
    ax.set_title("validation top-1 and agreement with the teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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

    from pipeline.tracking import _attempt, git_commit

    client = MlflowClient(uri)
    ok, run_id = _attempt(lambda: client.create_run(experiment_id, run_name="report", tags={
        "pipeline.invocation": "report", "git_commit": git_commit()}).info.run_id, "create the report run", False)
    if not ok:
        return None
    rewrite_json(run_id)  # the JSON on disk and the artifact name the run they belong to
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in report_metrics(rows).items()]
    params = [Param(k, str(v)) for k, v in settings.items()] + [Param(f"{r['role']}_run_id", r["run_id"]) for r in rows]
    sent, _ = _attempt(lambda: client.log_batch(run_id, metrics=metrics, params=params), "log the report metrics", False)
    for path in files:
        sent &= _attempt(lambda: client.log_artifact(run_id, path), f"log {os.path.basename(path)}", False)[0]
    _attempt(lambda: client.set_terminated(run_id, "FINISHED" if sent else "FAILED"), "end the report run", False)
    return run_id


# ---------------------------------------------------------------- the report


def build_report(tracking_uri: str, experiment: str, output_dir: str, log_to_mlflow: bool = True,
                 latency_runs: int = DEFAULT_LATENCY_RUNS, threads: int | None = None,
                 throughput_runs: int = DEFAULT_THROUGHPUT_RUNS, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the latest finished model of every role in ``experiment``; write and log the report.

    Returns rows, skipped runs, file paths and the MLflow report run id (None when not logged)."""
    from mlflow.tracking import MlflowClient

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

    rows, skipped, splits, teacher = [], [], _Splits(), None
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
        plot_accuracy_vs_latency(rows, at["plots"][0])
        plot_accuracy_agreement(rows, at["plots"][1])
        if log_to_mlflow:
            def rewrite_json(rid: str) -> None:
                report["mlflow_report_run_id"] = rid
                write_json(at["json"], report)

            files = [at["markdown"], at["csv"], at["json"], *at["plots"]]
            run_id = log_report_run(tracking_uri, experiment_id, rows, settings, files, rewrite_json)
    paths = {k: [storage.join(report_dir, n) for n in v] if isinstance(v, list) else storage.join(report_dir, v) for k, v in names.items()}
    return {"stage": "report", "rows": rows, "skipped": skipped, "settings": settings, "report_dir": report_dir,
            "files": paths, "mlflow": {"tracking_uri": tracking_uri, "experiment": experiment, "run_id": run_id}}


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser, with_config: bool = True) -> argparse.ArgumentParser:
    """The report's options; ``with_config=False`` when the caller already adds --config and overrides."""
    if with_config:
        parser.add_argument("--config", "-c", help="YAML preset (e.g. configs/demo.yaml); defaults: the embedded demo")
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


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.config import load_config

    return run_with_config(load_config(getattr(args, "config", None), getattr(args, "overrides", None) or []), args)


def print_summary(result: dict[str, Any]) -> None:
    print(markdown_table(result["rows"]), end="")
    for s in result["skipped"]:
        print(f"report: {s['role']} (run {s['run_id']}) left out: {s['reason']}")
    files = result["files"]
    print(f"report: {result['settings']['threads']} torch thread(s); files in {result['report_dir']} "
          f"({', '.join(os.path.basename(p) for p in [files['markdown'], files['csv'], files['json'], *files['plots']])})")
    run_id = result["mlflow"]["run_id"]
    if run_id:
        print(f"report: MLflow run {run_id} in experiment {result['mlflow']['experiment']} ({result['mlflow']['tracking_uri']})")

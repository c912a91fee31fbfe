"""Measuring one run's model on CPU: loading it, val top-1, size, latency, throughput, agreement."""

from __future__ import annotations

import io
import os
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from pipeline import storage
from pipeline.report.runs import ReportError, is_sweep_trial

THROUGHPUT_BATCH = 64
WARMUP_RUNS = 3
# One thread by default: figures then compare across machines with different core counts, and other
# processes on a shared machine barely disturb them (oversubscribed OpenMP threads wait on each other:
# measured on 2 busy CPUs, DeiT-tiny took 200 ms/img with 2 threads against 18-44 ms with 1).
DEFAULT_THREADS = 1
DEFAULT_LATENCY_RUNS, DEFAULT_THROUGHPUT_RUNS = 30, 5


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
    """One report row, and the model's per-image results on val (paths, predictions, whether each is
    right) for agreement with later rows and paired comparisons."""
    from pipeline.evaluate import evaluate_model
    from pipeline.models import count_parameters

    tags, metrics = run.data.tags, run.data.metrics
    shard_dir = tags.get("shard_dir")
    if not shard_dir:
        raise ReportError(f"run {run.info.run_id} ({role}) has no shard_dir tag")
    val = splits.val(shard_dir)
    model, meta, info = load_run_model(run, uri)
    with torch.inference_mode():
        accuracy = evaluate_model(model, val.images, val.labels, meta, keep_predictions=True)
    pred = accuracy["predictions"]
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
        "val_top1_recorded": metrics.get("final_val_top1"),
        "test_top1_recorded": metrics.get("final_test_top1"),
        "params": params, "params_m": round(params / 1e6, 3),
        "size_bytes": info["size_bytes"], "size_mb": round(info["size_bytes"] / 1e6, 3), "size_source": info["size_source"],
        "latency_ms": latency_ms, "images_per_s": images_per_s, "val_agreement": agreement,
        "input_size": meta.get("input_size"), "model_source": info["source"], "shard_dir": shard_dir,
        "ended": run.info.end_time, "sweep_trial": is_sweep_trial(run), "notes": notes,
    }
    for head in ("top1_cls", "top1_dist"):
        if head in accuracy:
            row[f"val_{head}"] = accuracy[head]
    return row, {"paths": val.paths, "pred": pred, "correct": pred == val.labels}


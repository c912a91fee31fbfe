"""The training stages as seen from the driver: plan -> fit -> publish -> record.

:func:`run_training_stage` plans the stage (:mod:`pipeline.plan`), skips it when a finished run of
the same fingerprint already published its model, builds the teacher inputs it needs, fits a
TorchTrainer, publishes the best checkpoint, evaluates it once more on the driver and records
everything (plots, MLflow, ``result.json``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from pipeline import checkpoints, plots, storage
from pipeline.config import ConfigError, PipelineConfig, fingerprint, redact, to_dict, to_yaml
from pipeline.data.loading import load_split, read_manifest
from pipeline.data.preprocess import built_shards
from pipeline.plan import StageKind, StagePlan, plan_stage, teacher_identity
from pipeline.tracking import Tracker, model_alias


def teacher_cache(cfg: PipelineConfig, shard_dir: str, teacher: str, log=print) -> str:
    """fixed_teacher: the teacher's logits on the centre-cropped training images, computed once.

    Cached under ``<output_dir>/teacher_cache/`` by a key of the teacher checkpoint, the shards and
    the crop, so a second run reuses it and a changed teacher rebuilds it.
    """
    import torch

    from pipeline.config import stage_train
    from pipeline.evaluate import predict_logits

    crop = stage_train(cfg, "distill").crop_size or read_manifest(shard_dir)["image_size"]
    key = fingerprint("teacher-logits", teacher_identity(teacher), shard_dir, crop)[:16]
    path = storage.join(storage.abspath(cfg.output_dir), "teacher_cache", f"{key}.pt")
    if storage.is_file(path):
        log(f"distill: reusing cached teacher logits {path}")
        return path
    model, tmeta = checkpoints.load_model(teacher)
    train = load_split(shard_dir, "train")
    # Centre crops at the student's input size, as the paper's fixed teacher.
    feed = {**tmeta, "input_size": crop, "eval_transform": "center_crop"}
    logits = predict_logits(model, train.images, feed)["logits"]
    buffer = io.BytesIO()
    torch.save({"paths": train.paths, "logits": logits}, buffer)
    storage.write_bytes(path, buffer.getvalue())
    log(f"distill: cached teacher logits for {len(train)} training images in {path}")
    return path


def finished_stage(cfg: PipelineConfig, plan: StagePlan, tracking_uri: str | None = None) -> dict[str, Any] | None:
    """The saved result of the planned stage if a Ray run of the same fingerprint produced it, its
    published model is still there and it was tracked where this invocation tracks; else None."""
    try:
        done = storage.read_json(storage.join(plan.output_dir, "result.json"))
    except (OSError, ValueError):
        return None
    if "metrics" not in done:  # written by an older version: publish again (from the finished Ray run, no retraining)
        return None
    if done.get("ray_run_name") != plan.ray_run or not storage.is_file(storage.join(done.get("best_checkpoint", ""), checkpoints.META_FILE)):
        return None
    tracked_at = done.get("mlflow", {})
    if tracking_uri and (tracked_at.get("tracking_uri"), tracked_at.get("experiment")) != (redact(tracking_uri), cfg.tracking.experiment):
        return None  # the stage must appear in this store/experiment too: republished (not retrained) below
    return done


@dataclass
class _Fitted:
    """What a finished fit leaves for publishing: Ray's result and the MLflow run it logged to."""

    result: Any
    run_id: str | None
    run_dir: str
    started: float  # time.time() when the stage began
    label_seconds: float | None = None  # of that, the time the label step took (built or reused), when it replays views


def run_training_stage(cfg: PipelineConfig, stage: str, tracker: Tracker, force: bool = False, log=print,
                       shard_dir: str | None = None, extra_tags: dict[str, str] | None = None, callbacks=None,
                       reuse: bool = True, reserved_cpu: float = 0.0,
                       after_epoch: Callable[[int, int], None] | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Fit ``stage`` with a TorchTrainer (resuming a run of the same config), publish its best
    checkpoint under ``<stage output>/best``, log it to MLflow and return (and save) its result.

    With ``reuse``, a stage whose output already comes from a finished run of the same fingerprint
    (data, config, teacher checkpoint) is skipped and its saved result returned; ``force`` redoes it.
    ``reserved_cpu`` is what the caller itself holds (a sweep trial); ``after_epoch(epoch, rank)``
    runs on every worker after each reported epoch (the reliability tests inject faults there).
    ``show_progress``: a progress display on this process's console (a sweep's trials have none).
    """
    plan = plan_stage(cfg, stage, shard_dir or built_shards(cfg))
    manifest = read_manifest(plan.shard_dir)
    if manifest["split_sizes"]["val"] == 0:
        raise ConfigError("the validation split is empty: set data.val_fraction > 0 (model selection needs it)")
    with _stage_lock(cfg, plan, reuse, log):
        done = finished_stage(cfg, plan, tracker.uri) if reuse and not force else None
        if done:
            log(f"{plan.role}: up to date (same fingerprint as Ray run {plan.ray_run}), skipped; model in {done['best_checkpoint']}. "
                f"To redo it: `python -m pipeline {stage} --force` or `run --force {stage}`.")
            return {**done, "skipped": True}
        fitted = _fit(cfg, plan, tracker, force, log, extra_tags or {}, callbacks, reserved_cpu, after_epoch, show_progress)
        best_dir, best_metrics, model, meta = _publish(plan, fitted)
        return _record(cfg, plan, tracker, fitted, manifest, best_dir, best_metrics, model, meta)


def _stage_lock(cfg: PipelineConfig, plan: StagePlan, reuse: bool, log):
    """One run at a time per stage output (``teacher``, ``distill/<role>``) of a local output_dir.

    Two invocations of the same stage would otherwise train side by side into the same Ray run,
    MLflow run and ``best`` directory; the second now waits, then finds the stage up to date (or,
    with another config, trains after the first). A sweep trial (``reuse=False``) owns a directory
    of its own. Object stores have no lock to take: there, as before, do not start the same stage twice.
    """
    lock = None
    if reuse and not storage.is_uri(cfg.output_dir):
        name = os.path.relpath(plan.output_dir, storage.abspath(cfg.output_dir)).replace(os.sep, "-")
        lock = storage.run_lock_path(cfg.output_dir, f"stage-{name}")
    return storage.turn_lock(
        lock,
        on_wait=lambda where: log(f"{plan.role}: another run is training this stage into {plan.output_dir} ({where}); waiting for it"),
        on_unavailable=lambda why: log(f"{plan.role}: no lock could be taken for this stage ({why}); "
                                       "do not start it twice at once into this output_dir"))


def _teacher_inputs(cfg: PipelineConfig, plan: StagePlan, force: bool, log, tracker: Tracker | None = None) -> str | None:
    """The fixed teacher's cached logits or the label stage's views, when the plan trains on them."""
    if plan.kind is StageKind.FUNMATCH and cfg.distill.teaching == "fixed_teacher":
        return teacher_cache(cfg, plan.shard_dir, plan.teacher, log)
    if plan.uses_teacher and cfg.distill.teacher_views:
        from pipeline.label import label_views

        return label_views(cfg, plan.shard_dir, plan.teacher, teacher_identity(plan.teacher), log, force=force, tracker=tracker)
    return None


def _fit(cfg: PipelineConfig, plan: StagePlan, tracker: Tracker, force: bool, log, extra_tags: dict[str, str], callbacks,
         reserved_cpu: float, after_epoch, show_progress: bool) -> _Fitted:
    """Start Ray, build the teacher inputs, open the MLflow run and run the TorchTrainer to the end."""
    started = time.time()
    from pipeline.cluster import init_ray
    from pipeline.console import ProgressDisplay, verbose
    from pipeline.preflight import check_capacity
    from pipeline.tracking import end_status
    from pipeline.train.loop import check_diverged

    results_dir = storage.join(storage.abspath(cfg.output_dir), "ray_results")
    run_dir = storage.join(results_dir, plan.ray_run)
    if force:
        storage.delete_dir(run_dir)
    init_ray(cfg.ray, cfg.output_dir)
    check_capacity(cfg.ray)  # a request the cluster can never place fails now, before labelling, an MLflow run or an endless wait
    inputs_started = time.time()
    plan = plan.with_teacher_inputs(_teacher_inputs(cfg, plan, force, log, tracker))
    replays_views = bool(plan.teacher_inputs and cfg.distill.teacher_views)
    label_seconds = time.time() - inputs_started if replays_views else None
    if replays_views:
        extra_tags = {**extra_tags, "teacher_views_key": storage.resolve(plan.teacher_inputs)[1].rstrip("/").rsplit("/", 1)[-1]}
    id_file = storage.join(run_dir, "mlflow_run_id")
    previous = storage.read_text(id_file).strip() if storage.is_file(id_file) else None
    run_id = tracker.stage_run(plan.stage, {**plan.tags, **extra_tags}, reuse_id=previous, cfg=cfg, run_name=plan.run_name)
    if run_id:
        storage.write_text(id_file, run_id)
    epochs = plan.section(cfg).epochs
    display = ProgressDisplay(plan.run_name, epochs) if show_progress else None
    extras = {"tracking_uri": tracker.uri, "run_id": run_id, "after_epoch": after_epoch, "verbose": verbose(),
              "progress": display.sender if display else None}
    trainer = _trainer(cfg, plan, results_dir, extras, callbacks, reserved_cpu)
    log(f"{plan.role}: training {plan.run_name}, {epochs} epochs on {cfg.ray.num_workers} worker(s) "
        f"({'GPU' if cfg.ray.use_gpu else 'CPU'}); Ray run {run_dir}")
    try:
        if display:
            with display:
                result = trainer.fit()
        else:
            result = trainer.fit()
        check_diverged(plan.stage, result.metrics, plan.stage)
    except BaseException as exc:
        tracker.end(run_id, end_status(exc))
        raise
    return _Fitted(result, run_id, run_dir, started, label_seconds)


def _trainer(cfg: PipelineConfig, plan: StagePlan, results_dir: str, worker_extras: dict[str, Any], callbacks, reserved_cpu: float):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.console import verbose
    from pipeline.data.streaming import DATA_RESERVED_CPUS, data_mode, stream_dataset
    from pipeline.train.loop import train_worker

    # Ray Train writes its checkpoints straight to an object store when given its filesystem.
    storage_path, storage_fs = storage.ray_storage(results_dir)
    mode = data_mode(plan.train_config(cfg), read_manifest(plan.shard_dir), cfg.ray.num_workers)
    datasets = {}
    if mode == "stream":  # the reads' share of the CPUs comes out of the workers' (see pipeline.data.streaming)
        datasets = {"train": stream_dataset(plan.shard_dir, "train", readers=cfg.ray.num_workers, show_progress=verbose())}
        reserved_cpu += DATA_RESERVED_CPUS
    # A caller's own reservation (a sweep trial's) comes out of its workers' share, so that the
    # trial and its workers together ask for what the config says, not a sliver more.
    per_worker_cpu = max(0.01, cfg.ray.cpus_per_worker - reserved_cpu / cfg.ray.num_workers)
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": to_dict(cfg), "plan": plan, "unsent_path": storage.join(plan.output_dir, "mlflow_unsent.jsonl"),
                           "data_mode": mode, **worker_extras},
        datasets=datasets or None,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": per_worker_cpu}, placement_strategy=cfg.ray.placement_strategy),
        run_config=RunConfig(
            name=plan.ray_run,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute="val_top1",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
            # Ray Train's controller INFO lines (worker-group start-up, checkpoints) would bury the
            # progress on the console; they still go to Ray's session log files (and with --verbose, here).
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )


def _publish(plan: StagePlan, fitted: _Fitted) -> tuple[str, dict[str, Any], Any, dict[str, Any]]:
    """Copy the best checkpoint to ``<stage output>/best`` without its optimiser state, under a new
    checkpoint id; returns (that directory, the checkpoint's metrics, the model and its meta,
    loaded from the local copy so an object store is not read back)."""
    best_ckpt, best_metrics = max(fitted.result.best_checkpoints, key=lambda cm: cm[1].get("val_top1", -1.0))
    best_dir = storage.join(plan.output_dir, "best")
    # A result.json left by an earlier run must not vouch for the model being replaced now.
    storage.delete_file(storage.join(plan.output_dir, "result.json"))
    with tempfile.TemporaryDirectory() as work:
        published = os.path.join(work, "best")
        with best_ckpt.as_directory() as d:
            shutil.copytree(d, published)
        meta = checkpoints.read_meta(published)
        # Unique per publication: a forced retrain of the same config must still change the fingerprint
        # of every stage downstream of this model.
        meta["checkpoint_id"] = f"{plan.ray_run}/{os.path.basename(best_ckpt.path)}@{time.time_ns()}"
        with open(os.path.join(published, checkpoints.META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        os.remove(os.path.join(published, checkpoints.STATE_FILE))  # the published model needs no optimizer state
        storage.publish_dir(published, best_dir, last=checkpoints.META_FILE)
        model, meta = checkpoints.load_model(published)
    return best_dir, best_metrics, model, meta


def _record(cfg: PipelineConfig, plan: StagePlan, tracker: Tracker, fitted: _Fitted, manifest: dict[str, Any], best_dir: str,
            best_metrics: dict[str, Any], model, meta: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the published model on the driver, save plots and config, log them and the model to
    MLflow, and write ``result.json`` (last: its presence is what lets a later invocation skip)."""
    from pipeline.tracking import EpochLogger

    evaluation, val_images = _final_evaluation(plan, manifest, model, meta)
    history = _history(fitted.result)
    run_id = fitted.run_id
    with tempfile.TemporaryDirectory() as work:
        with storage.staged_dir(plan.output_dir) as local:
            curves = plots.learning_curves(history, os.path.join(local, "learning_curves.png"), plan.run_name)
            conf = plots.confusion_matrix(evaluation["val"]["confusion"], meta["class_names"], os.path.join(local, "confusion_val.png"),
                                          f"{plan.run_name}: validation confusion")
            conf_norm = plots.confusion_matrix(evaluation["val"]["confusion"], meta["class_names"],
                                               os.path.join(local, "confusion_val_normalized.png"),
                                               f"{plan.run_name}: validation confusion per true class", normalize=True)
            with open(os.path.join(local, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
            manifest_copy = os.path.join(work, "manifest.json")
            with open(manifest_copy, "w") as f:
                json.dump(manifest, f, indent=2)
            for path in (curves, conf, conf_norm, os.path.join(local, "config.yaml"), manifest_copy):
                tracker.log_artifact(run_id, path)
    scores = _published_scores(evaluation, best_metrics)
    model_uri = version = None
    if cfg.tracking.log_models:
        from pipeline.evaluate import model_inputs

        version_tags = {**plan.tags, "val_top1": f"{scores['val_top1']:.4f}", "run_id": run_id or ""}
        description = (f"{plan.run_name}: val top-1 {scores['val_top1']:.3f} on {scores['val_count']} validation images "
                       f"({cfg.data.source}); MLflow run {run_id}, Ray run {plan.ray_run}")
        model_uri, version = tracker.log_model(run_id, model, meta, model_inputs(val_images[:2], meta), plan.registered_model,
                                               version_tags, description)
    # A few single values, not a copy of every per-epoch metric at the best epoch: each would be one
    # more one-point chart ahead of val_top1 in the run's metrics tab.
    summary = {"best_epoch": best_metrics.get("epoch", 0)}
    summary.update({f"final_{k}": v for k, v in scores.items() if "top1" in k or k.endswith("agreement")})
    EpochLogger(tracker.uri, run_id, cfg.tracking.fail_fast, once_per_step=False).log(summary, step=int(best_metrics.get("epoch", 0)))
    # Where the published model and its data live, so `pipeline report` can find them from the run alone.
    tracker.set_tags(run_id, {"best_checkpoint": best_dir, "shard_dir": plan.shard_dir, "role": plan.role})
    tracker.end(run_id)
    result = {
        "stage": plan.stage, "role": plan.role, "arch": plan.arch, "run_name": plan.run_name, "output": plan.output_dir, "ray_run": fitted.run_dir, "ray_run_name": plan.ray_run,
        "best_checkpoint": best_dir, "best_epoch": best_metrics.get("epoch"), "seconds": round(time.time() - fitted.started, 1),
        # Part of "seconds": the label step, so that a summary can tell it from training (a store is built once, then shared).
        "label_seconds": None if fitted.label_seconds is None else round(fitted.label_seconds, 1),
        # The published model's scores, under the names of the per-epoch series (val_top1, ...).
        "metrics": scores, "per_class": {split: e["per_class"] for split, e in evaluation.items()},
        "history": history,
        "mlflow": {"tracking_uri": redact(tracker.uri), "experiment": cfg.tracking.experiment, "run_id": run_id, "model_uri": model_uri,
                   "registered": f"models:/{plan.registered_model}/{version}" if version else None,
                   "alias": f"models:/{plan.registered_model}@{model_alias(plan.role)}" if version else None},
        "artifacts": {"learning_curves": storage.join(plan.output_dir, "learning_curves.png"),
                      "confusion": storage.join(plan.output_dir, "confusion_val.png"),
                      "confusion_normalized": storage.join(plan.output_dir, "confusion_val_normalized.png")},
    }
    storage.write_json(storage.join(plan.output_dir, "result.json"), result)
    return result


def _published_scores(evaluation: dict[str, dict[str, Any]], best_metrics: dict[str, Any]) -> dict[str, Any]:
    """The published model's scores on each split, named as everywhere (``val_top1``, ``test_top1``,
    ``val_top1_cls``...); its agreement with the teacher comes from training's validation at the best
    epoch, where the teacher was at hand (the same model and images)."""
    scores = {f"{split}_{k}": v for split, e in evaluation.items() for k, v in e.items()
              if k in ("count", "loss") or k.startswith("top1")}
    if best_metrics.get("val_agreement") is not None:
        scores["val_agreement"] = best_metrics["val_agreement"]
    return scores


def _final_evaluation(plan: StagePlan, manifest: dict[str, Any], model, meta: dict[str, Any]):
    """Per-class and per-head accuracy and the confusion matrix of the published model on val (and test)."""
    from pipeline.evaluate import evaluate_model

    evaluation, val_images = {}, None
    for split in ("val", "test"):
        if manifest["split_sizes"][split]:
            part = load_split(plan.shard_dir, split)
            evaluation[split] = evaluate_model(model, part.images, part.labels, meta)
            val_images = part.images if split == "val" else val_images
    return evaluation, val_images


def _history(result) -> list[dict[str, float]]:
    """Per-epoch metrics of the whole run, resumed attempts included: the latest checkpoint carries them."""
    with result.checkpoint.as_directory() as d:
        return checkpoints.read_meta(d).get("history", [])

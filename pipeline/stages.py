"""The training stages as seen from the driver: validate, run the TorchTrainer, publish, track."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from typing import Any

from pipeline import checkpoints, plots, storage
from pipeline.config import ConfigError, PipelineConfig, fingerprint, redact, stage_train, to_dict, to_yaml
from pipeline.data.loading import load_split, read_manifest
from pipeline.models import check_model_name
from pipeline.tracking import Tracker


def stage_output_dir(cfg: PipelineConfig, stage: str) -> str:
    """``<output_dir>/teacher``, or ``<output_dir>/distill/<role>`` (see :func:`stage_role`), so that a
    student and its no-teacher baseline live side by side under the names MLflow shows."""
    root = storage.abspath(cfg.output_dir)
    if stage == "teacher":
        return storage.join(root, "teacher")
    return storage.join(root, "distill", stage_role(cfg, stage))


def stage_role(cfg: PipelineConfig, stage: str) -> str:
    """What a stage's model is in a comparison: teacher, baseline (no teacher), deit-soft, funmatch-fixed_teacher, ..."""
    if stage == "teacher":
        return "teacher"
    d = cfg.distill
    if d.name:
        return d.name
    if d.method == "funmatch":
        return f"funmatch-{d.teaching}"
    return "baseline" if d.type == "none" else f"deit-{d.type}"


def shard_dir_of(cfg: PipelineConfig) -> str:
    """The shards the preprocess stage produced for this config (run it first)."""
    result_path = storage.join(cfg.output_dir, "preprocess", "result.json")
    if not storage.exists(result_path):
        raise ConfigError(f"no preprocessed data in {cfg.output_dir}: run `python -m pipeline preprocess` (or `run`) with this config first")
    return storage.read_json(result_path)["shard_dir"]


def teacher_source(cfg: PipelineConfig) -> str:
    """``distill.teacher`` if set, else the teacher stage's best checkpoint."""
    if cfg.distill.teacher:
        src = cfg.distill.teacher
        if not src.startswith(("models:/", "runs:/")) and not storage.is_dir(src):
            raise ConfigError(f"distill.teacher: {src!r} does not exist (a checkpoint directory or a models:/ URI)")
        return src
    best = storage.join(stage_output_dir(cfg, "teacher"), "best")
    if not storage.is_file(storage.join(best, checkpoints.META_FILE)):
        raise ConfigError(f"no teacher for distillation: {best} is missing; run `python -m pipeline teacher` first or set distill.teacher")
    return best


def validate_stage(cfg: PipelineConfig, stage: str) -> str | None:
    """Everything that can be checked before workers start; returns the teacher source for distill."""
    if stage == "teacher":
        check_model_name(cfg.teacher.model, "teacher.model")
        p = cfg.teacher.pretrained
        if p == "package":
            from pipeline.weights import PACKAGE_WEIGHTS

            if cfg.teacher.model not in PACKAGE_WEIGHTS:
                raise ConfigError(f"teacher.pretrained=package has weights only for {sorted(PACKAGE_WEIGHTS)}, not {cfg.teacher.model!r}")
        elif p not in ("hub", "none") and not os.path.isfile(p):
            raise ConfigError(f"teacher.pretrained: {p!r} is not package, hub, none or an existing weights file")
        return None
    d = cfg.distill
    check_model_name(d.student, "distill.student")
    if d.teacher_input_size and d.method == "funmatch":
        raise ConfigError("distill.teacher_input_size applies to distill.method=deit; in function matching the teacher sees "
                          "the student's very tensor: leave it unset")
    if d.teacher_views and d.method == "funmatch":
        raise ConfigError("distill.teacher_views replays recorded views for distill.method=deit; function matching mixes "
                          "images per batch, which needs the online teacher: set distill.teacher_views=0")
    if d.student_pretrained == "package":
        from pipeline.weights import PACKAGE_WEIGHTS

        if d.student not in PACKAGE_WEIGHTS:
            raise ConfigError(f"distill.student_pretrained=package has weights only for {sorted(PACKAGE_WEIGHTS)}, not {d.student!r}")
    elif d.student_pretrained not in ("none", "hub") and not os.path.isfile(d.student_pretrained):
        raise ConfigError(f"distill.student_pretrained: {d.student_pretrained!r} is not none, package, hub or an existing file")
    return teacher_source(cfg) if d.type != "none" or d.method == "funmatch" else None


def teacher_cache(cfg: PipelineConfig, shard_dir: str, teacher: str, log=print) -> str:
    """fixed_teacher: the teacher's logits on the centre-cropped training images, computed once.

    Cached under ``<output_dir>/teacher_cache/`` by a key of the teacher checkpoint, the shards and
    the crop, so a second run reuses it and a changed teacher rebuilds it.
    """
    import torch

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


def teacher_identity(teacher: str) -> list:
    """What makes a teacher's outputs what they are: published checkpoints carry a unique
    ``checkpoint_id``; the weights file's time covers hand-made directories; a registry URI names
    a version (an alias or ``latest`` may move: pin a version to reuse cached outputs safely)."""
    meta = checkpoints.read_meta(teacher) if not teacher.startswith(("models:/", "runs:/")) and storage.is_dir(teacher) else {}
    weights = os.path.join(teacher, checkpoints.MODEL_FILE)
    return [meta.get("checkpoint_id", teacher), os.stat(weights).st_mtime_ns if os.path.isfile(weights) else None]


def _stage_fingerprint(cfg: PipelineConfig, stage: str, shard_dir: str, teacher: str | None) -> str:
    """Names the Ray run: same data, config and teacher checkpoint -> same run (resume); a retrained teacher -> a new run."""
    section = to_dict(cfg.teacher if stage == "teacher" else cfg.distill)
    # Where the cluster is and whether its storage is shared do not change what is trained.
    scaling = {k: v for k, v in to_dict(cfg.ray).items() if k not in ("address", "shared_storage", "capacity_wait_s")}
    return fingerprint(stage, section, to_dict(cfg.train), shard_dir, scaling, model_id(teacher))


def model_id(source: str | None) -> str | None:
    """Identifies a published model: its checkpoint id (new on every retrain), or the URI itself."""
    if source and not source.startswith(("models:/", "runs:/")) and storage.is_dir(source):
        return checkpoints.read_meta(source).get("checkpoint_id", source)
    return source


def finished_stage(cfg: PipelineConfig, stage: str, ray_run: str, tracking_uri: str | None = None) -> dict[str, Any] | None:
    """The saved result of ``stage`` if it was produced by the Ray run ``ray_run`` (same fingerprint),
    its published model is still there and it was tracked where this invocation tracks; else None."""
    path = storage.join(stage_output_dir(cfg, stage), "result.json")
    try:
        done = storage.read_json(path)
    except (OSError, ValueError):
        return None
    if done.get("ray_run_name") != ray_run or not storage.is_file(storage.join(done.get("best_checkpoint", ""), checkpoints.META_FILE)):
        return None
    tracked_at = done.get("mlflow", {})
    if tracking_uri and (tracked_at.get("tracking_uri"), tracked_at.get("experiment")) != (redact(tracking_uri), cfg.tracking.experiment):
        return None  # the stage must appear in this store/experiment too: republished (not retrained) below
    return done


def run_training_stage(cfg: PipelineConfig, stage: str, tracker: Tracker, force: bool = False, log=print,
                       shard_dir: str | None = None, extra_tags: dict[str, str] | None = None, callbacks=None,
                       reuse: bool = True, reserved_cpu: float = 0.0) -> dict[str, Any]:
    """Fit ``stage`` with a TorchTrainer (resuming a run of the same config), publish its best
    checkpoint under ``<output_dir>/<stage>/best`` and log it to MLflow.

    With ``reuse``, a stage whose output already comes from a finished run of the same fingerprint
    (data, config, teacher checkpoint) is skipped and its saved result returned; ``force`` redoes it.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.cluster import init_ray
    from pipeline.train.loop import train_worker

    shard_dir = shard_dir or shard_dir_of(cfg)
    teacher = validate_stage(cfg, stage)
    manifest = read_manifest(shard_dir)
    if manifest["split_sizes"]["val"] == 0:
        raise ConfigError("the validation split is empty: set data.val_fraction > 0 (model selection needs it)")
    fp = _stage_fingerprint(cfg, stage, shard_dir, teacher)
    name = f"{stage}-{fp[:12]}"
    done = finished_stage(cfg, stage, name, tracker.uri) if reuse and not force else None
    if done:
        log(f"{stage}: up to date (same fingerprint as Ray run {name}), skipped; model in {done['best_checkpoint']}. "
            f"To redo it: `python -m pipeline {stage} --force` or `run --force {stage}`.")
        return {**done, "skipped": True}
    results_dir = storage.join(storage.abspath(cfg.output_dir), "ray_results")
    run_dir = storage.join(results_dir, name)
    if force:
        storage.delete_dir(run_dir)
    stage_dir = stage_output_dir(cfg, stage)

    id_file = storage.join(run_dir, "mlflow_run_id")
    previous = storage.read_text(id_file).strip() if storage.is_file(id_file) else None
    tags = {"method": cfg.distill.method if stage == "distill" else "finetune", "dataset": cfg.data.source,
            "ray_run": name, "arch": cfg.distill.student if stage == "distill" else cfg.teacher.model, **(extra_tags or {})}
    if stage == "distill" and cfg.distill.method == "deit":
        tags["distill_type"] = cfg.distill.type
    if stage == "distill" and cfg.distill.method == "funmatch":
        tags["teaching"] = cfg.distill.teaching
    init_ray(cfg.ray, cfg.output_dir)
    from pipeline.preflight import check_capacity

    check_capacity(cfg.ray)  # a request the cluster can never place fails now, before labelling, an MLflow run or an endless wait
    cache = None
    if stage == "distill" and cfg.distill.method == "funmatch" and cfg.distill.teaching == "fixed_teacher":
        cache = teacher_cache(cfg, shard_dir, teacher, log)
    elif stage == "distill" and teacher and cfg.distill.teacher_views:
        from pipeline.label import label_views

        cache = label_views(cfg, shard_dir, teacher, teacher_identity(teacher), log, force=force)
        tags["teacher_views"] = str(cfg.distill.teacher_views)
    run_id = tracker.stage_run(stage, {**tags, "role": stage_role(cfg, stage)}, reuse_id=previous, cfg=cfg)
    if run_id:
        storage.write_text(id_file, run_id)

    opt = cfg.teacher if stage == "teacher" else cfg.distill
    # Ray Train writes its checkpoints straight to an object store when given its filesystem.
    storage_path, storage_fs = storage.ray_storage(results_dir)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": to_dict(cfg), "stage": stage, "shard_dir": shard_dir, "teacher_source": teacher,
                           "teacher_cache": cache,
                           "tracking_uri": tracker.uri, "run_id": run_id,
                           "unsent_path": storage.join(stage_dir, "mlflow_unsent.jsonl"),
                           # test hook (tests/reliability): PIPELINE_FAULT='{"epoch": 2, "marker": "/tmp/x"}'
                           "fault": json.loads(os.environ["PIPELINE_FAULT"]) if os.environ.get("PIPELINE_FAULT") else None},
        # A caller's own reservation (a sweep trial's) comes out of its workers' share, so that the
        # trial and its workers together ask for what the config says, not a sliver more.
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": max(0.01, cfg.ray.cpus_per_worker - reserved_cpu / cfg.ray.num_workers)}),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute="val_acc",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
            # Ray Train's controller INFO lines (worker-group start-up, checkpoints) would bury the
            # epoch lines on the console; they still go to Ray's session log files.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    log(f"{stage}: training {opt.epochs} epochs on {cfg.ray.num_workers} worker(s) ({'GPU' if cfg.ray.use_gpu else 'CPU'}); "
        f"Ray run {run_dir}")
    try:
        result = trainer.fit()
    except BaseException as exc:
        from pipeline.tracking import end_status

        tracker.end(run_id, end_status(exc))
        raise
    from pipeline.train.loop import check_diverged

    try:
        check_diverged(stage, result.metrics, "teacher" if stage == "teacher" else "distill")
    except ValueError:
        tracker.end(run_id, "FAILED")
        raise
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_acc", -1.0))
    best_dir = storage.join(stage_dir, "best")
    # A result.json left by an earlier run must not vouch for the model being replaced now.
    storage.delete_file(storage.join(stage_dir, "result.json"))
    from pipeline.evaluate import accuracy_report, model_inputs, predict_logits

    with tempfile.TemporaryDirectory() as work:
        published = os.path.join(work, "best")
        with best_ckpt.as_directory() as d:
            shutil.copytree(d, published)
        meta = checkpoints.read_meta(published)
        # Unique per publication: a forced retrain of the same config must still change the fingerprint
        # of every stage downstream of this model.
        meta["checkpoint_id"] = f"{name}/{os.path.basename(best_ckpt.path)}@{time.time_ns()}"
        with open(os.path.join(published, checkpoints.META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        os.remove(os.path.join(published, checkpoints.STATE_FILE))  # the published model needs no optimizer state
        storage.publish_dir(published, best_dir, last=checkpoints.META_FILE)

        # Final evaluation of the published model on the driver: per class, per head, confusion matrix.
        model, meta = checkpoints.load_model(published)
        evaluation, parts = {}, {}
        for split in ("val", "test"):
            if manifest["split_sizes"][split]:
                parts[split] = part = load_split(shard_dir, split)
                evaluation[split] = accuracy_report(predict_logits(model, part.images, meta), part.labels, meta["class_names"])
        history = _history(result)
        with storage.staged_dir(stage_dir) as local:
            curves = plots.learning_curves(history, os.path.join(local, "learning_curves.png"), f"{stage} ({name})")
            conf = plots.confusion_matrix(evaluation["val"]["confusion"], meta["class_names"], os.path.join(local, "confusion_val.png"),
                                          f"{stage}: validation confusion")
            with open(os.path.join(local, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
            manifest_copy = os.path.join(work, "manifest.json")
            with open(manifest_copy, "w") as f:
                json.dump(manifest, f, indent=2)
            for path in (curves, conf, os.path.join(local, "config.yaml"), manifest_copy):
                tracker.log_artifact(run_id, path)
        artifacts = {"learning_curves": storage.join(stage_dir, "learning_curves.png"),
                     "confusion": storage.join(stage_dir, "confusion_val.png")}

        example = model_inputs(parts["val"].images[:2], meta)
        suffix = "teacher" if stage == "teacher" else "student"
        model_uri = tracker.log_model(run_id, model, meta, example, f"{cfg.tracking.experiment}-{suffix}") if cfg.tracking.log_models else None
    summary = {f"best_{k}": v for k, v in best_metrics.items() if isinstance(v, (int, float))}
    summary.update({f"final_{s}_top1": e["top1"] for s, e in evaluation.items()})
    from pipeline.tracking import EpochLogger

    EpochLogger(tracker.uri, run_id, cfg.tracking.fail_fast, once_per_step=False).log(summary, step=int(best_metrics.get("epoch", 0)))
    # Where the published model and its data live, so `pipeline report` can find them from the run alone.
    tracker.set_tags(run_id, {"best_checkpoint": best_dir, "shard_dir": shard_dir, "role": stage_role(cfg, stage)})
    tracker.end(run_id)
    result = {
        "stage": stage,
        "role": stage_role(cfg, stage),
        "output": stage_dir,
        "ray_run": run_dir,
        "ray_run_name": name,
        "best_checkpoint": best_dir,
        "best_epoch": best_metrics.get("epoch"),
        "val_acc": best_metrics.get("val_acc"),
        "evaluation": {s: {k: v for k, v in e.items() if k != "confusion"} for s, e in evaluation.items()},
        "history": history,
        "mlflow": {"tracking_uri": redact(tracker.uri), "experiment": cfg.tracking.experiment, "run_id": run_id, "model_uri": model_uri},
        "artifacts": artifacts,
    }
    # Written last: its presence (with this run's name) is what lets a later invocation skip the stage.
    storage.write_json(storage.join(stage_dir, "result.json"), result)
    return result


def _history(result) -> list[dict[str, float]]:
    """Per-epoch metrics of the whole run, resumed attempts included: the latest checkpoint carries them."""
    with result.checkpoint.as_directory() as d:
        return checkpoints.read_meta(d).get("history", [])

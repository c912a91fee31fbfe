"""Ray Tune sweeps around a training stage (Ray Train V2 pattern).

Each trial is a function trainable that builds and fits a ``TorchTrainer`` (through the same
``run_training_stage`` as a single run); ``TuneReportCallback`` forwards each epoch's metrics to
Tune, where ASHA may stop a trial early. MLflow holds one parent run for the sweep and one child
run per trial; the best trial is tagged and its model registered; the parent gets a summary table
and plots of the metric against every swept key.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pipeline import storage
from pipeline.config import ConfigError, PipelineConfig, _set_dotted, fingerprint, redact, to_dict, validate_tree
from pipeline.tracking import Tracker

FLAT_SEP = "/"
DRIVER_CPU = 0.01  # Tune's param space is flat here: "distill/lr" stands for distill.lr


def validate_space(cfg: PipelineConfig) -> None:
    """Every swept key must exist and accept the values the space can produce, before any trial starts."""
    sweep = cfg.tune
    if not sweep.space:
        raise ConfigError("tune.space is empty: give at least one key to sweep")
    for key, dim in sweep.space.items():
        probes = dim.values if dim.type == "choice" else [dim.low, dim.high] if dim.type != "randint" else [int(dim.low), int(dim.high) - 1]
        for value in probes:
            tree: dict[str, Any] = {}
            try:
                _set_dotted(tree, key, value)
                validate_tree(tree, f"tune.space['{key}']")
            except ConfigError as exc:
                detail = str(exc).split("\n", 1)[-1].strip()
                raise ConfigError(f"tune.space['{key}']: value {value!r} is not valid for that key: {detail}") from None
        if key.split(".")[0] not in ("data", "train", "teacher", "distill") or key.startswith("data."):
            raise ConfigError(f"tune.space['{key}']: only train.*, teacher.* and distill.* keys can be swept")
    if sweep.search == "grid" and any(d.type != "choice" for d in sweep.space.values()):
        raise ConfigError("tune.search=grid needs every dimension of tune.space to be a 'choice' of values")


def _tune_space(cfg: PipelineConfig) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, d in cfg.tune.space.items():
        name = key.replace(".", FLAT_SEP)
        if d.type == "choice":
            out[name] = tune.grid_search(d.values) if cfg.tune.search == "grid" else tune.choice(d.values)
        elif d.type == "uniform":
            out[name] = tune.uniform(d.low, d.high)
        elif d.type == "loguniform":
            out[name] = tune.loguniform(d.low, d.high)
        else:
            out[name] = tune.randint(int(d.low), int(d.high))
    return out


def trial_config(base: dict[str, Any], params: dict[str, Any], trial_dir: str, teacher: str | None) -> PipelineConfig:
    tree = json.loads(json.dumps(base))
    for name, value in params.items():
        _set_dotted(tree, name.replace(FLAT_SEP, "."), value.item() if hasattr(value, "item") else value)
    tree["output_dir"] = trial_dir
    # The sweep logs and registers the best trial's model itself: Tune may stop a trial right after
    # its last report, before a trial could log anything after fit().
    tree["tracking"]["register_models"] = False
    tree["tracking"]["log_models"] = False
    if teacher:
        tree["distill"]["teacher"] = teacher
    return PipelineConfig.model_validate(tree)


def _trial(config: dict[str, Any]) -> None:
    """One trial: a TorchTrainer run of the stage with this trial's values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.stages import run_training_stage

    ctx = tune.get_context()
    trial_dir = storage.join(config["sweep_dir"], "trials", ctx.get_trial_id())
    cfg = trial_config(config["base"], config["params"], trial_dir, config["teacher"])
    tracker = Tracker.attach(cfg, config["tracking_uri"], config["experiment_id"], config["parent_id"])
    tags = {"sweep": config["sweep_name"], "trial_id": ctx.get_trial_id(),
            **{f"swept.{k.replace(FLAT_SEP, '.')}": str(v) for k, v in config["params"].items()}}
    run_training_stage(cfg, config["stage"], tracker, shard_dir=config["shard_dir"], extra_tags=tags,
                       callbacks=[TuneReportCallback()], log=lambda *_: None, reuse=False, reserved_cpu=DRIVER_CPU,
                       show_progress=False)


def sweep_name(cfg: PipelineConfig, shard_dir: str, teacher: str | None) -> str:
    """``sweep-<stage>-<fingerprint>``: the same space, stage config, data and teacher give the same sweep."""
    from pipeline.plan import model_id

    section = cfg.distill if cfg.tune.stage == "distill" else cfg.teacher
    tune_section = {k: v for k, v in to_dict(cfg.tune).items() if k != "in_run"}
    fp = fingerprint(tune_section, to_dict(section), to_dict(cfg.train), shard_dir, model_id(teacher))
    return f"sweep-{cfg.tune.stage}-{fp[:12]}"


def run_sweep(cfg: PipelineConfig, tracker: Tracker, resume: bool = False, log=print, force: bool = False,
              reuse: bool = False) -> dict[str, Any]:
    """Run (or ``resume``) the sweep; return the best trial and a summary of all. ``force`` starts it
    afresh; ``reuse`` returns the saved result of a finished sweep of the same fingerprint instead.

    One invocation at a time runs a given sweep of a local output_dir: a second one waits for the
    first (two Tuners in one experiment directory would overwrite each other's state)."""
    from pipeline.data.preprocess import built_shards
    from pipeline.plan import plan_stage

    validate_space(cfg)
    plan = plan_stage(cfg, cfg.tune.stage, built_shards(cfg))  # the base config's plan; each trial plans its own
    name = sweep_name(cfg, plan.shard_dir, plan.teacher)
    waiting = lambda where: log(f"sweep: another run is running this sweep ({where}); waiting for it")
    unlocked = lambda why: log(f"sweep: no lock could be taken ({why}); do not start this sweep twice at once")
    with storage.turn_lock(storage.run_lock_path(cfg.output_dir, name), on_wait=waiting, on_unavailable=unlocked):
        done = _saved_result(storage.join(storage.abspath(cfg.output_dir), "sweeps", name)) if reuse and not force else None
        if done:
            log(f"sweep: up to date (same fingerprint), skipped; results in {done['sweep_dir']}")
            return {**done, "skipped": True}
        return _run_sweep(cfg, tracker, plan, name, resume, log, force)


def _saved_result(sweep_dir: str) -> dict[str, Any] | None:
    """The result a finished sweep saved in ``sweep_dir``, or None."""
    try:
        return storage.read_json(storage.join(sweep_dir, "result.json"))
    except (OSError, ValueError):
        return None


def _run_sweep(cfg: PipelineConfig, tracker: Tracker, plan, name: str, resume: bool, log, force: bool) -> dict[str, Any]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pipeline.cluster import init_ray

    sweep = cfg.tune
    shard_dir, teacher = plan.shard_dir, plan.teacher
    sweeps_dir = storage.join(storage.abspath(cfg.output_dir), "sweeps")
    storage_path, storage_fs = storage.ray_storage(sweeps_dir)
    sweep_dir = storage.join(sweeps_dir, name)
    if force:
        storage.delete_dir(sweep_dir)
    init_ray(cfg.ray, cfg.output_dir)
    import ray

    epochs = plan.section(cfg).epochs
    from pipeline.preflight import check_capacity

    check_capacity(cfg.ray)  # every trial needs this much; none could ever start otherwise
    per_trial_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker  # the trial's own sliver comes out of it
    cpus = ray.cluster_resources().get("CPU", 1)
    concurrent = sweep.max_concurrent_trials or max(1, int(cpus // per_trial_cpu))
    if cfg.ray.use_gpu:
        concurrent = min(concurrent, max(1, int(ray.cluster_resources().get("GPU", 1) // cfg.ray.num_workers)))

    id_file = storage.join(sweep_dir, "mlflow_parent_run_id")
    parent_id = storage.read_text(id_file).strip() if resume and storage.is_file(id_file) else None
    parent_id = tracker.stage_run(f"sweep-{sweep.stage}", {"sweep": name}, reuse_id=parent_id)
    if parent_id:
        storage.write_text(id_file, parent_id)
    base = to_dict(cfg)
    # The trial function only drives a TorchTrainer whose workers hold the CPUs/GPUs; Tune refuses
    # an empty request, so it asks for a sliver of a CPU.
    trainable = tune.with_resources(_trial, {"cpu": DRIVER_CPU})
    param_space = {
        "params": _tune_space(cfg), "base": base, "stage": sweep.stage, "shard_dir": shard_dir, "teacher": teacher,
        "sweep_dir": sweep_dir, "sweep_name": name, "tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id,
        "parent_id": parent_id,
    }
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(sweep.grace_period, epochs),
                               reduction_factor=sweep.reduction_factor) if sweep.scheduler == "asha" else None)
    tune_config = tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                                  max_concurrent_trials=concurrent, scheduler=scheduler)
    restore_path = storage.resolve(sweep_dir)[1] if storage_fs else sweep_dir
    if resume and tune.Tuner.can_restore(restore_path, storage_filesystem=storage_fs):
        log(f"sweep: resuming {sweep_dir} (finished trials are kept)")
        tuner = tune.Tuner.restore(restore_path, trainable=trainable, param_space=param_space, resume_errored=True,
                                   storage_filesystem=storage_fs)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                           run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs, verbose=0))
    log(f"sweep: {sweep.num_samples} sample(s) over {', '.join(sweep.space)}; {concurrent} trial(s) at a time; {sweep_dir}")
    results = tuner.fit()
    return summarize(cfg, plan, tracker, results, parent_id, sweep_dir, name, epochs, log)


def _best_checkpoint(df, metric: str, mode: str, sweep_dir: str) -> str | None:
    """The checkpoint reported with the trial's best value of ``metric`` (Tune's ``checkpoint_path``,
    a path inside the sweep's filesystem, returned as a path or URI like ``sweep_dir``)."""
    if df is None or metric not in df or "checkpoint_path" not in df:
        return None
    rows = df[df["checkpoint_path"].notna()].sort_values(metric, ascending=mode == "min")
    # Ray keeps the best few checkpoints by validation accuracy; the sweep's metric may rank others first.
    for path in rows["checkpoint_path"]:
        where = storage.uri_for(sweep_dir, str(path))
        if storage.is_dir(where):
            return where
    return None


def summarize(cfg, plan, tracker: Tracker, results, parent_id, sweep_dir: str, name: str, epochs: int, log) -> dict[str, Any]:
    """Table + plots on the parent run, the best trial tagged and registered, stopped trials marked."""
    from mlflow.tracking import MlflowClient

    from pipeline import plots

    sweep = cfg.tune
    client = MlflowClient(tracker.uri)
    children = {}
    if tracker.experiment_id and parent_id:
        for run in client.search_runs([tracker.experiment_id], filter_string=f"tags.sweep = '{name}' and tags.`mlflow.parentRunId` = '{parent_id}'"):
            children[run.data.tags.get("trial_id")] = run
    rows = []
    for r in results:
        if r.metrics is None or "trial_id" not in (r.metrics or {}):
            continue
        trial_id = r.metrics["trial_id"]
        df = r.metrics_dataframe
        best_metric = (df[sweep.metric].max() if sweep.mode == "max" else df[sweep.metric].min()) if df is not None and sweep.metric in df else None
        last_epoch = int(r.metrics.get("epoch", 0))
        row = {"trial_id": trial_id, **{k.replace(FLAT_SEP, "."): v for k, v in r.config["params"].items()},
               sweep.metric: best_metric, "epochs_run": last_epoch, "stopped_early": last_epoch < epochs,
               "error": str(r.error)[:200] if r.error else ""}
        run = children.get(trial_id)
        row["mlflow_run_id"] = run.info.run_id if run else None
        row["best_checkpoint"] = _best_checkpoint(df, sweep.metric, sweep.mode, sweep_dir)
        if run:
            if row["stopped_early"]:
                tracker.set_tags(run.info.run_id, {"stopped_early": "true"})
            tracker.end(run.info.run_id, "KILLED" if row["stopped_early"] else "FINISHED")
        rows.append(row)
    if not rows:
        raise RuntimeError(f"no trial of {name} reported a metric; see the trial logs under {sweep_dir}")
    scored = [r for r in rows if r[sweep.metric] is not None]
    best = (max if sweep.mode == "max" else min)(scored, key=lambda r: r[sweep.metric])
    keys = [k for k in rows[0] if k != "best_checkpoint"]
    with storage.staged_dir(sweep_dir) as local:
        table_md = os.path.join(local, "trials.md")
        with open(table_md, "w") as f:
            f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
            for r in sorted(scored, key=lambda r: r[sweep.metric], reverse=sweep.mode == "max"):
                f.write("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |\n")
        table_csv = os.path.join(local, "trials.csv")
        import csv

        with open(table_csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        plot = plots.sweep_scatter(scored, list(cfg.tune.space), sweep.metric, os.path.join(local, "metric_vs_params.png"))
        for path in (table_md, table_csv, plot):
            tracker.log_artifact(parent_id, path)
    table_md, plot = storage.join(sweep_dir, "trials.md"), storage.join(sweep_dir, "metric_vs_params.png")
    model_uri = None
    if best.get("mlflow_run_id"):
        tracker.set_tags(best["mlflow_run_id"], {"best_trial": "true"})
        tracker.set_tags(parent_id, {"best_trial_id": best["trial_id"], "best_run_id": best["mlflow_run_id"]})
        if best["best_checkpoint"] and cfg.tracking.log_models:
            from pipeline.checkpoints import load_model
            from pipeline.data.loading import load_split
            from pipeline.evaluate import model_inputs
            model, meta = load_model(best["best_checkpoint"])
            example = model_inputs(load_split(plan.shard_dir, "val").images[:2], meta)
            # Its own alias: the best trial of a sweep is not the model the stage itself published.
            tags = {**plan.tags, "role": f"{plan.role}-sweep-best", "sweep": name, sweep.metric: f"{best[sweep.metric]:.4f}"}
            model_uri, _ = tracker.log_model(best["mlflow_run_id"], model, meta, example, plan.registered_model, tags,
                                          f"best trial {best['trial_id']} of sweep {name} ({sweep.metric} {best[sweep.metric]:.4f})")
    tracker.end(parent_id)
    log(f"sweep: best trial {best['trial_id']} {sweep.metric}={best[sweep.metric]:.4f} "
        + " ".join(f"{k}={best[k]:.4g}" if isinstance(best[k], float) else f"{k}={best[k]}" for k in cfg.tune.space))
    result = {"stage": "sweep", "sweep_dir": sweep_dir, "best": best, "trials": rows, "table": table_md,
              "plot": plot, "mlflow": {"tracking_uri": redact(tracker.uri), "parent_run_id": parent_id, "registered_model": model_uri}}
    # Marks the sweep finished: `run` skips a sweep whose result.json exists (unless forced). Not
    # written when a trial errored, so that the next `run` resumes (and retries) it.
    if not any(r["error"] for r in rows):
        storage.write_json(storage.join(sweep_dir, "result.json"), result)
    return result

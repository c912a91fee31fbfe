"""The command line: ``python -m pipeline <stage> [--config FILE] [dotted.key=value ...]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from pipeline import storage
from pipeline.config import CONFIG_HELP, ConfigError, PipelineConfig, load_config, redact, to_yaml

EPILOG = """overrides: any config key as dotted.key=value, e.g.
  data.source=tf_flowers data.path=../shared/datasets/flower_photos data.image_size=160
Values are read as YAML (64 is an int, 0.1 a float, null is None). Every key: docs/configuration.md."""


def result_file(stage: str, result: dict[str, Any]) -> str | None:
    """Where ``stage`` saved its result (every stage writes its own; the CLI only says where)."""
    if stage in ("teacher", "distill"):
        return storage.join(result["output"], "result.json")
    if stage == "sweep":
        return storage.join(result["sweep_dir"], "result.json")
    if stage == "report":
        return result["files"]["json"]
    return result.get("result_file")


def _run_preprocess(cfg: PipelineConfig, args: argparse.Namespace, force: bool | None = None) -> dict[str, Any]:
    from pipeline.data.preprocess import preprocess

    result = preprocess(cfg, force=args.force if force is None else force)
    sizes = ", ".join(f"{k} {v}" for k, v in result["split_sizes"].items())
    print(f"preprocess: {sizes}; {result['num_skipped']} skipped; shards in {result['shard_dir']}")
    return result


def _print_training(result: dict[str, Any]) -> None:
    if result.get("skipped"):
        return
    scores = result["metrics"]
    heads = "".join(f", {k} {v:.3f}" for k, v in scores.items() if k.startswith("val_top1_"))
    m = result["mlflow"]
    registered = f", registered {m['registered']} ({m['alias']})" if m.get("registered") else ""
    print(f"{result.get('role', result['stage'])}: best epoch {result['best_epoch']}, val_top1 {scores.get('val_top1', float('nan')):.3f}{heads}; "
          f"model in {result['best_checkpoint']}; MLflow run {m['run_id']}{registered}")


def _training_stage(stage: str):
    def run(cfg: PipelineConfig, args: argparse.Namespace) -> dict[str, Any]:
        from pipeline.stages import run_training_stage
        from pipeline.tracking import tracked

        with tracked(cfg, stage) as tracker:
            result = run_training_stage(cfg, stage, tracker, force=args.force)
        _print_training(result)
        return result

    return run


RUN_STAGES = ("preprocess", "teacher", "distill", "sweep")

STAGE_EXAMPLES = {
    "preprocess": "python -m pipeline preprocess --config configs/tf_flowers_deit.yaml data.path=../shared/datasets/flower_photos",
    "teacher": "python -m pipeline teacher --config configs/demo.yaml teacher.epochs=5",
    "label": "python -m pipeline label --config configs/demo.yaml distill.teacher_views=4   # after the teacher",
    "distill": "python -m pipeline distill --config configs/demo.yaml distill.type=hard distill.name=deit-hard",
    "run": "python -m pipeline run --config configs/demo.yaml --force distill",
    "sweep": "python -m pipeline sweep --config configs/demo.yaml   # after `run`: it needs the teacher",
    "report": "python -m pipeline report --config configs/demo.yaml",
}


def _run_label(cfg: PipelineConfig, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.label import run_label_stage
    from pipeline.tracking import tracked

    with tracked(cfg, "label") as tracker:
        result = run_label_stage(cfg, tracker, force=args.force)
    print(f"label: {result['num_views']} views of {result['images']} training images; store {result['store']}")
    return result


def _run_all(cfg: PipelineConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Every stage in order; each one is skipped when its output for the same fingerprint exists.

    A retrained teacher gets a new checkpoint id, which changes the students' fingerprints, so they
    follow. (Forced preprocessing rebuilds identical shards at the same path: nothing after it reruns.)
    """
    from pipeline.stages import run_training_stage
    from pipeline.tracking import tracked

    if "all" in args.force:
        forced = set(RUN_STAGES) if cfg.tune.in_run else set(RUN_STAGES) - {"sweep"}
    else:
        forced = set(args.force)
    if "sweep" in forced and not cfg.tune.in_run:
        raise ConfigError("--force sweep: this config runs no sweep in `run`; set tune.in_run=true (and tune.space) to add one")
    if cfg.tune.in_run:
        from pipeline.sweep import validate_space

        validate_space(cfg)  # a bad space must fail now, not after an hour of training
    results: dict[str, Any] = {"stage": "run"}
    results["preprocess"] = _run_preprocess(cfg, args, force="preprocess" in forced)
    with tracked(cfg, "run") as tracker:
        for stage in ("teacher", "distill"):
            results[stage] = run_training_stage(cfg, stage, tracker, force=stage in forced)
            _print_training(results[stage])
        if cfg.distill.baseline and results["distill"]["role"] != "baseline":
            # The same student without a teacher, same budget: what the distilled one is compared with.
            results["baseline"] = run_training_stage(baseline_config(cfg), "distill", tracker, force="distill" in forced)
            _print_training(results["baseline"])
        if cfg.tune.in_run:
            from pipeline.sweep import run_sweep

            results["sweep"] = run_sweep(cfg, tracker, resume="sweep" not in forced, force="sweep" in forced, reuse=True)
        results["mlflow"] = {"tracking_uri": redact(tracker.uri), "experiment": cfg.tracking.experiment,
                             "experiment_id": tracker.experiment_id, "parent_run_id": tracker.parent_id}
    # The run's own summary: what each stage produced (each stage also saved its own result).
    results["result_file"] = storage.join(storage.abspath(cfg.output_dir), "run", "result.json")
    storage.write_text(storage.join(storage.abspath(cfg.output_dir), "run", "config.yaml"), to_yaml(cfg))
    storage.write_json(results["result_file"], results)
    from pipeline.summary import print_run_summary

    print_run_summary(results, args)
    return results


def baseline_config(cfg: PipelineConfig) -> PipelineConfig:
    """``distill.baseline``: the configured student trained on labels alone (``distill.type=none``),
    from its own initialisation (a student that starts from the teacher's weights starts from scratch)."""
    # distill.baseline stays as it was, so that it does not show as a difference between the two runs.
    own_init = "none" if cfg.distill.student_pretrained == "teacher" else cfg.distill.student_pretrained
    d = cfg.distill.model_copy(update={"method": "deit", "type": "none", "name": None, "teacher_views": 0,
                                       "teacher_input_size": None, "student_pretrained": own_init})
    return cfg.model_copy(update={"distill": d})


def _run_sweep(cfg: PipelineConfig, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.sweep import run_sweep, validate_space
    from pipeline.tracking import tracked

    validate_space(cfg)  # before anything starts
    with tracked(cfg, "sweep") as tracker:
        result = run_sweep(cfg, tracker, resume=args.resume and not args.force, force=args.force)
    print(f"sweep: {len(result['trials'])} trials; table {result['table']}; plots {result['plot']}; "
          f"MLflow parent run {result['mlflow']['parent_run_id']} ({result['mlflow']['tracking_uri']})")
    return result


def _run_report(cfg: PipelineConfig, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.report import run_with_config

    return run_with_config(cfg, args)


STAGES: dict[str, tuple[str, Callable[[PipelineConfig, argparse.Namespace], dict[str, Any]]]] = {
    "preprocess": ("decode images with Ray Data into Parquet shards + manifest", _run_preprocess),
    "teacher": ("fine-tune the teacher on Ray Train (TorchTrainer), tracked in MLflow", _training_stage("teacher")),
    "label": ("the teacher's outputs on distill.teacher_views=K recorded views per training image (Ray Data actors)", _run_label),
    "distill": ("distil a student from the teacher (DeiT or function matching; distill.type=none: the baseline) on Ray Train", _training_stage("distill")),
    "run": ("preprocess, teacher, label (if distill.teacher_views), distill, baseline (if distill.baseline), sweep (if tune.in_run) in one go; stages already done are skipped", _run_all),
    "sweep": ("Ray Tune sweep of a training stage over tune.space (ASHA early stopping)", _run_sweep),
    "report": ("compare teacher, baseline and students: top-1, size, CPU latency, agreement (Markdown/CSV/PNG + MLflow)",
               _run_report),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Knowledge distillation of image classifiers on Ray.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (help_text, _) in STAGES.items():
        example = STAGE_EXAMPLES.get(name)
        epilog = f"example:\n  {example}\n\n{EPILOG}" if example else EPILOG
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", "-c", help=CONFIG_HELP)
        p.add_argument("--verbose", "-v", action="store_true",
                       help="also show Ray's own lines: worker output, every report and checkpoint, controller start-up")
        if name == "report":
            from pipeline.report import add_arguments

            add_arguments(p, with_config=False)
        elif name == "run":
            p.add_argument("--force", action="append", default=[], metavar="STAGE", choices=[*RUN_STAGES, "all"],
                           help="redo STAGE (preprocess, teacher, distill, sweep or all) even if its output exists; repeatable")
        else:
            p.add_argument("--force", action="store_true", help="redo this stage even if an output with the same fingerprint exists")
        if name == "sweep":
            p.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    ev = sub.add_parser("evaluate", help="top-1 and per-class accuracy of a model on a class-per-folder tree",
                        description="Top-1 and per-class accuracy of a published model on a class-per-folder tree, as a table "
                                    "(JSON with --json). Images are decoded and fed exactly as in training (meta.json). Exit 2 "
                                    "when the model or the folder cannot be read.",
                        epilog="examples:\n  python -m pipeline evaluate --model outputs/demo/distill/deit-soft/best "
                               "--data outputs/demo/synthetic_source\n"
                               "  python -m pipeline evaluate --model models:/demo-student@baseline --data photos/ --json",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--model", required=True,
                    help="checkpoint directory (e.g. outputs/demo/distill/deit-soft/best), models:/NAME/VERSION, models:/NAME@ALIAS or runs:/ID/PATH")
    ev.add_argument("--data", required=True, help="class-per-folder tree whose folder names are the model's classes")
    pr = sub.add_parser("predict", help="top classes for single images",
                        description="The top classes with probabilities for each image, as a table (JSON with --json); exit 2 "
                                    "if any image could not be read (the others are still answered).",
                        epilog="examples:\n  python -m pipeline predict --model outputs/demo/teacher/best flower.jpg other.png\n"
                               "  python -m pipeline predict --model models:/demo-student@deit-soft --top-k 1 --json *.jpg",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("--model", required=True, help="checkpoint directory, models:/NAME/VERSION, models:/NAME@ALIAS or runs:/ID/PATH")
    pr.add_argument("--top-k", type=int, default=3)
    for p in (ev, pr):
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.add_argument("--tracking-uri", default=None,
                       help="MLflow store of a models:/ or runs:/ model (default: $MLFLOW_TRACKING_URI, else mlflow.db in $PIPELINE_BASE_DIR or the current directory, as the pipeline logs)")
    pr.add_argument("images", nargs="+")
    ms = sub.add_parser("mlflow-server", help="an MLflow tracking server for the runs (loopback only unless --host)",
                        description="Start an MLflow tracking server (SQLite store + artifacts under --store) that runs can "
                                    "log to with tracking.uri=http://127.0.0.1:PORT. It has no authentication.")
    ms.add_argument("--store", default="mlflow-server", help="directory for its SQLite store and artifacts")
    ms.add_argument("--host", default="127.0.0.1",
                    help="interface to bind; the server has no authentication, so keep 127.0.0.1 and tunnel (docs/reliability.md)")
    ms.add_argument("--port", type=int, default=5000)
    return parser


def _model_command(args: argparse.Namespace) -> int:
    """``evaluate`` / ``predict``: JSON on stdout; a bad model or input is one line on stderr, exit 2."""
    from pipeline.checkpoints import CheckpointError
    from pipeline.data.sources import DataError
    from pipeline.evaluate import evaluate_folder, predict_files
    from pipeline.model_store import ModelStoreError

    if args.model.startswith(("models:/", "runs:/")):
        import mlflow

        from pipeline.config import absolute_tracking_uri, base_dir

        mlflow.set_tracking_uri(absolute_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
                                or f"sqlite:///{os.path.join(base_dir(), 'mlflow.db')}")
    try:
        out = evaluate_folder(args.model, args.data) if args.stage == "evaluate" else predict_files(args.model, args.images, args.top_k)
    except (CheckpointError, DataError, ModelStoreError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    if args.json:
        print_json(out)
    else:
        print(_evaluation_table(out) if args.stage == "evaluate" else _prediction_table(out))
    if args.stage == "predict":
        failed = [r for r in out if "error" in r]
        for r in failed:
            print(f"error: {r['path']}: {r['error']}", file=sys.stderr)
        return 2 if failed else 0
    return 0


@contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """`ray job stop` sends SIGTERM, then SIGKILL a few seconds later: turn the first into SystemExit
    so that MLflow runs are closed as KILLED and Ray tears the trainer down, instead of dying mid-call."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage in ("evaluate", "predict"):
        return _model_command(args)
    if args.stage == "mlflow-server":
        from pipeline.servers import mlflow_server_command

        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: MLflow listens on {args.host} without authentication; anyone who reaches it can read and delete runs",
                  file=sys.stderr)
        from pipeline.servers import server_url

        store = os.path.abspath(os.path.expanduser(args.store))
        os.makedirs(store, exist_ok=True)
        cmd = mlflow_server_command(store, args.host, args.port)
        url = server_url(args.host, args.port)
        print(f"MLflow server: {url} (store {store}); runs log to it with tracking.uri={url}", file=sys.stderr)
        os.execv(cmd[0], cmd)
    from pipeline.checkpoints import CheckpointError
    from pipeline.data.sources import DataError

    from pipeline.config import BASE_DIR_ENV, base_dir, in_job_working_dir_copy
    from pipeline.console import set_verbose

    set_verbose(args.verbose)

    if in_job_working_dir_copy() and not os.environ.get(BASE_DIR_ENV):
        print(f"note: running in a Ray job's temporary copy of the working directory; relative paths (output_dir, data.path, "
              f"the MLflow store) resolve against {base_dir()}. Set {BASE_DIR_ENV} or give absolute paths to choose.", file=sys.stderr)
    try:
        cfg = load_config(args.config, args.overrides)
        from pipeline.preflight import check_output_location

        check_output_location(cfg)  # fails now, not at a checkpoint
        with _exit_on_sigterm():
            result = STAGES[args.stage][1](cfg, args)
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except ValueError as exc:
        from pipeline.report import ReportError  # imported here: they pull in torch
        from pipeline.train.loop import TrainingDiverged

        if not isinstance(exc, (ReportError, TrainingDiverged)):
            raise
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    path = result_file(args.stage, result)
    if path and storage.exists(path):
        print(f"{args.stage}: result in {path}")
    return 0


def _evaluation_table(report: dict[str, Any]) -> str:
    lines = [f"{report['model']} on {report['data']}: top-1 {report['top1']:.3f} on {report['count']} images"
             + "".join(f", {k} {v:.3f}" for k, v in report.items() if k.startswith("top1_"))]
    width = max(len(name) for name in report["per_class"])
    counts = {name: sum(row) for name, row in zip(report["class_names"], report["confusion"])}
    lines += [f"  {name.ljust(width)}  {'-' if acc is None else f'{acc:.3f}'}  ({counts.get(name, 0)} images)"
              for name, acc in report["per_class"].items()]
    if report.get("skipped"):
        lines.append(f"  {len(report['skipped'])} unreadable file(s) skipped, e.g. {report['skipped'][0]['path']}")
    return "\n".join(lines)


def _prediction_table(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['path']}: unreadable")
        else:
            lines.append(f"{r['path']}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"]))
    return "\n".join(lines)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))

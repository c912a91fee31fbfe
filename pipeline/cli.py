"""The command line: ``python -m pipeline <stage> [--config FILE] [dotted.key=value ...]``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from pipeline import storage
from pipeline.config import ConfigError, PipelineConfig, load_config, to_yaml

EPILOG = """overrides: any config key as dotted.key=value, e.g.
  data.source=tf_flowers data.path=../shared/datasets/flower_photos data.image_size=160
Values are read as YAML (64 is an int, 0.1 a float, null is None). See README for every key."""


def write_stage_result(cfg: PipelineConfig, stage: str, result: dict[str, Any]) -> str:
    """Save ``result.json`` and the resolved config under ``<output_dir>/<stage>/``."""
    stage_dir = storage.join(cfg.output_dir, stage)
    storage.write_text(storage.join(stage_dir, "config.yaml"), to_yaml(cfg))
    path = storage.join(stage_dir, "result.json")
    storage.write_json(path, result)
    return path


def _run_preprocess(cfg: PipelineConfig, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.data.preprocess import preprocess

    result = preprocess(cfg, force=args.force)
    sizes = ", ".join(f"{k} {v}" for k, v in result["split_sizes"].items())
    print(f"preprocess: {sizes}; {result['num_skipped']} skipped; shards in {result['shard_dir']}")
    return result


def _print_training(result: dict[str, Any]) -> None:
    ev = result["evaluation"].get("val", {})
    heads = "".join(f", {k} {v:.3f}" for k, v in ev.items() if k.startswith("top1_"))
    print(f"{result['stage']}: best epoch {result['best_epoch']}, val top-1 {ev.get('top1', float('nan')):.3f}{heads}; "
          f"model in {result['best_checkpoint']}; MLflow run {result['mlflow']['run_id']} ({result['mlflow']['tracking_uri']})")


def _training_stage(stage: str):
    def run(cfg: PipelineConfig, args: argparse.Namespace) -> dict[str, Any]:
        from pipeline.stages import run_training_stage
        from pipeline.tracking import tracked

        with tracked(cfg, stage) as tracker:
            result = run_training_stage(cfg, stage, tracker, force=args.force)
        _print_training(result)
        return result

    return run


def _run_all(cfg: PipelineConfig, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.stages import run_training_stage
    from pipeline.tracking import tracked

    results: dict[str, Any] = {"stage": "run"}
    results["preprocess"] = _run_preprocess(cfg, args)
    write_stage_result(cfg, "preprocess", results["preprocess"])
    with tracked(cfg, "run") as tracker:
        for stage in ("teacher", "distill"):
            results[stage] = run_training_stage(cfg, stage, tracker, force=args.force)
            write_stage_result(cfg, stage, results[stage])
            _print_training(results[stage])
    return results


def _run_sweep(cfg: PipelineConfig, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.sweep import run_sweep, validate_space
    from pipeline.tracking import tracked

    validate_space(cfg)  # before anything starts
    with tracked(cfg, "sweep") as tracker:
        result = run_sweep(cfg, tracker, resume=args.resume)
    print(f"sweep: {len(result['trials'])} trials; table {result['table']}; plots {result['plot']}; "
          f"MLflow parent run {result['mlflow']['parent_run_id']} ({result['mlflow']['tracking_uri']})")
    return result


STAGES: dict[str, tuple[str, Callable[[PipelineConfig, argparse.Namespace], dict[str, Any]]]] = {
    "preprocess": ("decode images with Ray Data into Parquet shards + manifest", _run_preprocess),
    "teacher": ("fine-tune the teacher on Ray Train (TorchTrainer), tracked in MLflow", _training_stage("teacher")),
    "distill": ("distil a student from the teacher (distill.method=deit) on Ray Train", _training_stage("distill")),
    "run": ("preprocess, teacher and distill in one go (one MLflow parent run)", _run_all),
    "sweep": ("Ray Tune sweep of a training stage over tune.space (ASHA early stopping)", _run_sweep),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Knowledge distillation of image classifiers on Ray.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (help_text, _) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", "-c", help="YAML preset (e.g. configs/demo.yaml); defaults: the embedded demo")
        p.add_argument("--force", action="store_true", help="rebuild outputs even if identical ones exist")
        if name == "sweep":
            p.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    ev = sub.add_parser("evaluate", help="top-1 and per-class accuracy of a model on a class-per-folder tree (JSON)")
    ev.add_argument("--model", required=True, help="checkpoint directory (e.g. outputs/demo/distill/best) or models:/NAME/VERSION")
    ev.add_argument("--data", required=True, help="class-per-folder tree whose folder names are the model's classes")
    pr = sub.add_parser("predict", help="top classes for single images (JSON)")
    pr.add_argument("--model", required=True, help="checkpoint directory or models:/NAME/VERSION")
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("images", nargs="+")
    return parser


def _model_command(args: argparse.Namespace) -> int:
    from pipeline.checkpoints import CheckpointError
    from pipeline.data.sources import DataError
    from pipeline.evaluate import evaluate_folder, predict_files

    try:
        out = evaluate_folder(args.model, args.data) if args.stage == "evaluate" else predict_files(args.model, args.images, args.top_k)
    except (CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_json(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage in ("evaluate", "predict"):
        return _model_command(args)
    from pipeline.checkpoints import CheckpointError
    from pipeline.data.sources import DataError

    try:
        cfg = load_config(args.config, args.overrides)
        result = STAGES[args.stage][1](cfg, args)
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = write_stage_result(cfg, args.stage, result)
    print(f"{args.stage}: result in {path}")
    return 0


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))

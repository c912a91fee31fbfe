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


STAGES: dict[str, tuple[str, Callable[[PipelineConfig, argparse.Namespace], dict[str, Any]]]] = {
    "preprocess": ("decode images with Ray Data into Parquet shards + manifest", _run_preprocess),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Knowledge distillation of image classifiers on Ray.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (help_text, _) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", "-c", help="YAML preset (e.g. configs/demo.yaml); defaults: the embedded demo")
        p.add_argument("--force", action="store_true", help="rebuild outputs even if identical ones exist")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.data.sources import DataError

    try:
        cfg = load_config(args.config, args.overrides)
        result = STAGES[args.stage][1](cfg, args)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = write_stage_result(cfg, args.stage, result)
    print(f"{args.stage}: result in {path}")
    return 0


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))

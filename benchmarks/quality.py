"""The quality protocol: is a distilled student better than the same student trained alone?

    python benchmarks/quality.py --out DIR [--photos ../shared/datasets/flower_photos]
                                 [--students resnet10t,deit_tiny,lite0,lite0_scratch] [key=value ...]

On the real tf_flowers photos with the default split (2,810 train / 309 val), from one preset
(``configs/quality.yaml``):

1. preprocess the photos once (Ray Data -> Parquet shards);
2. fine-tune the teacher (EfficientNet-Lite2 from its package weights, 224 px);
3. label: the teacher's logits on K recorded views of every training image, once for all students;
4. for each student architecture, two runs with the same epochs, augmentation and seed: alone
   (labels only) and distilled (labels + the replayed teacher views; ``lite0_scratch`` also starts
   the distilled Lite0 from the teacher's weights by weight selection, while its baseline starts
   from scratch);
5. the report stage measures every model (val top-1, params, CPU latency, agreement with the
   teacher) and logs it to MLflow; this script adds the 95 % interval and the training time, prints
   the table and writes ``DIR/quality.md`` and ``DIR/quality.json`` (one entry per trained model:
   role, arch, distilled, pretrained, val_top1, model = its published checkpoint directory; each
   distilled entry also has ``paired_vs_alone``: the val images only it, or only its baseline, got
   right, and the exact McNemar p-value of that split).

Every stage is cached by its fingerprint: a rerun with the same settings only re-measures. Overrides
(``key=value``) apply to every run, after the per-student settings below.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quality.yaml")


@dataclass(frozen=True)
class Student:
    """One architecture of the protocol: settings shared by both runs, and what distillation adds."""

    key: str
    pretrained: bool
    common: list[str]
    distill: list[str] = field(default_factory=list)


# Chosen by measurement on the photos (README, "Model quality"); the preset holds what they share.
STUDENTS = {
    "resnet10t": Student("resnet10t", False, ["distill.student=resnet10t", "distill.epochs=15"],
                         ["distill.type=soft", "distill.alpha=0.5", "distill.temperature=4.0"]),
    "deit_tiny": Student("deit_tiny", False, ["distill.student=deit_tiny_distilled_patch16_224", "distill.epochs=15",
                                              "distill.lr=0.001", "distill.drop_path=0.1"],
                         ["distill.type=hard", "distill.alpha=0.5"]),
    "lite0": Student("lite0", True, ["distill.student=tf_efficientnet_lite0", "distill.student_pretrained=package",
                                     "distill.epochs=8", "distill.lr=0.001", "distill.weight_decay=0.0001",
                                     "distill.warmup_epochs=0.5"],
                     ["distill.type=soft", "distill.alpha=0.9", "distill.temperature=4.0"]),
    # The same Lite0 architecture without ImageNet weights of its own: alone it starts from scratch;
    # distilled it starts from the teacher's weights (weight selection) and learns from its views.
    "lite0_scratch": Student("lite0_scratch", False, ["distill.student=tf_efficientnet_lite0", "distill.epochs=10"],
                             ["distill.student_pretrained=teacher", "distill.type=soft", "distill.alpha=0.5",
                              "distill.temperature=2.0"]),
}


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion ``correct / n``."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar p-value: how likely a split of the discordant images at least this
    lopsided is when both models are equally good (each discordant image a fair coin)."""
    from scipy.stats import binomtest

    n = only_first + only_second
    return 1.0 if n == 0 else float(binomtest(only_first, n, 0.5).pvalue)


def paired(first: dict, second: dict) -> dict | None:
    """Two models on the same val images: how many each got right where the other did not, and the
    McNemar p-value; None when their val images differ."""
    if first["paths"] != second["paths"]:
        return None
    a, b = first["correct"], second["correct"]
    only_first, only_second = int((a & ~b).sum()), int((~a & b).sum())
    return {"only_distilled_right": only_first, "only_alone_right": only_second,
            "p_value": mcnemar_p(only_first, only_second)}


def _train_seconds(result: dict) -> float:
    """Seconds spent in training epochs (evaluation included, Ray start-up and publishing not)."""
    return float(sum(h.get("epoch_time_s", 0.0) for h in result.get("history", [])))


def run_protocol(out: str, photos: str, students: list[str], overrides: list[str], preset: str = PRESET,
                 log=print) -> dict:
    """Train and measure everything; returns {"entries": [...], "label_s": ..., "report": ...}."""
    from pipeline.config import load_config
    from pipeline.data.preprocess import preprocess
    from pipeline.report import build_report
    from pipeline.stages import run_training_stage
    from pipeline.tracking import tracked

    out = os.path.abspath(out)
    base = [f"output_dir={out}", f"data.path={os.path.abspath(photos)}", f"tracking.uri=sqlite:///{out}/mlflow.db"]
    cfg = load_config(preset, base + overrides)
    shard_dir = preprocess(cfg, log=log)["shard_dir"]
    runs: list[tuple[str, Student | None, bool, dict]] = []
    with tracked(cfg, "quality") as tracker:
        t0 = time.perf_counter()
        teacher = run_training_stage(cfg, "teacher", tracker, log=log, shard_dir=shard_dir)
        runs.append(("teacher", None, False, {**teacher, "stage_s": time.perf_counter() - t0, "init": cfg.teacher.pretrained}))
        label_s = None
        for key in students:
            student = STUDENTS[key]
            for distilled in (False, True):
                role = f"{key}-{'distilled' if distilled else 'alone'}"
                extra = student.distill if distilled else ["distill.type=none"]
                scfg = load_config(preset, base + student.common + extra + [f"distill.name={role}"] + overrides)
                t0 = time.perf_counter()
                result = run_training_stage(scfg, "distill", tracker, log=log, shard_dir=shard_dir)
                # The student's own time: without the label step its stage built (or found) first.
                stage_s = time.perf_counter() - t0 - (result.get("label_seconds") or 0.0)
                if distilled and label_s is None and scfg.distill.teacher_views:
                    label_s = _label_seconds(scfg, shard_dir)
                runs.append((role, student, distilled, {**result, "stage_s": stage_s,
                                                        "init": scfg.distill.student_pretrained}))
    report = build_report(tracker.uri, cfg.tracking.experiment, out, log=log)
    measured = {row["role"]: row for row in report["rows"]}
    entries = []
    for role, student, distilled, result in runs:
        row = measured.get(role, {})
        n = row.get("val_count") or result["metrics"]["val_count"]
        top1 = row.get("val_top1", result["metrics"]["val_top1"])
        low, high = wilson_interval(round(top1 * n), n)
        entries.append({
            "role": role, "arch": row.get("arch") or result.get("arch"), "distilled": distilled,
            "pretrained": True if student is None else student.pretrained, "init": _INIT.get(result["init"], result["init"]),
            "val_top1": top1,
            "val_top1_ci95": [low, high], "val_count": n, "val_agreement": row.get("val_agreement"),
            "train_s": _train_seconds(result), "stage_s": None if result.get("skipped") else result["stage_s"],
            "epochs": len(result.get("history", [])), "params_m": row.get("params_m"), "latency_ms": row.get("latency_ms"),
            "model": result["best_checkpoint"], "mlflow_run_id": result["mlflow"]["run_id"],
        })
    per_image = report["per_image"]
    for e in entries:
        alone = e["role"].replace("-distilled", "-alone")
        if e["distilled"] and e["role"] in per_image and alone in per_image:
            e["paired_vs_alone"] = paired(per_image[e["role"]], per_image[alone])
    return {"entries": entries, "label_s": label_s, "report": report}


def _label_seconds(cfg, shard_dir: str) -> float | None:
    """How long the one teacher pass that every distilled student shares took to build (its
    manifest records it, so a reused store reports its build too); None if the store is gone."""
    from pipeline import storage
    from pipeline.label import views_path
    from pipeline.plan import teacher_identity, teacher_source

    src = teacher_source(cfg)
    manifest = storage.join(views_path(cfg, shard_dir, teacher_identity(src)), "manifest.json")
    return float(storage.read_json(manifest)["seconds"]) if storage.is_file(manifest) else None


# How a model's weights start: its own ImageNet weights, random, or selected from the teacher's.
_INIT = {"package": "ImageNet", "hub": "ImageNet", "none": "scratch", "teacher": "teacher weights"}


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _num(v: float | None, decimals: int) -> str:
    return "—" if v is None else f"{v:.{decimals}f}"


def markdown(result: dict) -> str:
    """The table, plus the gain of each distilled student over the same architecture alone."""
    lines = ["| model | arch | init | distilled | val top-1 % [95 % CI] | agreement w/ teacher % | epochs | train s "
             "| params M | CPU ms/img |", "|" + "---|" * 10]
    for e in result["entries"]:
        low, high = e["val_top1_ci95"]
        lines.append(f"| {e['role']} | {e['arch']} | {e['init']} | {'yes' if e['distilled'] else 'no'} "
                     f"| {_pct(e['val_top1'])} [{_pct(low)}, {_pct(high)}] | {_pct(e['val_agreement'])} | {e['epochs']} "
                     f"| {e['train_s']:.0f} | {_num(e['params_m'], 2)} | {_num(e['latency_ms'], 1)} |")
    by_role = {e["role"]: e for e in result["entries"]}
    gains = []
    for e in result["entries"]:
        if e["distilled"] and e["role"].replace("-distilled", "-alone") in by_role:
            alone = by_role[e["role"].replace("-distilled", "-alone")]
            pair = e.get("paired_vs_alone")
            evidence = (f" (right only when distilled: {pair['only_distilled_right']} images, only alone: "
                        f"{pair['only_alone_right']}; exact McNemar p = {pair['p_value']:.3g})" if pair else "")
            gains.append(f"- {e['role']}: {100 * (e['val_top1'] - alone['val_top1']):+.1f} points over {alone['role']}{evidence}")
    text = "\n".join(lines) + "\n"
    if result.get("label_s") is not None:
        text += f"\nLabel step (teacher views, shared by every distilled student): {result['label_s']:.0f} s to build.\n"
    if gains:
        text += ("\nDistillation gain (val top-1; a p-value under 0.05 says the two differ beyond chance on these "
                 "images):\n" + "\n".join(gains) + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory (shards, models, MLflow store, quality.json)")
    parser.add_argument("--photos", default="../shared/datasets/flower_photos", help="a tf_flowers flower_photos/ directory")
    parser.add_argument("--students", default=",".join(STUDENTS), help=f"comma-separated, from {', '.join(STUDENTS)}")
    parser.add_argument("--preset", default=PRESET, help="the protocol's config preset")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every run")
    args = parser.parse_args(argv)
    students = [s for s in args.students.split(",") if s]
    unknown = [s for s in students if s not in STUDENTS]
    if unknown:
        parser.error(f"unknown student(s) {unknown}; choose from {', '.join(STUDENTS)}")
    t0 = time.perf_counter()
    result = run_protocol(args.out, args.photos, students, args.overrides, args.preset)
    table = markdown(result) + f"\nWhole protocol: {time.perf_counter() - t0:.0f} s on {os.cpu_count()} CPUs.\n"
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(result["entries"], f, indent=2)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(table)
    report_run = result["report"]["mlflow"]["run_id"]
    if report_run:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(result["report"]["mlflow"]["tracking_uri"])
        for name in ("quality.md", "quality.json"):
            client.log_artifact(report_run, os.path.join(args.out, name))
    print(table)
    print(f"quality: {os.path.join(args.out, 'quality.json')}, {os.path.join(args.out, 'quality.md')}; "
          f"MLflow report run {report_run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

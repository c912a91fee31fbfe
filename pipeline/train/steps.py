"""What differs between training stages: the model, the trainable parameters, the inputs, the step
and the evaluation outputs. Each step returns a dict of named tensors; logging happens outside."""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import checkpoints, losses, storage
from pipeline.config import OptimConfig, PipelineConfig
from pipeline.data import augment
from pipeline.data.batches import batch_for_training
from pipeline.models import build_student, build_teacher, has_distillation_head, head_logits, prefers_channels_last
from pipeline.plan import StageKind, StagePlan
from pipeline.train.view_files import ViewsByFile


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@dataclass
class TrainBatch:
    """One training step's share of this worker's data: the rows ``idx`` of its stored uint8 images.
    Each task turns them into its own inputs (an augmented batch, a recorded view, a mixed-up pair)."""

    images: torch.Tensor  # (N, H, W, C) uint8, this worker's part of the split, on its device
    labels: torch.Tensor
    idx: torch.Tensor
    generator: torch.Generator | None
    channels_last: bool = False
    # The rows' positions in the part the task was bound to (bind_train_part): ``idx`` in memory
    # mode; in stream mode, where ``images`` is the streamed batch, their row numbers in the split.
    rows: torch.Tensor | None = None

    @property
    def targets(self) -> torch.Tensor:
        return self.labels[self.idx]

    @property
    def part_rows(self) -> torch.Tensor:
        return self.idx if self.rows is None else self.rows


class Task(ABC):
    """What the loop drives; one subclass per :class:`~pipeline.plan.StageKind` (see :data:`TASKS`).

    A task owns its model and everything that differs between stages: the trainable parameters,
    the inputs of a step, the step itself (a dict of named tensors: ``loss``, ``logits``, optional
    ``target`` and ``loss_*`` parts) and the outputs evaluated on validation images.
    """

    def __init__(self, cfg: PipelineConfig, plan: StagePlan, manifest: dict[str, Any]):
        self.cfg, self.plan = cfg, plan
        self.opt_cfg: OptimConfig = plan.section(cfg)
        self.tcfg = plan.train_config(cfg)
        self.crop = self.tcfg.crop_size or manifest["image_size"]
        self.model: nn.Module
        self.meta: dict[str, Any]
        self.mean: list[float]
        self.std: list[float]

    #: whether :meth:`eval_kl` gives the distillation loss (validation then reports ``val_kl``)
    reports_kl = False

    @abstractmethod
    def train_step(self, model: nn.Module, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Forward and loss for one batch (the loop does backward and the optimiser step)."""

    @abstractmethod
    def eval_outputs(self, model: nn.Module, x: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``logits`` (and per-head ``logits_*``, ``teacher``) for an evaluation batch; ``rows``: the
        batch's positions in this worker's validation part (see :meth:`bind_val_part`)."""

    def eval_kl(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor | None:
        """The distillation loss on un-mixed validation images, for tasks trained on it."""
        return None

    def augmented(self, batch: TrainBatch) -> torch.Tensor:
        """The training batch under ``train.augment``, normalised the model's way."""
        return batch_for_training(batch.images, batch.idx, self.tcfg, self.crop, self.mean, self.std, batch.generator,
                                  batch.channels_last)

    def optimizer_target(self, model: nn.Module):
        return unwrap(model)

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()

    def bind_train_part(self, paths: list[str], device: torch.device, rows: tuple[int, int] | None = None,
                        streamed: bool = False) -> None:
        """Called once with this worker's training rows (paths in row order); ``rows``: their range
        ``[start, stop)`` in the split when the part is one contiguous range (memory mode);
        ``streamed``: ``paths`` is the whole split, and batches will name their rows in it (stream mode)."""

    def bind_val_part(self, paths: list[str], device: torch.device) -> None:
        """Called once with this worker's validation rows (paths in row order)."""

    def start_epoch(self, epoch: int) -> None:
        """Called before every epoch (0-based)."""


class FrozenTeacher:
    """A published teacher, frozen and in eval mode, fed from the student's normalisation."""

    def __init__(self, source: str, device: torch.device, student_mean, student_std):
        # Outside DDP and outside the student's checkpoints: frozen, eval mode, no grad.
        self.model, self.meta = checkpoints.load_model(source, device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        if prefers_channels_last(self.model, device):
            self.model = self.model.to(memory_format=torch.channels_last)
        self.mean, self.std = self.meta["mean"], self.meta["std"]
        self.student_mean, self.student_std = student_mean, student_std
        self.input_size = int(self.meta["input_size"])

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits for a batch normalised the student's way."""
        xt = augment.renormalize(x, self.student_mean, self.student_std, self.mean, self.std)
        return self.model(xt).float()


def _trainable_groups(model: nn.Module, keep: int) -> list[str]:
    """Module names in the last ``keep`` block groups of a timm model (its coarse ``group_matcher``;
    the last group is the classifier)."""
    from timm.models import group_modules

    groups = group_modules(model, model.group_matcher(coarse=True))
    ordered = [groups[k] for k in sorted(groups)]
    return [name for group in ordered[-keep:] for name in group]


class TeacherTask(Task):
    """Fine-tune an ImageNet model: a new head on a frozen backbone, the last block groups too
    (``partial``), or everything (``full``)."""

    def __init__(self, cfg: PipelineConfig, plan: StagePlan, manifest: dict[str, Any], device: torch.device):
        super().__init__(cfg, plan, manifest)
        t = cfg.teacher
        self.model, self.meta = build_teacher(t.model, t.pretrained, manifest["num_classes"])
        self.mode = t.mode
        self.frozen: list[nn.Module] = []
        if t.mode != "full":
            for p in self.model.parameters():
                p.requires_grad_(False)
            trained = [self.model.get_classifier()]
            if t.mode == "partial":
                # +1: the classifier is the last group.
                names = set(_trainable_groups(self.model, t.train_blocks + 1))
                trained += [m for name, m in self.model.named_modules() if name in names]
            for module in trained:
                for p in module.parameters():
                    p.requires_grad_(True)
            # Frozen layers keep their BatchNorm statistics (Keras' trainable=False); not timm's freeze(),
            # which swaps in FrozenBatchNorm2d and so changes the state dict the loader rebuilds.
            self.frozen = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                           and not any(p.requires_grad for p in m.parameters())]
        self.mean, self.std = self.meta["mean"], self.meta["std"]

    def optimizer_target(self, model: nn.Module):
        """What ``create_optimizer_v2`` gets: the trainable parameters, the backbone's at a lower lr."""
        m = unwrap(model)
        head = {id(p) for p in m.get_classifier().parameters()}
        trainable = [p for p in m.parameters() if p.requires_grad]
        backbone = [p for p in trainable if id(p) not in head]
        if not backbone:
            return m.get_classifier()
        # timm's schedulers multiply each group's lr by its lr_scale.
        return [
            {"params": backbone, "lr_scale": self.opt_cfg.backbone_lr_scale},
            {"params": [p for p in trainable if id(p) in head], "lr_scale": 1.0},
        ]

    def set_train_mode(self, model: nn.Module) -> None:
        if self.mode == "head":
            model.eval()  # a frozen backbone and its head exactly as at inference (Keras' trainable=False)
            return
        model.train()
        for bn in self.frozen:
            bn.eval()

    def train_step(self, model: nn.Module, batch: TrainBatch) -> dict[str, torch.Tensor]:
        logits = model(self.augmented(batch))
        loss = F.cross_entropy(logits, batch.targets, label_smoothing=self.opt_cfg.label_smoothing)
        return {"loss": loss, "logits": logits.detach()}

    @torch.no_grad()
    def eval_outputs(self, model: nn.Module, x: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"logits": unwrap(model)(x)}


def build_stage_student(cfg: PipelineConfig, plan: StagePlan, num_classes: int, crop: int) -> tuple[nn.Module, dict[str, Any]]:
    """The distillation stage's student: as ``distill.student_pretrained`` says, or with
    ``teacher`` started from the teacher's own weights by weight selection (then it also takes the
    teacher's input normalisation, which those weights expect)."""
    d = cfg.distill
    if not plan.init_from_teacher:
        return build_student(d.student, d.student_pretrained, num_classes, crop, d.drop_path)
    from pipeline.weight_selection import WeightSelectionError, select_weights

    model, meta = build_student(d.student, "none", num_classes, crop, d.drop_path)
    teacher, tmeta = checkpoints.load_model(plan.teacher, "cpu")
    teacher_classes = getattr(teacher, "num_classes", num_classes)
    if teacher_classes != num_classes:
        raise ValueError(f"distill.student_pretrained=teacher: the teacher has {teacher_classes} classes, the data {num_classes}")
    try:
        select_weights(teacher.state_dict(), model)
    except WeightSelectionError as exc:
        raise ValueError(f"distill.student_pretrained=teacher: {d.student} cannot start from {tmeta['arch']}: {exc}") from None
    return model, {**meta, "mean": list(tmeta["mean"]), "std": list(tmeta["std"]), "init": f"teacher:{tmeta['arch']}"}


class TeacherViews:
    """Recorded views (crop box and flip per image and view) with the teacher's logits on each,
    written by :mod:`pipeline.label`; a worker reads and keeps only the rows of its own part."""

    def __init__(self, path: str):
        from pipeline import storage
        from pipeline.label import load_views

        self.path = path
        try:
            self.manifest = manifest = storage.read_json(storage.join(path, "manifest.json"))
            self.pairs = manifest.get("mixup_pairs")
            self.num_views, self.num_classes = int(manifest["num_views"]), int(manifest["num_classes"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            load_views(path, [])  # raises the store's own error, saying what is wrong and how to rebuild
            raise
        self.val_paths: list[str] | None = None
        self.val_logits = None
        self.part: tuple[torch.Tensor, torch.Tensor, Any] | None = None
        self.part_pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.by_file: ViewsByFile | None = None
        self.val_part = None

    def _load(self, train_paths: list[str], rows: tuple[int, int] | None):
        from pipeline.label import load_views

        store = load_views(self.path, train_paths, rows)
        self.val_paths, self.val_logits = store.val_paths, store.val_logits
        return store

    def bind(self, paths: list[str], device: torch.device, span: tuple[int, int] | None = None,
             streamed: bool = False) -> None:
        """Keep the views of the training images ``paths`` (``span``: their rows ``[start, stop)`` in
        the split, when contiguous, so that only the store's files holding them are read).
        ``streamed``: ``paths`` is the whole split, whose rows stream mode's batches name; the views
        are then read file by file as batches need them (:mod:`pipeline.train.view_files`), where
        the store allows it."""
        if streamed:
            from pipeline.label import check_files

            self.by_file = ViewsByFile.for_store(self.path, self.manifest, paths)
            if self.by_file is not None:
                check_files(self.path, self.manifest)
                return
        store = self._load(paths, span)
        row = {p: i for i, p in enumerate(store.paths)}
        missing = [p for p in paths if p not in row]
        if missing:
            raise ValueError(f"the teacher views lack {len(missing)} training images (e.g. {missing[0]}); rebuild them with --force")
        rows = torch.tensor([row[p] for p in paths], dtype=torch.long)
        self.part = (store.boxes[rows].to(device), store.flips[rows].to(device), store.logits[rows].to(device))
        if store.partners is not None:
            # each bound row's partner per view, as a position in this worker's part (the store
            # read only this part's images, so every partner is among them)
            at = torch.empty(len(store.paths), dtype=torch.long)
            at[rows] = torch.arange(len(rows))
            self.part_pairs = (at[store.partners[rows]].to(device), store.lams[rows].to(device))

    def pair(self, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """View ``k``'s mixup partners (positions in the bound part) and lambdas of the bound rows ``idx``."""
        partners, lams = self.part_pairs
        at = idx.to(partners.device)
        return partners[at, k].to(idx.device), lams[at, k].to(idx.device)

    def bind_val(self, paths: list[str], device: torch.device) -> None:
        if self.val_paths is None:
            self._load([], (0, 0))  # no training rows: only the files of validation rows are read
        row = {p: i for i, p in enumerate(self.val_paths)}
        missing = [p for p in paths if p not in row]
        if missing:
            raise ValueError(f"the teacher views lack {len(missing)} validation images (e.g. {missing[0]}); rebuild them with --force")
        self.val_part = self.val_logits[torch.tensor([row[p] for p in paths], dtype=torch.long)].to(device)

    def val_outputs(self, rows: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on the bound validation rows (zeros for the blank image a rank
        without validation rows evaluates, so that every rank reports the same metrics)."""
        if self.val_part is None or not len(self.val_part):
            return torch.zeros((len(rows), self.num_classes))
        return self.val_part[rows.to(self.val_part.device)].float()

    def view(self, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """View ``k`` of the bound rows ``idx``, on ``idx``'s device (stream mode binds on the host)."""
        if self.by_file is not None:
            boxes, flips, logits = self.by_file.view(idx, k)
            return boxes.to(idx.device), flips.to(idx.device), logits.to(idx.device)
        boxes, flips, logits = self.part
        at = idx.to(boxes.device)
        return boxes[at, k].to(idx.device), flips[at, k].to(idx.device), logits[at, k].float().to(idx.device)


class DeitTask(Task):
    """DeiT: a student with class and distillation heads learns from labels and the frozen teacher.

    A student without a distillation token uses its one head for both terms (Hinton's KD). With a
    teacher, the task draws each image's view (crop box + flip) itself, so that the teacher can see
    the same box at its own input size; with ``teacher_views`` the views and the teacher's outputs
    are replayed from the label step and no teacher is loaded.
    """

    def __init__(self, cfg: PipelineConfig, plan: StagePlan, manifest: dict[str, Any], device: torch.device):
        super().__init__(cfg, plan, manifest)
        d = cfg.distill
        self.model, self.meta = build_stage_student(cfg, plan, manifest["num_classes"], self.crop)
        self.distilled = has_distillation_head(self.model)
        if self.distilled:
            self.model.set_distilled_training(True)  # training forward returns (cls, dist)
        self.mean, self.std = self.meta["mean"], self.meta["std"]
        self.teacher: FrozenTeacher | None = None
        self.views: TeacherViews | None = None
        if plan.uses_teacher and d.teacher_views:
            if plan.teacher_inputs is None:
                raise ValueError("distill.teacher_views > 0 needs the label step's views")
            self.views = TeacherViews(plan.teacher_inputs)
        elif plan.uses_teacher:
            self.teacher = FrozenTeacher(plan.teacher, device, self.mean, self.std)
        self.teacher_size = d.teacher_input_size or (self.teacher.input_size if self.teacher else self.crop)
        self.epoch = 0

    def bind_train_part(self, paths: list[str], device: torch.device, rows: tuple[int, int] | None = None,
                        streamed: bool = False) -> None:
        if self.views is not None:
            self.views.bind(paths, device, rows, streamed)

    def bind_val_part(self, paths: list[str], device: torch.device) -> None:
        if self.views is not None:
            self.views.bind_val(paths, device)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> dict[str, torch.Tensor]:
        d = self.opt_cfg
        out = model(x)
        cls, dist = out if isinstance(out, tuple) else (out, out)
        parts = losses.deit_loss(cls, dist, y, t, d.type, d.alpha, d.temperature, d.label_smoothing)
        parts["logits"] = ((cls + dist) / 2).detach()
        return parts

    def train_step(self, model: nn.Module, batch: TrainBatch) -> dict[str, torch.Tensor]:
        if self.teacher is None and self.views is None:  # the baseline: labels only
            return self._loss(model, self.augmented(batch), batch.targets, None)
        images, idx, gen, channels_last = batch.images, batch.idx, batch.generator, batch.channels_last
        if self.views is not None:
            boxes, flips, t = self.views.view(batch.part_rows, self.epoch % self.views.num_views)
        else:
            boxes, flips = augment.sample_views(len(idx), images.shape[1], images.shape[2], self.tcfg.augment, self.crop,
                                                tuple(self.tcfg.inception_scale), gen, images.device)
        kind = self.tcfg.augment
        x = augment.render_views(images, idx, boxes, flips, self.crop, self.mean, self.std,
                                 augment.view_mode(kind, self.crop, self.crop), channels_last)
        if self.views is None:
            xt = x if self.teacher_size == self.crop else augment.render_views(
                images, idx, boxes, flips, self.teacher_size, self.mean, self.std,
                augment.view_mode(kind, self.crop, self.teacher_size), channels_last)
            t = self.teacher.logits(xt)
        return self._loss(model, x, batch.targets, t)

    @torch.no_grad()
    def eval_outputs(self, model: nn.Module, x: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = head_logits(unwrap(model), x)
        if self.teacher is not None:
            xt = x if self.teacher_size == self.crop else augment.resize(x, self.teacher_size)
            out["teacher"] = self.teacher.logits(xt)
        elif self.views is not None and rows is not None:  # the label step's output on the same input
            out["teacher"] = self.views.val_outputs(rows).to(x.device)
        return out


@dataclass
class FunMatchInputs:
    """One batch as function matching feeds it: the student's input, the teacher's (None when its
    logits come from the fixed-teacher cache), and how they were drawn."""

    student: torch.Tensor
    teacher: torch.Tensor | None
    student_boxes: torch.Tensor
    teacher_boxes: torch.Tensor | None = None
    mixup_lambda: torch.Tensor | None = None
    cached_logits: torch.Tensor | None = None


class FunMatchTask(Task):
    """Function matching (Beyer et al. 2022): no labels, KL to the teacher at temperature T, on
    inputs chosen by ``distill.teaching``:

    - ``function_matching``: one inception crop + flip per image, then mixup with the rolled batch;
      teacher and student get that exact tensor.
    - ``consistent``: the same crop for both, no mixup.
    - ``independent_noise``: teacher and student get independently drawn crops of the same images.
    - ``fixed_teacher``: the teacher's logits on centre crops, computed once and cached; the student
      sees random crops.

    With ``teacher_views`` (``function_matching`` or ``consistent``) the crops, flips, mixup partners
    and lambdas and the teacher's logits on the result are replayed from the label step, view
    ``epoch mod K``, and no teacher is loaded.
    """

    def __init__(self, cfg: PipelineConfig, plan: StagePlan, manifest: dict[str, Any], device: torch.device):
        super().__init__(cfg, plan, manifest)
        d = cfg.distill
        self.teaching = d.teaching
        self.model, self.meta = build_stage_student(cfg, plan, manifest["num_classes"], self.crop)
        self.mean, self.std = self.meta["mean"], self.meta["std"]
        self.views: TeacherViews | None = None
        self.teacher: FrozenTeacher | None = None
        if d.teacher_views:
            if plan.teacher_inputs is None:
                raise ValueError("distill.teacher_views > 0 needs the label step's views")
            self.views = TeacherViews(plan.teacher_inputs)
        else:
            self.teacher = FrozenTeacher(plan.teacher, device, self.mean, self.std)
        self.epoch = 0
        self.cached: dict[str, torch.Tensor] | None = None
        if self.teaching == "fixed_teacher":
            if plan.teacher_inputs is None:
                raise ValueError("fixed_teacher needs the cached teacher logits")
            cache = torch.load(io.BytesIO(storage.read_bytes(plan.teacher_inputs)), map_location="cpu", weights_only=True)
            self.cached = {"paths": cache["paths"], "logits": cache["logits"]}
        self.part_logits: torch.Tensor | None = None

    def bind_train_part(self, paths: list[str], device: torch.device, rows: tuple[int, int] | None = None,
                        streamed: bool = False) -> None:
        """fixed_teacher: line the cached logits up with this worker's rows of the training split;
        views: the recorded views of those rows."""
        if self.views is not None:
            self.views.bind(paths, device, rows, streamed)
        if self.cached is not None:
            row = {p: i for i, p in enumerate(self.cached["paths"])}
            missing = [p for p in paths if p not in row]
            if missing:
                raise ValueError(f"teacher cache lacks {len(missing)} training images (e.g. {missing[0]}); rebuild it")
            self.part_logits = self.cached["logits"][[row[p] for p in paths]].to(device)

    def bind_val_part(self, paths: list[str], device: torch.device) -> None:
        if self.views is not None:
            self.views.bind_val(paths, device)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    reports_kl = True

    def eval_kl(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        d = self.opt_cfg
        return losses.soft_kl(student_logits, teacher_logits, d.temperature, d.kl_t2_scale)

    def train_inputs(self, batch: TrainBatch) -> FunMatchInputs:
        """What the student and the teacher get for this batch under ``distill.teaching``."""
        if self.views is not None:
            return self._replayed_inputs(batch)
        d, scale, gen = self.opt_cfg, tuple(self.tcfg.inception_scale), batch.generator
        base = augment.to_float(batch.images[batch.idx], self.mean, self.std, batch.channels_last)
        boxes = augment.sample_crop_boxes(len(batch.idx), base.shape[-2], base.shape[-1], scale, generator=gen, device=base.device)
        x = augment.random_flip(augment.crop_resize_boxes(base, boxes, self.crop), gen)
        inputs = FunMatchInputs(student=x, teacher=x, student_boxes=boxes)
        if self.teaching == "function_matching":
            inputs.mixup_lambda = lam = augment.sample_mixup_lambda(gen, base.device, fold=d.mixup_fold)
            # mixed once; both models get this very tensor
            inputs.student = inputs.teacher = augment.mixup_rolled(x, lam, reverse=d.mixup_partner == "reverse")
        elif self.teaching == "independent_noise":
            inputs.teacher_boxes = augment.sample_crop_boxes(len(batch.idx), base.shape[-2], base.shape[-1], scale, generator=gen,
                                                             device=base.device)
            inputs.teacher = augment.random_flip(augment.crop_resize_boxes(base, inputs.teacher_boxes, self.crop), gen)
        elif self.teaching == "fixed_teacher":
            inputs.teacher, inputs.cached_logits = None, self.part_logits[batch.part_rows.to(self.part_logits.device)].to(batch.images.device)
        return inputs

    def _replayed_inputs(self, batch: TrainBatch) -> FunMatchInputs:
        """The recorded view ``epoch mod K`` of each image, mixed with its recorded partner's view."""
        k = self.epoch % self.views.num_views
        boxes, flips, t = self.views.view(batch.part_rows, k)
        x = augment.render_views(batch.images, batch.idx, boxes, flips, self.crop, self.mean, self.std, "box", batch.channels_last)
        inputs = FunMatchInputs(student=x, teacher=None, student_boxes=boxes, cached_logits=t)
        if self.views.part_pairs is not None:
            if batch.rows is not None:
                raise ValueError("function-matching teacher views mix each image with a partner from this worker's part of the "
                                 "split, which stream mode does not hold: set train.data=memory")
            partner, lam = self.views.pair(batch.part_rows, k)
            pboxes, pflips, _ = self.views.view(partner, k)
            xp = augment.render_views(batch.images, partner, pboxes, pflips, self.crop, self.mean, self.std, "box",
                                      batch.channels_last)
            inputs.student, inputs.mixup_lambda = augment.mix(x, xp, lam), lam
        return inputs

    def train_step(self, model: nn.Module, batch: TrainBatch) -> dict[str, torch.Tensor]:
        inputs = self.train_inputs(batch)
        x = inputs.student
        t = inputs.cached_logits if inputs.cached_logits is not None else self.teacher.logits(inputs.teacher)
        s = model(x)
        loss = self.eval_kl(s, t)
        # Labels play no part; "accuracy" on training batches is agreement with the teacher.
        return {"loss": loss, "logits": s.detach(), "target": t.argmax(-1), "loss_kl": loss.detach()}

    @torch.no_grad()
    def eval_outputs(self, model: nn.Module, x: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.views is not None:  # the label step's output on the same input
            teacher = self.views.val_outputs(rows if rows is not None else torch.arange(len(x))).to(x.device)
        else:
            teacher = self.teacher.logits(x)
        return {"logits": unwrap(model)(x), "teacher": teacher}


#: The task class of each stage kind; a new kind adds its class here.
TASKS: dict[StageKind, type[Task]] = {StageKind.TEACHER: TeacherTask, StageKind.DEIT: DeitTask, StageKind.FUNMATCH: FunMatchTask}


def build_task(cfg: PipelineConfig, plan: StagePlan, manifest: dict[str, Any], device: torch.device) -> Task:
    """The task for ``plan``; its ``teacher_inputs`` are the fixed-teacher logits (function matching)
    or the label stage's views (DeiT with ``teacher_views``)."""
    return TASKS[plan.kind](cfg, plan, manifest, device)


def effective_lr(opt_cfg: OptimConfig) -> float:
    """``lr * batch_size / 512`` (DeiT's and the Keras example's scaling rule) when ``scale_lr``."""
    return opt_cfg.lr * opt_cfg.batch_size / 512 if opt_cfg.scale_lr else opt_cfg.lr

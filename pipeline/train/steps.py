"""What differs between training stages: the model, the trainable parameters, the step and the
evaluation outputs. Each step returns a dict of named tensors; logging happens outside."""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import checkpoints, losses, storage
from pipeline.config import OptimConfig, PipelineConfig
from pipeline.data import augment
from pipeline.models import build_student, build_teacher, has_distillation_head


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


class TeacherTask:
    """Fine-tune an ImageNet model: a new head on a frozen backbone, or everything."""

    name = "teacher"

    def __init__(self, cfg: PipelineConfig, manifest: dict[str, Any], device: torch.device):
        self.cfg, self.opt_cfg = cfg, cfg.teacher
        self.model, self.meta = build_teacher(cfg.teacher.model, cfg.teacher.pretrained, manifest["num_classes"])
        self.head_only = cfg.teacher.mode == "head"
        if self.head_only:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in self.model.get_classifier().parameters():
                p.requires_grad_(True)
        self.mean, self.std = self.meta["mean"], self.meta["std"]

    def optimizer_target(self, model: nn.Module):
        """What ``create_optimizer_v2`` gets: the head alone, or the model with a lower backbone lr."""
        if self.head_only:
            return unwrap(model).get_classifier()
        head = {id(p) for p in unwrap(model).get_classifier().parameters()}
        backbone = [p for p in unwrap(model).parameters() if id(p) not in head]
        scale = self.opt_cfg.backbone_lr_scale
        # timm's schedulers multiply each group's lr by its lr_scale.
        return [
            {"params": backbone, "lr_scale": scale},
            {"params": [p for p in unwrap(model).parameters() if id(p) in head], "lr_scale": 1.0},
        ]

    def set_train_mode(self, model: nn.Module) -> None:
        # A frozen backbone keeps its BatchNorm statistics (eval mode), as Keras' trainable=False does.
        model.eval() if self.head_only else model.train()

    def train_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.opt_cfg.label_smoothing)
        return {"loss": loss, "logits": logits.detach()}

    @torch.no_grad()
    def eval_outputs(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": unwrap(model)(x)}


class DeitTask:
    """DeiT: a student with class and distillation heads; the frozen teacher sees the student's batch."""

    name = "distill"

    def __init__(self, cfg: PipelineConfig, manifest: dict[str, Any], device: torch.device, teacher_source: str | None):
        d = cfg.distill
        self.cfg, self.opt_cfg = cfg, d
        crop = cfg.train.crop_size or manifest["image_size"]
        self.model, self.meta = build_student(d.student, d.student_pretrained, manifest["num_classes"], crop, d.drop_path)
        self.distilled = has_distillation_head(self.model)
        if self.distilled:
            self.model.set_distilled_training(True)  # training forward returns (cls, dist)
        self.mean, self.std = self.meta["mean"], self.meta["std"]
        self.teacher = None
        if d.type != "none":
            # Outside DDP and outside the student's checkpoints: frozen, eval mode, no grad.
            self.teacher, tmeta = checkpoints.load_model(teacher_source, device)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self.teacher_mean, self.teacher_std = tmeta["mean"], tmeta["std"]

    def optimizer_target(self, model: nn.Module):
        return unwrap(model)

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        xt = augment.renormalize(x, self.mean, self.std, self.teacher_mean, self.teacher_std)
        with torch.no_grad():
            return self.teacher(xt).float()

    def train_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        d = self.opt_cfg
        out = model(x)
        cls, dist = out if isinstance(out, tuple) else (out, out)
        t = self.teacher_logits(x) if self.teacher is not None else None
        parts = losses.deit_loss(cls, dist, y, t, d.type, d.alpha, d.temperature, d.label_smoothing)
        parts["logits"] = ((cls + dist) / 2).detach()
        return parts

    @torch.no_grad()
    def eval_outputs(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m = unwrap(model)
        out: dict[str, torch.Tensor] = {}
        if self.distilled:
            feats = m.forward_features(x)
            out["logits_cls"] = m.head(feats[:, 0])
            out["logits_dist"] = m.head_dist(feats[:, 1])
            out["logits"] = (out["logits_cls"] + out["logits_dist"]) / 2  # DeiT: the average of both heads
        else:
            out["logits"] = m(x)
        if self.teacher is not None:
            out["teacher"] = self.teacher_logits(x)
        return out


class FunMatchTask:
    """Function matching (Beyer et al. 2022): no labels, KL to the teacher at temperature T, on
    inputs chosen by ``distill.teaching``:

    - ``function_matching``: one inception crop + flip per image, then mixup with the rolled batch;
      teacher and student get that exact tensor.
    - ``consistent``: the same crop for both, no mixup.
    - ``independent_noise``: teacher and student get independently drawn crops of the same images.
    - ``fixed_teacher``: the teacher's logits on centre crops, computed once and cached; the student
      sees random crops.
    """

    name = "distill"

    def __init__(self, cfg: PipelineConfig, manifest: dict[str, Any], device: torch.device, teacher_source: str,
                 teacher_cache: str | None = None):
        d = cfg.distill
        self.cfg, self.opt_cfg, self.teaching = cfg, d, d.teaching
        self.crop = cfg.train.crop_size or manifest["image_size"]
        self.model, self.meta = build_student(d.student, d.student_pretrained, manifest["num_classes"], self.crop, d.drop_path)
        self.mean, self.std = self.meta["mean"], self.meta["std"]
        self.teacher, tmeta = checkpoints.load_model(teacher_source, device)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher_mean, self.teacher_std = tmeta["mean"], tmeta["std"]
        self.cached: dict[str, torch.Tensor] | None = None
        if self.teaching == "fixed_teacher":
            if teacher_cache is None:
                raise ValueError("fixed_teacher needs the cached teacher logits")
            cache = torch.load(io.BytesIO(storage.read_bytes(teacher_cache)), map_location="cpu", weights_only=True)
            self.cached = {"paths": cache["paths"], "logits": cache["logits"]}
        self.part_logits: torch.Tensor | None = None
        self.record: list[dict[str, torch.Tensor]] | None = None  # tests set a list to see what each model got

    def bind_train_part(self, paths: list[str], device: torch.device) -> None:
        """fixed_teacher: line the cached logits up with this worker's rows of the training split."""
        if self.cached is not None:
            row = {p: i for i, p in enumerate(self.cached["paths"])}
            missing = [p for p in paths if p not in row]
            if missing:
                raise ValueError(f"teacher cache lacks {len(missing)} training images (e.g. {missing[0]}); rebuild it")
            self.part_logits = self.cached["logits"][[row[p] for p in paths]].to(device)

    def optimizer_target(self, model: nn.Module):
        return unwrap(model)

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()

    def kl(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        d = self.opt_cfg
        return losses.soft_kl(student_logits, teacher_logits, d.temperature, d.kl_t2_scale)

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        xt = augment.renormalize(x, self.mean, self.std, self.teacher_mean, self.teacher_std)
        with torch.no_grad():
            return self.teacher(xt).float()

    def train_inputs(self, images: torch.Tensor, idx: torch.Tensor, gen: torch.Generator | None, channels_last: bool = False):
        """(student input, teacher input or None, cached teacher logits or None) for rows ``idx``."""
        d, scale = self.opt_cfg, tuple(self.cfg.train.inception_scale)
        base = augment.to_float(images[idx], self.mean, self.std, channels_last)
        boxes = augment.sample_crop_boxes(len(idx), base.shape[-2], base.shape[-1], scale, generator=gen, device=base.device)
        x = augment.random_flip(augment.crop_resize_boxes(base, boxes, self.crop), gen)
        record = {"idx": idx, "student_boxes": boxes}
        x_teacher, cached = x, None
        if self.teaching == "function_matching":
            lam = augment.sample_mixup_lambda(gen, base.device, fold=d.mixup_fold)
            x = augment.mixup_rolled(x, lam, reverse=d.mixup_partner == "reverse")
            x_teacher = x  # mixed once; both models get this very tensor
            record["lambda"] = lam
        elif self.teaching == "independent_noise":
            tboxes = augment.sample_crop_boxes(len(idx), base.shape[-2], base.shape[-1], scale, generator=gen, device=base.device)
            x_teacher = augment.random_flip(augment.crop_resize_boxes(base, tboxes, self.crop), gen)
            record["teacher_boxes"] = tboxes
        elif self.teaching == "fixed_teacher":
            x_teacher, cached = None, self.part_logits[idx]
        if self.record is not None:
            self.record.append({**record, "student_input": x, "teacher_input": x_teacher})
        return x, x_teacher, cached

    def train_step_from(self, model: nn.Module, images: torch.Tensor, idx: torch.Tensor, gen, channels_last: bool) -> dict[str, torch.Tensor]:
        x, x_teacher, cached = self.train_inputs(images, idx, gen, channels_last)
        t = cached if cached is not None else self.teacher_logits(x_teacher)
        s = model(x)
        loss = self.kl(s, t)
        # Labels play no part; "accuracy" on training batches is agreement with the teacher.
        return {"loss": loss, "logits": s.detach(), "target": t.argmax(-1), "loss_kl": loss.detach()}

    @torch.no_grad()
    def eval_outputs(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": unwrap(model)(x), "teacher": self.teacher_logits(x)}


def build_task(stage: str, cfg: PipelineConfig, manifest: dict[str, Any], device: torch.device, teacher_source: str | None = None,
               teacher_cache: str | None = None):
    if stage == "teacher":
        return TeacherTask(cfg, manifest, device)
    if stage == "distill" and cfg.distill.method == "funmatch":
        return FunMatchTask(cfg, manifest, device, teacher_source, teacher_cache)
    if stage == "distill":
        return DeitTask(cfg, manifest, device, teacher_source)
    raise ValueError(f"unknown training stage {stage!r}")


def effective_lr(opt_cfg: OptimConfig) -> float:
    """``lr * batch_size / 512`` (DeiT's and the Keras example's scaling rule) when ``scale_lr``."""
    return opt_cfg.lr * opt_cfg.batch_size / 512 if opt_cfg.scale_lr else opt_cfg.lr

"""What differs between training stages: the model, the trainable parameters, the step and the
evaluation outputs. Each step returns a dict of named tensors; logging happens outside."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import checkpoints, losses
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


def build_task(stage: str, cfg: PipelineConfig, manifest: dict[str, Any], device: torch.device, teacher_source: str | None = None):
    if stage == "teacher":
        return TeacherTask(cfg, manifest, device)
    if stage == "distill":
        return DeitTask(cfg, manifest, device, teacher_source)
    raise ValueError(f"unknown training stage {stage!r}")


def effective_lr(opt_cfg: OptimConfig) -> float:
    """``lr * batch_size / 512`` (DeiT's and the Keras example's scaling rule) when ``scale_lr``."""
    return opt_cfg.lr * opt_cfg.batch_size / 512 if opt_cfg.scale_lr else opt_cfg.lr

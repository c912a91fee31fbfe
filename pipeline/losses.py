"""Distillation losses.

KL normalisation: every KL term here is summed over classes and averaged over the batch
(``reduction="batchmean"``, timm's and PyTorch's convention), i.e. the true per-example KL.
DeiT's reference code instead divides the summed KL by ``B * C`` (``numel``), which makes the
same alpha weigh the distillation term C times less; with 5 flower classes versus ImageNet's 1000
the two conventions differ by a factor that depends on the dataset, so we use the one whose
scale does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, t2_scale: bool = True) -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))``, batch mean, times ``T**2`` if ``t2_scale``.

    The T^2 factor (Hinton et al.) keeps the gradient scale independent of T.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t) if t2_scale else kl


def deit_loss(
    cls_logits: torch.Tensor,
    dist_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    kind: str,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """DeiT's loss for a student with a class head and a distillation head.

    - ``none``:  CE(mean of both heads, y): the same student trained without a teacher (baseline).
    - ``soft``:  (1 - alpha) * CE(cls, y) + alpha * KL(softmax(t / T) || softmax(dist / T)) * T^2.
    - ``hard``:  (1 - alpha) * CE(cls, y) + alpha * CE(dist, argmax t).

    Label smoothing applies to the class head only; the teacher's targets are used as they are.
    Returns the total as ``loss`` plus each term.
    """
    if kind == "none":
        loss = F.cross_entropy((cls_logits + dist_logits) / 2, labels, label_smoothing=label_smoothing)
        return {"loss": loss, "loss_cls": loss.detach(), "loss_dist": torch.zeros((), device=loss.device)}
    if teacher_logits is None:
        raise ValueError(f"distillation type {kind!r} needs teacher logits")
    loss_cls = F.cross_entropy(cls_logits, labels, label_smoothing=label_smoothing)
    if kind == "soft":
        loss_dist = soft_kl(dist_logits, teacher_logits, temperature)
    elif kind == "hard":
        loss_dist = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
    else:
        raise ValueError(f"unknown distillation type {kind!r}; allowed: none, soft, hard")
    loss = (1 - alpha) * loss_cls + alpha * loss_dist
    return {"loss": loss, "loss_cls": loss_cls.detach(), "loss_dist": loss_dist.detach()}

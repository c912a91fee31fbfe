"""Loss formulas against hand computation and against timm's TokenDistillationTask."""

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from pipeline import losses


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_soft_kl_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    for temp in (1.0, 4.0):
        expected = 0.0
        for si, ti in zip(s.numpy(), t.numpy()):
            p, q = _softmax(ti / temp), _softmax(si / temp)
            expected += float(np.sum(p * (np.log(p) - np.log(q))))  # KL(teacher || student)
        expected = expected / 2 * temp**2  # batch mean, times T^2
        assert losses.soft_kl(s, t, temp).item() == pytest.approx(expected, rel=1e-5)
        assert losses.soft_kl(s, t, temp, t2_scale=False).item() == pytest.approx(expected / temp**2, rel=1e-5)


def test_soft_kl_is_zero_for_equal_logits_and_directional():
    z = torch.randn(4, 5)
    assert losses.soft_kl(z, z, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    a, b = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    assert losses.soft_kl(a, b, 1.0).item() != pytest.approx(losses.soft_kl(b, a, 1.0).item(), rel=1e-3)


def test_deit_soft_and_hard_by_hand():
    cls = torch.tensor([[2.0, 0.0, 0.0]])
    dist = torch.tensor([[0.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0, 5.0]])
    y = torch.tensor([0])
    ce_cls = -math.log(math.exp(2) / (math.exp(2) + 2))
    soft = losses.deit_loss(cls, dist, y, teacher, "soft", alpha=0.3, temperature=1.0)
    kl = losses.soft_kl(dist, teacher, 1.0).item()
    assert soft["loss"].item() == pytest.approx(0.7 * ce_cls + 0.3 * kl, rel=1e-5)
    hard = losses.deit_loss(cls, dist, y, teacher, "hard", alpha=0.3, temperature=1.0)
    ce_dist_to_teacher_argmax = -math.log(1 / (math.exp(1) + 2))  # teacher says class 2
    assert hard["loss"].item() == pytest.approx(0.7 * ce_cls + 0.3 * ce_dist_to_teacher_argmax, rel=1e-5)
    none = losses.deit_loss(cls, dist, y, None, "none", alpha=0.3, temperature=1.0)
    avg = (cls + dist) / 2
    assert none["loss"].item() == pytest.approx(nn.functional.cross_entropy(avg, y).item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs teacher logits"):
        losses.deit_loss(cls, dist, y, None, "soft", 0.5, 1.0)


def test_label_smoothing_only_on_class_head():
    cls, dist, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 2])
    t = torch.randn(3, 4)
    a = losses.deit_loss(cls, dist, y, t, "soft", 0.5, 2.0, label_smoothing=0.0)
    b = losses.deit_loss(cls, dist, y, t, "soft", 0.5, 2.0, label_smoothing=0.1)
    assert a["loss_dist"].item() == pytest.approx(b["loss_dist"].item())
    assert a["loss_cls"].item() != pytest.approx(b["loss_cls"].item())


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_matches_timm_token_distillation_task(kind):
    from timm.task import TokenDistillationTask

    torch.manual_seed(0)
    student = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=4, img_size=32,
                                depth=2, drop_path_rate=0.0)
    teacher = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    teacher.pretrained_cfg = dict(teacher.pretrained_cfg, mean=student.pretrained_cfg["mean"], std=student.pretrained_cfg["std"])
    task = TokenDistillationTask(student, teacher, distill_type=kind, task_loss_weight=0.6, temperature=3.0, verbose=False)
    task.train()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    torch.manual_seed(1)
    ref = task(x, y)
    torch.manual_seed(1)
    cls, dist = student(x)
    with torch.no_grad():
        t_logits = task.teacher(task.teacher.normalize_input(x, task.student_mean, task.student_std))
    ours = losses.deit_loss(cls, dist, y, t_logits, kind, alpha=0.4, temperature=3.0)
    assert ours["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-5)
    assert ours["loss_dist"].item() == pytest.approx(ref["distill_loss"].item(), rel=1e-5)

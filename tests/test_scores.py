"""The one evaluator: training's per-epoch validation, ``evaluate`` and the report score a model the
same way, under the same metric names."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import EPOCH_METRICS, SweepConfig, TrainConfig
from pipeline.evaluate import Scores, evaluate_model, score
from pipeline.train.loop import evaluate as evaluate_in_training


def test_scores_count_heads_teacher_agreement_and_confusion():
    labels = torch.tensor([0, 1, 2, 2])
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 0, 5.0]])  # 3 of 4 right
    cls = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0]])  # 1 of 4
    teacher = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [0, 0, 5.0]])  # all right; agrees on 3
    scores = Scores(3, with_kl=True, keep_predictions=True)
    scores.add({"logits": logits[:3], "logits_cls": cls[:3], "teacher": teacher[:3]}, labels[:3], kl=torch.tensor(0.5))
    scores.add({"logits": logits[3:], "logits_cls": cls[3:], "teacher": teacher[3:]}, labels[3:], kl=torch.tensor(1.5))
    r = scores.result(["a", "b", "c"])
    assert r["count"] == 4 and r["top1"] == 0.75 and r["top1_cls"] == 0.25
    assert r["teacher_top1"] == 1.0 and r["agreement"] == 0.75
    assert r["kl"] == pytest.approx((0.5 * 3 + 1.5) / 4)
    assert r["loss"] == pytest.approx(F.cross_entropy(logits, labels).item())
    assert r["confusion"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert r["per_class"] == {"a": 1.0, "b": 1.0, "c": 0.5}
    assert r["predictions"].tolist() == [0, 1, 0, 2]


def test_a_rank_without_rows_still_reports_every_key():
    model = torch.nn.Linear(4, 3)
    scores = score(lambda x, _rows: {"logits": model(x), "teacher": model(x)}, lambda u8: u8.float(), torch.zeros(0, 4, dtype=torch.uint8),
                   torch.zeros(0, dtype=torch.long), Scores(3, with_kl=True), kl=lambda s, t: (s - t).abs().mean())
    assert scores.keys == ["count", "loss", "top1", "teacher_top1", "agreement", "kl"]
    assert scores.result()["count"] == 0


class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).relu().mean((2, 3)))


def test_training_validation_and_the_published_model_evaluation_agree():
    torch.manual_seed(0)
    model = _TinyNet().eval()
    images = torch.randint(0, 256, (37, 20, 20, 3), dtype=torch.uint8)
    labels = torch.randint(0, 4, (37,))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    task = SimpleNamespace(eval_outputs=lambda m, x, rows: {"logits": m(x)}, mean=mean, std=std, reports_kl=False, eval_kl=None)
    val = SimpleNamespace(images=images, labels=labels)
    in_training = evaluate_in_training(task, model, val, TrainConfig(eval_transform="resize"), 16, 4, world=1, batch=10)
    meta = {"input_size": 16, "mean": mean, "std": std, "class_names": list("abcd"), "eval_transform": "resize"}
    published = evaluate_model(model, images, labels, meta, batch=7)
    assert in_training["val_top1"] == published["top1"] and in_training["val_count"] == published["count"] == 37
    assert in_training["val_loss"] == pytest.approx(published["loss"], abs=1e-6)
    assert in_training["_confusion"] == published["confusion"]
    assert set(in_training) - {"_confusion"} <= set(EPOCH_METRICS)


def test_an_old_metric_name_in_a_sweep_is_refused_with_the_new_one():
    with pytest.raises(ValueError, match="'val_acc' is now called 'val_top1'"):
        SweepConfig(metric="val_acc")
    with pytest.raises(ValueError, match="did you mean 'val_top1'"):
        SweepConfig(metric="val_topl")
    assert SweepConfig(metric="train_loss_kl").metric == "train_loss_kl"

"""Function matching: what each model really receives in each teaching mode, and the teacher cache."""

import os

import pytest
import torch

from pipeline import checkpoints
from pipeline.config import load_config
from pipeline.data import augment
from pipeline.models import build_teacher
from pipeline.plan import StageKind, plan_stage
from pipeline.train.steps import FunMatchTask, TrainBatch, build_task

MANIFEST = {"num_classes": 3, "image_size": 40}


@pytest.fixture
def teacher_dir(tmp_path):
    torch.manual_seed(0)
    model, meta = build_teacher("resnet10t", "none", 3)
    meta = {**meta, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "class_names": ["a", "b", "c"], "num_classes": 3,
            "image_size": 40, "resize_mode": "squash", "input_size": 32, "eval_transform": "resize"}
    checkpoints.save(str(tmp_path / "teacher"), model.state_dict(), meta)
    return str(tmp_path / "teacher")


def _task(teaching, teacher_dir, cache=None):
    cfg = load_config(None, ["distill.method=funmatch", f"distill.teaching={teaching}", "distill.student=resnet10t",
                             "data.image_size=40", "train.crop_size=32", "distill.temperature=2.0", f"distill.teacher={teacher_dir}"])
    plan = plan_stage(cfg, "distill", "unused-shards").with_teacher_inputs(cache)
    assert plan.kind is StageKind.FUNMATCH
    return build_task(cfg, plan, MANIFEST, torch.device("cpu"))


def _instrument(task):
    """Capture the tensors that really reach the student and the teacher."""
    seen = {}
    task.model.register_forward_pre_hook(lambda m, args: seen.__setitem__("student", args[0].detach().clone()))
    task.teacher.model.register_forward_pre_hook(lambda m, args: seen.__setitem__("teacher", args[0].detach().clone()))
    return seen


LABELS = torch.zeros(8, dtype=torch.long)


def _images(n=8):
    return torch.randint(0, 256, (n, 40, 40, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)


@pytest.mark.parametrize("teaching", ["function_matching", "consistent"])
def test_teacher_and_student_receive_the_identical_tensor(teaching, teacher_dir):
    task = _task(teaching, teacher_dir)
    seen = _instrument(task)
    assert isinstance(task, FunMatchTask)
    batch = TrainBatch(_images(), LABELS, torch.arange(8), torch.Generator().manual_seed(0))
    rec = task.train_inputs(TrainBatch(_images(), LABELS, torch.arange(8), torch.Generator().manual_seed(0)))
    out = task.train_step(task.model, batch)
    assert torch.isfinite(out["loss"])
    assert torch.allclose(rec.student, seen["student"])  # train_inputs draws exactly what the step feeds
    # the teacher's input, mapped back from its normalisation to the student's, is the student's input
    back = augment.renormalize(seen["teacher"], task.teacher.mean, task.teacher.std, task.mean, task.std)
    assert torch.allclose(back, seen["student"], atol=1e-5)
    if teaching == "function_matching":
        lam = float(rec.mixup_lambda)
        assert 0 <= lam <= 1
        # ...and it is a mix of each crop with its rolled neighbour, done once
        unmixed = (seen["student"] - (1 - lam) * torch.roll(seen["student"], 1, 0)) / lam if lam > 0.05 else None
        if unmixed is not None:
            assert not torch.allclose(unmixed, seen["student"], atol=1e-3)
    else:
        assert rec.mixup_lambda is None


def test_independent_noise_gives_different_crops_of_the_same_images(teacher_dir):
    task = _task("independent_noise", teacher_dir)
    seen = _instrument(task)
    images = _images()
    rec = task.train_inputs(TrainBatch(images, LABELS, torch.arange(8), torch.Generator().manual_seed(0)))
    task.train_step(task.model, TrainBatch(images, LABELS, torch.arange(8), torch.Generator().manual_seed(0)))
    back = augment.renormalize(seen["teacher"], task.teacher.mean, task.teacher.std, task.mean, task.std)
    assert not torch.allclose(back, seen["student"], atol=1e-3)
    base = augment.to_float(images, task.mean, task.std)
    for who, boxes, got in (("student", rec.student_boxes, seen["student"]), ("teacher", rec.teacher_boxes, back)):
        crops = augment.crop_resize_boxes(base, boxes, 32)
        for i in range(8):  # each input is crop i of image i, possibly mirrored
            assert torch.allclose(got[i], crops[i], atol=1e-4) or torch.allclose(got[i], crops[i].flip(-1), atol=1e-4), who
    assert not torch.equal(rec.student_boxes, rec.teacher_boxes)


def test_fixed_teacher_uses_cached_logits_and_never_runs_the_teacher(teacher_dir, tmp_path):
    paths = [f"img{i}" for i in range(8)]
    logits = torch.randn(8, 3)
    torch.save({"paths": paths, "logits": logits}, tmp_path / "cache.pt")
    task = _task("fixed_teacher", teacher_dir, str(tmp_path / "cache.pt"))
    task.bind_train_part(list(reversed(paths)), torch.device("cpu"))  # this worker's rows, in its own order
    seen = _instrument(task)
    out = task.train_step(task.model, TrainBatch(_images(), LABELS, torch.tensor([0, 5]), torch.Generator().manual_seed(0)))
    assert "teacher" not in seen
    assert torch.equal(out["target"], logits[[7, 2]].argmax(-1))


def test_teacher_cache_is_reused_and_rebuilt_when_the_teacher_changes(ray_local, teacher_dir, tmp_path):
    from pipeline.data.preprocess import preprocess
    from pipeline.stages import teacher_cache

    cfg = load_config(None, [f"output_dir={tmp_path / 'out'}", "data.synthetic.num_classes=3", "data.synthetic.images_per_class=10",
                             "data.synthetic.image_size=40", "data.image_size=40", "train.crop_size=32"])
    shard_dir = preprocess(cfg, log=lambda *_: None)["shard_dir"]
    first = teacher_cache(cfg, shard_dir, teacher_dir, log=lambda *_: None)
    stamp = os.stat(first).st_mtime_ns
    again = teacher_cache(cfg, shard_dir, teacher_dir, log=lambda *_: None)
    assert again == first and os.stat(again).st_mtime_ns == stamp
    cache = torch.load(first, weights_only=True)
    assert cache["logits"].shape == (27, 3) and len(cache["paths"]) == 27
    # a retrained teacher (new weights file) gets a new cache
    state = torch.load(os.path.join(teacher_dir, "model.pt"), weights_only=True)
    state = {k: (v + 0.1 if v.is_floating_point() else v) for k, v in state.items()}
    torch.save(state, os.path.join(teacher_dir, "model.pt"))
    rebuilt = teacher_cache(cfg, shard_dir, teacher_dir, log=lambda *_: None)
    assert rebuilt != first
    assert not torch.allclose(torch.load(rebuilt, weights_only=True)["logits"], cache["logits"])

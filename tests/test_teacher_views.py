"""Teacher views (the label step and their replay), the partial teacher, KD for single-head students."""

import os

import pytest
import torch
import torch.nn.functional as F

from pipeline import checkpoints, losses
from pipeline.config import load_config
from pipeline.data import augment
from pipeline.label import label_views
from pipeline.models import build_teacher
from pipeline.plan import plan_stage
from pipeline.train.steps import DeitTask, TeacherTask, TrainBatch, build_task


def _task(cfg, stage, manifest, teacher=None, teacher_inputs=None):
    """The task the loop would build for ``stage`` (the shard directory is not read here)."""
    if teacher:
        cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"teacher": teacher})})
    plan = plan_stage(cfg, stage, "unused-shards").with_teacher_inputs(teacher_inputs)
    return build_task(cfg, plan, manifest, torch.device("cpu"))

CLASSES = 3


def _save_teacher(path, seed=0, input_size=40):
    torch.manual_seed(seed)
    model, meta = build_teacher("resnet10t", "none", CLASSES)
    meta = {**meta, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "class_names": ["a", "b", "c"], "num_classes": CLASSES,
            "image_size": 48, "resize_mode": "squash", "input_size": input_size, "eval_transform": "resize",
            "checkpoint_id": f"teacher-{seed}"}
    checkpoints.save(str(path), model.state_dict(), meta)
    return str(path)


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    from pipeline.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("views")
    overrides = [f"output_dir={out}", f"data.synthetic.num_classes={CLASSES}", "data.synthetic.images_per_class=8",
                 "data.synthetic.image_size=48", "data.image_size=48", "data.val_fraction=0.25"]
    cfg = load_config(None, overrides)
    return {"dir": preprocess(cfg, log=lambda *_: None)["shard_dir"], "overrides": overrides, "out": out}


def _cfg(shards, *extra):
    return load_config(None, shards["overrides"] + ["train.crop_size=24", "train.augment=inception",
                                                    "distill.student=resnet10t", *extra])


def test_render_views_integer_windows_are_exact_crops():
    images = torch.randint(0, 256, (4, 20, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    boxes, flips = augment.sample_views(4, 20, 20, "crop_flip", 12, generator=gen)
    assert torch.all(boxes[:, 2] - boxes[:, 0] == 12)
    assert augment.view_mode("crop_flip", 12, 12) == "window"
    x = augment.render_views(images, torch.arange(4), boxes, flips, 12, [0.0] * 3, [1.0] * 3, "window")
    for i in range(4):
        x1, y1 = int(boxes[i, 0]), int(boxes[i, 1])
        window = images[i, y1 : y1 + 12, x1 : x1 + 12].permute(2, 0, 1).float() / 255
        assert torch.allclose(x[i], window.flip(-1) if flips[i] else window, atol=1e-6)


def test_label_step_stores_what_the_teacher_says_on_each_view(shards, tmp_path):
    teacher = _save_teacher(tmp_path / "t")
    cfg = _cfg(shards, "distill.teacher_views=3", "distill.teacher_input_size=40")
    path = label_views(cfg, shards["dir"], teacher, "teacher-0", log=lambda *_: None)
    store = torch.load(path, weights_only=True)
    n = len(store["paths"])
    assert store["logits"].shape == (n, 3, CLASSES) and store["logits"].dtype == torch.float16
    assert store["boxes"].shape == (n, 3, 4)
    # views differ across k and across images
    assert not torch.equal(store["boxes"][:, 0], store["boxes"][:, 1])
    assert len({tuple(b.tolist()) for b in store["boxes"][:, 0]}) > n // 2
    # re-running the teacher on replayed views (at its own size) reproduces the stored output
    from pipeline.data.loading import load_split

    train = load_split(shards["dir"], "train")
    assert train.paths == store["paths"]
    model, meta = checkpoints.load_model(teacher)
    idx = torch.arange(5)
    for k in range(3):
        x = augment.render_views(train.images, idx, store["boxes"][idx, k], store["flips"][idx, k], 40, meta["mean"], meta["std"])
        assert augment.view_mode("inception", 24, 40) == "box"
        with torch.no_grad():
            again = model(x)
        assert torch.allclose(again, store["logits"][idx, k].float(), atol=2e-2, rtol=1e-2)


def test_views_are_reused_and_rebuilt_when_teacher_or_settings_change(shards, tmp_path):
    teacher = _save_teacher(tmp_path / "t")
    quiet = lambda *_: None  # noqa: E731
    cfg = _cfg(shards, "distill.teacher_views=2")
    first = label_views(cfg, shards["dir"], teacher, "teacher-0", log=quiet)
    stamp = os.stat(first).st_mtime_ns
    assert label_views(cfg, shards["dir"], teacher, "teacher-0", log=quiet) == first
    assert os.stat(first).st_mtime_ns == stamp  # reused, not recomputed
    other_k = label_views(_cfg(shards, "distill.teacher_views=3"), shards["dir"], teacher, "teacher-0", log=quiet)
    other_aug = label_views(_cfg(shards, "distill.teacher_views=2", "train.inception_scale=[0.5,1.0]"), shards["dir"], teacher,
                            "teacher-0", log=quiet)
    retrained = _save_teacher(tmp_path / "t2", seed=1)
    other_teacher = label_views(cfg, shards["dir"], retrained, "teacher-1", log=quiet)
    assert len({first, other_k, other_aug, other_teacher}) == 4
    assert not torch.allclose(torch.load(first, weights_only=True)["logits"], torch.load(other_teacher, weights_only=True)["logits"])


def test_student_replays_view_e_mod_k_without_a_teacher(shards, tmp_path):
    teacher = _save_teacher(tmp_path / "t")
    cfg = _cfg(shards, "distill.teacher_views=2", "distill.type=soft", "distill.alpha=1.0")
    path = label_views(cfg, shards["dir"], teacher, "teacher-0", log=lambda *_: None)
    store = torch.load(path, weights_only=True)
    from pipeline.data.loading import load_split

    train = load_split(shards["dir"], "train")
    manifest = {"num_classes": CLASSES, "image_size": 48}
    task = _task(cfg, "distill", manifest, teacher, path)
    assert isinstance(task, DeitTask) and task.teacher is None and task.views is not None
    order = list(reversed(range(len(train))))  # a worker's rows need not be in the store's order
    task.bind_train_part([train.paths[i] for i in order], torch.device("cpu"))
    seen = {}
    task.model.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    images, labels = train.images[order], train.labels[order]
    task.model.eval()  # batch statistics of two images would differ between the step and the reference
    for epoch in (0, 1, 2):
        task.start_epoch(epoch)
        out = task.train_step(task.model, TrainBatch(images, labels, torch.tensor([0, 3]), None))
        k, rows = epoch % 2, torch.tensor([order[0], order[3]])
        expected = augment.render_views(train.images, rows, store["boxes"][rows, k], store["flips"][rows, k], 24,
                                        task.mean, task.std)
        assert torch.allclose(seen["x"], expected, atol=1e-5)
        # alpha = 1: the loss is the KL to the stored logits of that view alone
        ref = losses.soft_kl(task.model(expected).detach(), store["logits"][rows, k].float(), 1.0)
        assert out["loss_dist"].item() == pytest.approx(ref.item(), rel=1e-3, abs=1e-4)


def test_a_student_without_distillation_token_gets_hintons_kd(tmp_path):
    teacher = _save_teacher(tmp_path / "t", input_size=24)
    cfg = load_config(None, ["data.image_size=32", "train.crop_size=24", "distill.student=resnet10t", "distill.type=soft",
                             "distill.alpha=0.3", "distill.temperature=2.0", "distill.label_smoothing=0.0"])
    task = _task(cfg, "distill", {"num_classes": CLASSES, "image_size": 32}, teacher)
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    task.model.eval()  # deterministic forward for the reference
    inputs = {}
    task.model.register_forward_pre_hook(lambda m, args: inputs.__setitem__("s", args[0].detach().clone()))
    out = task.train_step(task.model, TrainBatch(images, labels, torch.arange(6), torch.Generator().manual_seed(2)))
    s = task.model(inputs["s"]).detach()
    t = task.teacher.logits(inputs["s"])
    expected = 0.7 * F.cross_entropy(s, labels) + 0.3 * losses.soft_kl(s, t, 2.0)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_partial_teacher_trains_only_its_last_block_groups():
    cfg = load_config(None, ["teacher.model=tf_efficientnet_lite0", "teacher.mode=partial", "teacher.train_blocks=2"])
    task = _task(cfg, "teacher", {"num_classes": CLASSES, "image_size": 32})
    assert isinstance(task, TeacherTask)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
                 for n, p in task.model.named_parameters() if p.requires_grad}
    # Lite0's coarse groups: stem, blocks.0 .. blocks.6 (+ conv_head/bn2 with the last), classifier
    assert trainable == {"blocks.5", "blocks.6", "conv_head", "bn2", "classifier"}
    task.set_train_mode(task.model)
    assert not task.model.bn1.training and not task.model.blocks[0][0].bn1.training
    assert task.model.blocks[6][0].bn1.training
    groups = task.optimizer_target(task.model)
    assert [g["lr_scale"] for g in groups] == [cfg.teacher.backbone_lr_scale, 1.0]
    head = load_config(None, ["teacher.model=tf_efficientnet_lite0", "teacher.mode=head"])
    head_task = _task(head, "teacher", {"num_classes": CLASSES, "image_size": 32})
    assert {n for n, p in head_task.model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}

"""A student started from its teacher's weights (distill.student_pretrained=teacher)."""

import pytest
import timm
import torch

from pipeline import checkpoints
from pipeline.config import ConfigError, load_config
from pipeline.plan import plan_stage
from pipeline.weight_selection import WeightSelectionError, evenly_spaced, select_tensor, select_weights


def test_evenly_spaced_indices_cover_the_range_and_keep_fused_blocks_apart():
    assert evenly_spaced(6, 3).tolist() == [0, 2, 4]  # every other: q, k, v of a fused 3 x 2 projection stay apart
    idx = evenly_spaced(352, 320)
    assert len(idx) == 320 and idx[0] == 0 and idx[-1] == 351 and bool((idx[1:] > idx[:-1]).all())
    assert evenly_spaced(5, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(WeightSelectionError):
        evenly_spaced(3, 4)


def test_selection_is_consistent_across_layers():
    """A channel kept in one layer's output is the one kept in the next layer's input."""
    big = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)  # (out, in)
    small = select_tensor(big, torch.Size([4, 3]))
    assert small.tolist() == big[[0, 2, 4, 6]][:, [0, 2, 4]].tolist()
    next_layer = torch.arange(5 * 8, dtype=torch.float32).reshape(5, 8)  # its input is big's output
    assert select_tensor(next_layer, torch.Size([5, 4])).tolist() == next_layer[:, [0, 2, 4, 6]].tolist()


def _trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Distinct, non-default values everywhere (BatchNorm statistics included), so a copy can be told from an init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    return model


def test_lite0_takes_the_first_blocks_and_evenly_spaced_channels_of_lite2():
    teacher = _trained_like(timm.create_model("tf_efficientnet_lite2", num_classes=5))
    student = timm.create_model("tf_efficientnet_lite0", num_classes=5)
    counts = select_weights(teacher.state_dict(), student)
    assert counts["kept"] == 0 and counts["selected"] == len(student.state_dict())
    t, s = teacher.state_dict(), student.state_dict()
    # same shapes: copied as they are (stem, classifier)
    assert torch.equal(s["conv_stem.weight"], t["conv_stem.weight"]) and torch.equal(s["classifier.weight"], t["classifier.weight"])
    # stage 2 (48 -> 40 channels, 3 -> 2 blocks): the first two blocks, channels of evenly_spaced(48, 40)
    idx = evenly_spaced(48, 40)
    hidden = evenly_spaced(288, 240)  # the expanded width (6 x) the depthwise conv sees
    assert torch.equal(s["blocks.2.1.conv_pwl.weight"], t["blocks.2.1.conv_pwl.weight"][idx][:, hidden])
    assert torch.equal(s["blocks.2.1.conv_dw.weight"], t["blocks.2.1.conv_dw.weight"][hidden])
    assert torch.equal(s["blocks.2.1.bn3.running_var"], t["blocks.2.1.bn3.running_var"][idx])
    # the head reads the last stage's channels the last stage kept
    assert torch.equal(s["conv_head.weight"], t["conv_head.weight"][:, evenly_spaced(352, 320)])


def test_a_student_of_another_family_or_a_larger_one_is_refused():
    lite2 = timm.create_model("tf_efficientnet_lite2", num_classes=5).state_dict()
    with pytest.raises(WeightSelectionError, match="not a selection|namesake"):
        select_weights(lite2, timm.create_model("resnet10t", num_classes=5))
    lite0 = timm.create_model("tf_efficientnet_lite0", num_classes=5).state_dict()
    with pytest.raises(WeightSelectionError, match="not a selection"):
        select_weights(lite0, timm.create_model("tf_efficientnet_lite2", num_classes=5))


def test_a_vit_at_another_input_size_is_refused_rather_than_scrambled():
    small = timm.create_model("deit_tiny_patch16_224", num_classes=5).state_dict()
    student = timm.create_model("deit_tiny_patch16_224", num_classes=5, img_size=112)
    with pytest.raises(WeightSelectionError, match="pos_embed: the student has 50 positions, the teacher 197"):
        select_weights(small, student)
    # at the same size the positions are copied, the width selected
    vit_small = timm.create_model("deit_small_patch16_224", num_classes=5).state_dict()
    assert select_weights(vit_small, timm.create_model("deit_tiny_patch16_224", num_classes=5))["kept"] == 0


def _publish_teacher(directory, arch="tf_efficientnet_lite2", num_classes=3, checkpoint_id="first"):
    model = _trained_like(timm.create_model(arch, num_classes=num_classes))
    meta = {"arch": arch, "create_kwargs": {"num_classes": num_classes}, "mean": [0.5] * 3, "std": [0.25] * 3,
            "input_size": 64, "class_names": [f"c{i}" for i in range(num_classes)], "checkpoint_id": checkpoint_id}
    checkpoints.save(str(directory), model.state_dict(), meta)
    return model


def test_plan_checks_the_family_before_any_work(tmp_path):
    _publish_teacher(tmp_path / "t")
    base = [f"output_dir={tmp_path}", f"distill.teacher={tmp_path / 't'}", "distill.student_pretrained=teacher"]
    plan = plan_stage(load_config(None, [*base, "distill.student=tf_efficientnet_lite0", "distill.type=none"]), "distill", "s")
    # a student that only starts from the teacher's weights: the teacher is needed, but not in the loss
    assert plan.init_from_teacher and plan.teacher == str(tmp_path / "t") and not plan.uses_teacher
    assert plan.tags["student_init"] == "teacher" and plan.run_name.endswith("init=teacher")
    assert plan.role == "teacher-init"  # labels only, but not the baseline: `run` still trains that beside it
    with pytest.raises(ConfigError, match="resnet10t cannot start from the teacher tf_efficientnet_lite2"):
        plan_stage(load_config(None, [*base, "distill.student=resnet10t"]), "distill", "s")
    _publish_teacher(tmp_path / "vit", arch="deit_small_patch16_224")  # a ViT teacher at 224, the student at 112
    with pytest.raises(ConfigError, match="pos_embed: the student has 50 positions"):
        plan_stage(load_config(None, [*base, f"distill.teacher={tmp_path / 'vit'}", "distill.student=deit_tiny_patch16_224",
                                      "data.image_size=128", "distill.crop_size=112"]), "distill", "s")
    # the fingerprint follows the teacher even though the loss does not use it: a retrained teacher
    # (a new checkpoint id in the same directory) is a new student, and the same teacher the same one
    same = [*base, "distill.student=tf_efficientnet_lite0", "distill.type=none"]
    assert plan_stage(load_config(None, same), "distill", "s").fingerprint == plan.fingerprint
    _publish_teacher(tmp_path / "t", checkpoint_id="retrained")
    assert plan_stage(load_config(None, same), "distill", "s").fingerprint != plan.fingerprint
    # a student from scratch needs no teacher at all
    scratch = plan_stage(load_config(None, [*same, "distill.student_pretrained=none"]), "distill", "s")
    assert scratch.teacher is None and not scratch.init_from_teacher


def test_the_stage_student_computes_with_the_teacher_s_normalisation(tmp_path):
    from pipeline.train.steps import build_stage_student

    teacher = _publish_teacher(tmp_path / "t")
    cfg = load_config(None, [f"output_dir={tmp_path}", f"distill.teacher={tmp_path / 't'}", "distill.student_pretrained=teacher",
                             "distill.student=tf_efficientnet_lite0", "distill.drop_path=0"])
    plan = plan_stage(cfg, "distill", "s")
    student, meta = build_stage_student(cfg, plan, 3, 64)
    assert meta["mean"] == [0.5] * 3 and meta["std"] == [0.25] * 3 and meta["init"] == "teacher:tf_efficientnet_lite2"
    assert torch.equal(student.classifier.bias, teacher.classifier.bias)
    with pytest.raises(ValueError, match="the teacher has 3 classes, the data 5"):
        build_stage_student(cfg, plan, 5, 64)


def test_the_baseline_of_a_teacher_started_student_starts_from_scratch(tmp_path):
    from pipeline.cli import baseline_config

    cfg = load_config(None, [f"output_dir={tmp_path}", "distill.student_pretrained=teacher", "distill.student=tf_efficientnet_lite0"])
    assert baseline_config(cfg).distill.student_pretrained == "none"
    assert baseline_config(load_config(None, ["distill.student_pretrained=package", "distill.student=tf_efficientnet_lite0"])
                           ).distill.student_pretrained == "package"

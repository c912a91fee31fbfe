"""Students, teachers and the checks that run before any worker starts."""

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.models import build_student, build_teacher, has_distillation_head, prefers_channels_last
from pipeline.plan import plan_stage


def validate_stage(cfg, stage):
    """The teacher a stage would use; planning raises on what is wrong."""
    return plan_stage(cfg, stage, "shards").teacher


def test_deit_student_returns_two_heads_in_training_and_their_average_in_eval():
    model, meta = build_student("deit_tiny_distilled_patch16_224", "none", num_classes=5, img_size=32, drop_path=0.0)
    assert has_distillation_head(model) and meta["create_kwargs"]["img_size"] == 32
    model.set_distilled_training(True)
    x = torch.randn(3, 3, 32, 32)
    model.train()
    cls, dist = model(x)
    assert cls.shape == dist.shape == (3, 5)
    model.eval()
    with torch.no_grad():
        avg = model(x)
        feats = model.forward_features(x)
        expected = (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2
    assert torch.allclose(avg, expected, atol=1e-5)


def test_cnn_student_records_no_img_size():
    model, meta = build_student("resnet10t", "none", num_classes=3, img_size=32, drop_path=0.0)
    assert "img_size" not in meta["create_kwargs"] and not has_distillation_head(model)


def test_channels_last_is_picked_for_convolutional_networks_on_cpu_and_for_everything_on_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for name, cnn in (("resnet10t", True), ("tf_efficientnet_lite0", True), ("deit_tiny_distilled_patch16_224", False)):
        model, _ = build_student(name, "none", num_classes=3, img_size=32, drop_path=0.0)
        assert prefers_channels_last(model, cpu) is cnn, name
        assert prefers_channels_last(model, gpu)


def test_package_teacher_gets_new_head_and_its_normalisation():
    model, meta = build_teacher("tf_efficientnet_lite0", "package", num_classes=4)
    assert model.get_classifier().out_features == 4
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.5, 0.5, 0.5]


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path}", *overrides])


def test_unknown_model_names_suggest_close_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher.model: unknown timm model 'tf_efficientnet_lite9'.*did you mean"):
        validate_stage(_cfg(tmp_path, "teacher.model=tf_efficientnet_lite9"), "teacher")
    with pytest.raises(ConfigError, match="distill.student: unknown timm model"):
        validate_stage(_cfg(tmp_path, "distill.student=deit_teeny"), "distill")


def test_missing_teacher_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="distill.teacher: .* does not exist"):
        validate_stage(_cfg(tmp_path, f"distill.teacher={tmp_path / 'nope'}"), "distill")
    with pytest.raises(ConfigError, match="run `python -m pipeline teacher` first"):
        validate_stage(_cfg(tmp_path), "distill")
    # the baseline needs no teacher at all
    assert validate_stage(_cfg(tmp_path, "distill.type=none"), "distill") is None


def test_package_weights_only_for_lite_models(tmp_path):
    with pytest.raises(ConfigError, match="has weights only for"):
        validate_stage(_cfg(tmp_path, "teacher.model=resnet18"), "teacher")
    with pytest.raises(ConfigError, match="not package, hub, none or an existing weights file"):
        validate_stage(_cfg(tmp_path, "teacher.model=resnet18", f"teacher.pretrained={tmp_path / 'w.pt'}"), "teacher")


def test_a_student_without_a_teacher_ignores_the_teachers_settings(tmp_path):
    """`run`'s baseline, or a quality protocol's, is reused across temperatures, alphas and view counts."""
    def fp(*overrides):
        return plan_stage(_cfg(tmp_path, "distill.type=none", *overrides), "distill", "shards").fingerprint

    base = fp()
    assert fp("distill.temperature=4", "distill.alpha=0.9", "distill.teacher_views=8", "distill.teacher_input_size=48",
              f"distill.teacher={tmp_path / 'elsewhere'}") == base
    assert fp("distill.lr=0.01") != base and fp("distill.epochs=3") != base

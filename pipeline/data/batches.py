"""Stored uint8 images -> the float batches models see, for training and for evaluation.

Shared by the training loop, the evaluator and the benchmarks, so that all of them feed a model the
same way; nothing here knows about models or training.
"""

from __future__ import annotations

import torch

from pipeline.config import TrainConfig
from pipeline.data import augment


def batch_for_training(images, idx, tcfg: TrainConfig, crop: int, mean, std, gen, channels_last: bool) -> torch.Tensor:
    """Images ``idx`` of the stored uint8 tensor -> an augmented, normalised float batch."""
    if tcfg.augment == "crop_flip":
        return augment.to_float(augment.random_crop_flip(images, crop, index=idx, generator=gen), mean, std, channels_last)
    x = augment.to_float(images[idx], mean, std, channels_last)
    if tcfg.augment == "inception":
        return augment.random_resized_crop(x, crop, scale=tuple(tcfg.inception_scale), generator=gen)
    return augment.resize(x, crop)


def batch_for_eval(images, tcfg: TrainConfig, crop: int, mean, std, channels_last: bool = False) -> torch.Tensor:
    """Stored uint8 images -> the evaluation input: resized (Keras DeiT) or centre-cropped to ``crop``."""
    if tcfg.eval_transform == "center_crop":
        return augment.to_float(augment.center_crop(images, crop), mean, std, channels_last)
    return augment.resize(augment.to_float(images, mean, std, channels_last), crop)

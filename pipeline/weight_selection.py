"""Initialise a small student from its teacher's weights: weight selection (Xu et al., "Initializing
Models with Larger Ones", ICLR 2024).

When the student is a smaller member of the teacher's family (EfficientNet-Lite0 from a Lite2
teacher, ResNet-18 from a ResNet-50 is *not* one: the blocks differ), every tensor of the student
has a namesake in the teacher that is at least as large in every dimension. The student then takes:

- *layer selection*: for each stage, the teacher's first blocks (timm names block ``j`` of stage
  ``i`` the same in both models, so a shared key is exactly that choice);
- *element selection*: along each dimension, evenly spaced indices of the teacher's tensor. The
  indices depend only on the two sizes, so a channel kept in one layer's output is the channel kept
  in the next layer's input, and residual sums stay aligned.

timm has no such initialiser (its helpers adapt input convolutions and position embeddings only),
hence this module.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn


class WeightSelectionError(ValueError):
    """The teacher's weights cannot initialise this student (not the same family, or larger)."""


def evenly_spaced(source: int, target: int) -> torch.Tensor:
    """``target`` indices out of ``range(source)``, evenly spaced: every k-th when ``source`` is a
    multiple of ``target`` (which keeps q/k/v blocks of a fused projection apart), else rounded
    from a linear ramp over the whole range."""
    if target > source:
        raise WeightSelectionError(f"cannot select {target} elements out of {source}")
    if source % target == 0:
        return torch.arange(target) * (source // target)
    return torch.round(torch.linspace(0, source - 1, target)).long()


def select_tensor(teacher: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The teacher's tensor cut down to ``shape`` by evenly spaced indices along each dimension."""
    if teacher.dim() != len(shape):
        raise WeightSelectionError(f"a {teacher.dim()}-d tensor cannot initialise a {len(shape)}-d one")
    out = teacher
    for dim, size in enumerate(shape):
        if out.shape[dim] != size:
            out = out.index_select(dim, evenly_spaced(out.shape[dim], size))
    return out.clone()


def check_selectable(teacher_state: Mapping[str, torch.Tensor], student: nn.Module) -> list[str]:
    """The student's tensor names that the teacher's state dict can initialise; raises
    :class:`WeightSelectionError` when fewer than half of them have a namesake in the teacher, or
    when one is larger than its namesake (works on the ``meta`` device: shapes only)."""
    own = student.state_dict()
    shared = []
    for key, value in own.items():
        source = teacher_state.get(key)
        if source is None:
            continue
        if value.dim() != source.dim() or any(s > t for s, t in zip(value.shape, source.shape)):
            raise WeightSelectionError(f"{key}: the student's {tuple(value.shape)} is not a selection of the teacher's "
                                       f"{tuple(source.shape)}")
        if key.endswith("pos_embed") and value.dim() == 3 and value.shape[1] != source.shape[1]:
            # Selecting tokens would scramble the grid; a position table must be resampled instead.
            raise WeightSelectionError(f"{key}: the student has {value.shape[1]} positions, the teacher {source.shape[1]}; "
                                       "give the student the teacher's input size")
        shared.append(key)
    if len(shared) < len(own) / 2:
        missing = next(k for k in own if k not in teacher_state)
        raise WeightSelectionError(f"only {len(shared)} of the student's {len(own)} tensors have a namesake in the teacher "
                                   f"(e.g. no {missing!r})")
    return shared


def select_weights(teacher_state: Mapping[str, torch.Tensor], student: nn.Module) -> dict[str, int]:
    """Load into ``student`` the weights selected from ``teacher_state`` (a state dict of a larger
    model of the same family). Tensors the teacher lacks keep their fresh initialisation.

    Returns counts: ``selected`` (tensors taken from the teacher), ``kept`` (left as initialised).
    Raises :class:`WeightSelectionError` as :func:`check_selectable` does.
    """
    own = student.state_dict()
    shared = check_selectable(teacher_state, student)
    state = {key: select_tensor(teacher_state[key], own[key].shape).to(own[key].dtype) for key in shared}
    student.load_state_dict(state, strict=False)
    return {"selected": len(state), "kept": len(own) - len(state)}

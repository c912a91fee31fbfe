"""Checkpoints and weights are loaded with ``torch.load(weights_only=True)``: a pickled payload is refused, not run."""

import json
import os

import pytest
import torch

from pipeline import checkpoints


def test_checkpoint_with_pickled_payload_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / "ckpt").mkdir()
    torch.save({"x": Payload()}, tmp_path / "ckpt" / "train_state.pt")
    with pytest.raises(checkpoints.CheckpointError, match="refusing to load"):
        checkpoints.load_train_state(str(tmp_path / "ckpt"))
    assert not (tmp_path / "pwned").exists()


def test_model_file_with_pickled_payload_is_refused_by_every_loader(tmp_path):
    """The published-model path (evaluate, predict, distillation's teacher) refuses it too."""

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / checkpoints.META_FILE).write_text(json.dumps({"arch": "resnet10t", "create_kwargs": {"num_classes": 3}}))
    torch.save({"weights": Payload()}, ckpt / checkpoints.MODEL_FILE)
    with pytest.raises(checkpoints.CheckpointError, match="refusing to load"):
        checkpoints.load_model(str(ckpt))
    assert not (tmp_path / "pwned").exists()

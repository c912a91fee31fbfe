"""Batched augmentation: crops are real windows, flips mirror, boxes respect scale/ratio, mixup pairs neighbours."""

import math

import numpy as np
import pytest
import torch

from pipeline.data import augment


def _batch(n=6, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)


def test_random_crop_flip_returns_windows_or_their_mirrors():
    x = _batch()
    g = torch.Generator().manual_seed(1)
    out = augment.random_crop_flip(x, 16, flip=True, generator=g)
    assert out.shape == (6, 16, 16, 3) and out.dtype == torch.uint8
    mirrored = 0
    for i in range(6):
        windows = [x[i, y : y + 16, xx : xx + 16] for y in range(5) for xx in range(9)]
        plain = any(torch.equal(out[i], w) for w in windows)
        flipped = any(torch.equal(out[i].flip(1), w) for w in windows)
        assert plain or flipped
        mirrored += flipped and not plain
    assert 0 < mirrored < 6  # about half are mirrored (true for this seed)


def test_random_crop_varies_position_and_rejects_too_large():
    x = _batch(n=64)
    out = augment.random_crop_flip(x, 16, flip=False, generator=torch.Generator().manual_seed(0))
    offsets = set()
    for i in range(64):
        for y in range(5):
            for xx in range(9):
                if torch.equal(out[i], x[i, y : y + 16, xx : xx + 16]):
                    offsets.add((y, xx))
    assert len(offsets) > 10
    with pytest.raises(ValueError, match="larger than the stored"):
        augment.random_crop_flip(x, 32)


def test_to_float_normalises_per_channel():
    x = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    x[..., 1] = 0
    out = augment.to_float(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.shape == (2, 3, 4, 4)
    assert torch.allclose(out[:, 0], torch.ones(1)) and torch.allclose(out[:, 1], -torch.ones(1))


def test_renormalize_matches_direct_normalisation():
    x = _batch()
    a = augment.to_float(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    b = augment.to_float(x, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.allclose(augment.renormalize(a, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (0.5,) * 3, (0.5,) * 3), b, atol=1e-5)


def test_crop_boxes_respect_bounds_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    boxes = augment.sample_crop_boxes(4000, 60, 80, scale=(0.2, 0.9), ratio=(0.75, 4 / 3), generator=g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 60).all()
    frac = (w * h) / (60 * 80)
    assert frac.min() > 0.18 and frac.max() < 0.93  # rounding allows a little slack
    assert (w / h).min() > 0.7 and (w / h).max() < 1.4
    assert boxes[:, 0].std() > 1 and boxes[:, 1].std() > 1  # positions vary


def test_crop_resize_boxes_picks_the_box_contents():
    x = torch.zeros(2, 3, 32, 32)
    x[0, :, 8:16, 8:16] = 1.0  # a bright square in image 0
    boxes = torch.tensor([[8.0, 8.0, 16.0, 16.0], [0.0, 0.0, 8.0, 8.0]])
    out = augment.crop_resize_boxes(x, boxes, 4)
    assert torch.allclose(out[0], torch.ones_like(out[0]), atol=1e-5)
    assert torch.allclose(out[1], torch.zeros_like(out[1]))


def test_mixup_pairs_each_image_with_its_rolled_neighbour():
    x = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1)
    out = augment.mixup_rolled(x, 0.75)
    expected = 0.75 * torch.arange(5.0) + 0.25 * torch.tensor([4.0, 0, 1, 2, 3])
    assert torch.allclose(out.view(-1), expected)
    rev = augment.mixup_rolled(x, 0.75, reverse=True)
    assert torch.allclose(rev.view(-1), 0.75 * torch.arange(5.0) + 0.25 * torch.arange(4.0, -1, -1))


def test_mixup_lambda_is_uniform():
    g = torch.Generator().manual_seed(0)
    lams = torch.stack([augment.sample_mixup_lambda(g) for _ in range(4000)]).numpy()
    hist, _ = np.histogram(lams, bins=10, range=(0, 1))
    assert hist.min() > 320 and hist.max() < 480  # ~400 per bin
    folded = torch.stack([augment.sample_mixup_lambda(g, fold=True) for _ in range(2000)])
    assert folded.min() >= 0.5
    assert math.isclose(float(folded.mean()), 0.75, abs_tol=0.02)


def test_index_picks_the_batch_and_both_crop_paths_agree():
    x = _batch(n=10)
    idx = torch.tensor([7, 2, 2, 9])
    out = augment.random_crop_flip(x, 20, flip=False, index=idx)  # crop = full height: only x offset varies
    for i, j in enumerate(idx.tolist()):
        assert any(torch.equal(out[i], x[j, :, o : o + 20]) for o in range(5))
    # the accelerator path (one gather) and the CPU path (per image) give identical crops
    src = torch.tensor([0, 3, 5, 5])
    oy, ox = torch.tensor([0, 4, 2, 1]), torch.tensor([8, 0, 3, 7])
    mirrored = torch.tensor([True, False, True, False])
    a = augment._crop_per_image(x, src, oy, ox, mirrored, 16)
    b = augment._crop_gather(x, src, oy, ox, mirrored, 16)
    assert torch.equal(a, b)
    assert torch.equal(a[0], x[0, 0:16, 8:24].flip(1))

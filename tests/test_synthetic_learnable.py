"""The synthetic demo data must be learnable: a small CNN beats chance clearly in seconds of CPU."""

import numpy as np
import torch
import torch.nn as nn

from pipeline.data import synthetic


def test_small_cnn_beats_chance_on_synthetic_flowers():
    torch.manual_seed(0)
    k, per_class, size = 5, 48, 32
    imgs = np.stack([np.asarray(synthetic.draw_flower(c, i, size, seed=0)) for c in range(k) for i in range(per_class)])
    labels = np.repeat(np.arange(k), per_class)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(labels)
    held_out = torch.arange(len(y)) % 4 == 0
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, k),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = x[~held_out], y[~held_out]
    for _ in range(25):
        perm = torch.randperm(len(yt))
        for b in range(0, len(yt), 32):
            idx = perm[b : b + 32]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (model(x[held_out]).argmax(1) == y[held_out]).float().mean().item()
    assert acc > 0.6, f"held-out accuracy {acc:.2f}, chance is {1 / k:.2f}"

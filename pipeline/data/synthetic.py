"""A deterministic generator of flower-like images: the demo's data and the tests' data.

Each class is a kind of flower that differs from the others in petal count, petal shape and
colour; every image adds a noisy leafy background, a random scale, position and rotation, and a
little hue jitter. The classes are easy for a CNN to tell apart (the tests rely on that) but not
trivial: a model must look at colour and shape, not at a fixed pixel.
"""

from __future__ import annotations

import colorsys
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# (petal count, petal shape, hue in [0, 1)); shape = (length, width) relative to the radius
FLOWER_KINDS = [
    ("red_round5", 5, (0.55, 0.45), 0.00),
    ("yellow_thin12", 12, (0.65, 0.12), 0.15),
    ("purple_wide3", 3, (0.60, 0.70), 0.78),
    ("pink_pointed6", 6, (0.70, 0.25), 0.92),
    ("orange_thin8", 8, (0.60, 0.18), 0.07),
    ("blue_round4", 4, (0.50, 0.50), 0.60),
    ("white_wide7", 7, (0.55, 0.40), None),  # None: white petals
    ("cyan_pointed10", 10, (0.70, 0.15), 0.50),
]

GENERATOR_VERSION = 1


def class_names(num_classes: int) -> list[str]:
    return [kind[0] for kind in FLOWER_KINDS[:num_classes]]


def _rgb(hue: float | None, rng: np.random.Generator) -> tuple[int, int, int]:
    if hue is None:
        v = rng.uniform(0.85, 1.0)
        return (int(255 * v),) * 3
    h = (hue + rng.uniform(-0.03, 0.03)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    return int(255 * r), int(255 * g), int(255 * b)


def draw_flower(label: int, index: int, size: int, seed: int) -> Image.Image:
    """Image ``index`` of class ``label``: the same arguments always give the same pixels."""
    _, petals, (length, width), hue = FLOWER_KINDS[label]
    rng = np.random.default_rng([seed, label, index])
    # leafy background: smooth green/brown noise
    base = rng.uniform([20, 60, 10], [90, 140, 60])
    noise = rng.normal(0, 28, size=(size // 8 + 1, size // 8 + 1, 3))
    bg = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg).resize((size, size), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):  # stray leaves
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.05, 0.15) * size
        draw.ellipse([cx - r, cy - r / 2, cx + r, cy + r / 2], fill=tuple(int(c) for c in rng.uniform([10, 70, 10], [60, 160, 50])))
    radius = rng.uniform(0.25, 0.45) * size
    cx, cy = size / 2 + rng.uniform(-0.2, 0.2, 2) * size
    rot = rng.uniform(0, 2 * math.pi)
    colour = _rgb(hue, rng)
    for k in range(petals):
        a = rot + 2 * math.pi * k / petals
        # a petal: a polygon from the centre out to length*radius, widest at half length
        pts = []
        for t in np.linspace(0, 1, 12):
            w = width * radius * math.sin(math.pi * t) * 0.5
            d = length * radius * t + radius * 0.15
            pts.append((d, w))
        pts += [(d, -w) for d, w in reversed(pts)]
        poly = [(cx + d * math.cos(a) - w * math.sin(a), cy + d * math.sin(a) + w * math.cos(a)) for d, w in pts]
        draw.polygon(poly, fill=colour, outline=tuple(max(0, c - 60) for c in colour))
    c = radius * 0.18
    draw.ellipse([cx - c, cy - c, cx + c, cy + c], fill=(int(rng.uniform(150, 230)), int(rng.uniform(100, 170)), 20))
    return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.0, 0.8)))


def generate(directory: str | Path, num_classes: int, images_per_class: int, image_size: int, seed: int) -> Path:
    """Write the synthetic dataset as a class-per-folder PNG tree (reused when already there)."""
    directory = Path(directory)
    params = {
        "version": GENERATOR_VERSION,
        "num_classes": num_classes,
        "images_per_class": images_per_class,
        "image_size": image_size,
        "seed": seed,
    }
    marker = directory / ".synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    wanted = set(class_names(num_classes))
    for name in set(class_names(len(FLOWER_KINDS))) - wanted:  # classes of an earlier, larger run
        for stale in (directory / name).glob("*.png"):
            stale.unlink()
        if (directory / name).is_dir() and not any((directory / name).iterdir()):
            (directory / name).rmdir()
    for label, name in enumerate(class_names(num_classes)):
        class_dir = directory / name
        class_dir.mkdir(exist_ok=True)
        for stale in class_dir.glob("*.png"):
            stale.unlink()
        for index in range(images_per_class):
            draw_flower(label, index, image_size, seed).save(class_dir / f"{index:05d}.png")
    marker.write_text(json.dumps(params))  # last: a half-written tree is never taken as complete
    return directory

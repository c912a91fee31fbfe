"""Decode one image file to a fixed-size RGB uint8 array, the way every stage stores images."""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

# A truncated JPEG must be an error we count, not a half-grey image we train on.
ImageFile.LOAD_TRUNCATED_IMAGES = False
RESIZE_MODES = ("squash", "short_side_crop")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and 32-bit greyscale are rescaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning; alpha is dropped below as Keras does
    return img if img.mode == "RGB" else img.convert("RGB")


def resize(img: Image.Image, size: int, mode: str) -> Image.Image:
    """``squash``: straight to size x size (Keras ``load_img``); ``short_side_crop``: keep aspect, centre crop."""
    if mode == "squash":
        return img.resize((size, size), Image.BILINEAR)
    if mode == "short_side_crop":
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.crop((left, top, left + size, top + size))
    raise ValueError(f"unknown resize mode {mode!r}; allowed: {RESIZE_MODES}")


def load_image(path: str, size: int, mode: str = "squash") -> np.ndarray:
    """Decode, turn upright by its EXIF orientation, convert to RGB and resize one file; raises on
    unreadable or corrupt files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's "palette with transparency" etc.: handled in to_rgb
        with Image.open(path) as img:
            img.load()
            # As a viewer shows it: phone photos store pixels sideways plus an EXIF orientation tag.
            upright = ImageOps.exif_transpose(img)
            out = resize(to_rgb(upright), size, mode)
    return np.asarray(out, dtype=np.uint8)

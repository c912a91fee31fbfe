"""Batched, on-device augmentation of uint8 N x H x W x 3 image tensors.

Everything here works on a whole batch at once on whatever device the batch is on, so a training
worker never loops over images in Python: crops and flips are one gather, random-resized crops
one ``torchvision.ops.roi_align`` call, mixup one ``torch.roll``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def random_crop_flip(
    images: torch.Tensor,
    crop: int,
    flip: bool = True,
    generator: torch.Generator | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """A random ``crop`` x ``crop`` window of each image, mirrored with probability 1/2 (uint8 in, uint8 out).

    ``index`` picks the batch out of ``images`` in the same pass (no separate copy of the batch).
    """
    n = images.shape[0] if index is None else int(index.shape[0])
    _, h, w, _ = images.shape
    if crop > h or crop > w:
        raise ValueError(f"crop {crop} is larger than the stored images ({h}x{w})")
    dev = images.device
    oy = torch.randint(0, h - crop + 1, (n,), generator=generator, device=dev)
    ox = torch.randint(0, w - crop + 1, (n,), generator=generator, device=dev)
    mirrored = (torch.rand(n, generator=generator, device=dev) < 0.5) if flip else torch.zeros(n, dtype=torch.bool, device=dev)
    src = torch.arange(n, device=dev) if index is None else index.to(dev)
    if dev.type == "cpu":
        # On CPU, one strided copy per image is ~4x faster than a batched gather, whose per-element
        # index arithmetic dominates (measured: 27 ms vs 107 ms for 256 crops of 224 from 244).
        return _crop_per_image(images, src, oy, ox, mirrored, crop)
    return _crop_gather(images, src, oy, ox, mirrored, crop)  # one kernel on an accelerator


def _crop_per_image(images, src, oy, ox, mirrored, crop: int) -> torch.Tensor:
    out = torch.empty((len(src), crop, crop, images.shape[3]), dtype=images.dtype, device=images.device)
    for i, (j, y, x, m) in enumerate(zip(src.tolist(), oy.tolist(), ox.tolist(), mirrored.tolist())):
        window = images[j, y : y + crop, x : x + crop]
        out[i] = window.flip(1) if m else window
    return out


def _crop_gather(images, src, oy, ox, mirrored, crop: int) -> torch.Tensor:
    ar = torch.arange(crop, device=images.device)
    rows = oy[:, None] + ar
    cols = torch.where(mirrored[:, None], ox[:, None] + crop - 1 - ar, ox[:, None] + ar)
    return images[src[:, None, None], rows[:, :, None], cols[:, None, :]]


def center_crop(images: torch.Tensor, crop: int) -> torch.Tensor:
    """The central ``crop`` x ``crop`` window (NHWC, any dtype)."""
    _, h, w, _ = images.shape
    top, left = (h - crop) // 2, (w - crop) // 2
    return images[:, top : top + crop, left : left + crop]


def to_float(images: torch.Tensor, mean, std, channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW, ``(x / 255 - mean) / std`` per channel.

    One conversion pass plus in-place arithmetic: at 224 px the float batch is what costs (memory
    bandwidth), so no temporary copies. ``channels_last`` keeps NHWC memory order, which skips the
    transpose and is what convnets on GPU prefer.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=fmt)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) * 255.0
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) * 255.0
    return x.sub_(m).div_(s)


def renormalize(x: torch.Tensor, mean_from, std_from, mean_to, std_to) -> torch.Tensor:
    """Re-express a batch normalised with one mean/std in another's (student -> teacher input)."""
    if tuple(mean_from) == tuple(mean_to) and tuple(std_from) == tuple(std_to):
        return x
    view = lambda v: torch.as_tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)  # noqa: E731
    return (x * view(std_from) + view(mean_from) - view(mean_to)) / view(std_to)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float NCHW -> size x size (bilinear, antialiased when shrinking)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device=None,
    attempts: int = 10,
) -> torch.Tensor:
    """Inception-style boxes (x1, y1, x2, y2), as torchvision's RandomResizedCrop draws them, for n images."""
    area = height * width
    target = area * _uniform(n * attempts, scale[0], scale[1], generator, device)
    log_r = _uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), generator, device)
    r = torch.exp(log_r)
    w = torch.sqrt(target * r).round()
    h = torch.sqrt(target / r).round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    w, h, ok = w.view(n, attempts), h.view(n, attempts), ok.view(n, attempts)
    first = torch.argmax(ok.int(), dim=1)  # first valid attempt per image
    has = ok.any(dim=1)
    pick = lambda t: t.gather(1, first[:, None]).squeeze(1)  # noqa: E731
    cw, ch = pick(w), pick(h)
    # Fallback, as torchvision: the whole image, clamped to the allowed ratio.
    in_ratio = width / height
    fw = float(width) if ratio[0] <= in_ratio <= ratio[1] else (float(round(height * ratio[0])) if in_ratio < ratio[0] else float(width))
    fh = float(height) if ratio[0] <= in_ratio <= ratio[1] else (float(height) if in_ratio < ratio[0] else float(round(width / ratio[1])))
    cw = torch.where(has, cw, torch.full_like(cw, fw))
    ch = torch.where(has, ch, torch.full_like(ch, fh))
    x1 = torch.floor(torch.rand(n, generator=generator, device=device) * (width - cw + 1))
    y1 = torch.floor(torch.rand(n, generator=generator, device=device) * (height - ch + 1))
    x1 = torch.where(has, x1, (width - cw) // 2)
    y1 = torch.where(has, y1, (height - ch) // 2)
    return torch.stack([x1, y1, x1 + cw, y1 + ch], dim=1)


def crop_resize_boxes(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box i of image i out of float NCHW ``x`` and resize it to size x size (one roi_align)."""
    n = x.shape[0]
    rois = torch.cat([torch.arange(n, device=x.device, dtype=x.dtype)[:, None], boxes.to(x.dtype)], dim=1)
    # sampling_ratio=2 averages 2x2 samples per output pixel: a cheap anti-alias for large crops.
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each NCHW image with probability 1/2."""
    mirrored = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(mirrored[:, None, None, None], x.flip(-1), x)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Inception crop + optional flip of a float NCHW batch, one box per image."""
    boxes = sample_crop_boxes(x.shape[0], x.shape[-2], x.shape[-1], scale, ratio, generator, x.device)
    out = crop_resize_boxes(x, boxes, size)
    return random_flip(out, generator) if flip else out


def sample_mixup_lambda(generator: torch.Generator | None = None, device=None, fold: bool = False) -> torch.Tensor:
    """lambda ~ U(0, 1) (function matching); ``fold`` uses max(lambda, 1 - lambda)."""
    lam = torch.rand((), generator=generator, device=device)
    return torch.maximum(lam, 1 - lam) if fold else lam


def mixup_rolled(x: torch.Tensor, lam: torch.Tensor | float, reverse: bool = False) -> torch.Tensor:
    """``lam * x + (1 - lam) * partner``: the partner of image i is image i-1 (``torch.roll`` by one,
    as big_vision) or, with ``reverse``, image n-1-i (the Keras example)."""
    partner = x.flip(0) if reverse else torch.roll(x, shifts=1, dims=0)
    return lam * x + (1 - lam) * partner


def mix(x: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``lam * x + (1 - lam) * partner`` with one lambda per image (replayed function-matching views)."""
    lam = lam.to(x.dtype).view(-1, 1, 1, 1)
    return lam * x + (1 - lam) * partner


def sample_views(
    n: int,
    height: int,
    width: int,
    kind: str,
    crop: int,
    scale: tuple[float, float] = (0.08, 1.0),
    generator: torch.Generator | None = None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One view per image as (boxes (x1, y1, x2, y2) in stored pixels, mirrored flags).

    ``kind`` is ``train.augment``: ``crop_flip`` draws a ``crop``-sized window at a random offset,
    ``inception`` a random-resized box, ``none`` the whole image (not mirrored). A view can be
    rendered at any size (:func:`render_views`), so a teacher can see the student's box larger.
    """
    if kind == "inception":
        boxes = sample_crop_boxes(n, height, width, scale, generator=generator, device=device)
    elif kind == "crop_flip":
        if crop > height or crop > width:
            raise ValueError(f"crop {crop} is larger than the stored images ({height}x{width})")
        oy = torch.randint(0, height - crop + 1, (n,), generator=generator, device=device).float()
        ox = torch.randint(0, width - crop + 1, (n,), generator=generator, device=device).float()
        boxes = torch.stack([ox, oy, ox + crop, oy + crop], dim=1)
    else:
        boxes = torch.tensor([[0.0, 0.0, float(width), float(height)]], device=device).expand(n, 4).clone()
        return boxes, torch.zeros(n, dtype=torch.bool, device=device)
    return boxes, torch.rand(n, generator=generator, device=device) < 0.5


def view_mode(kind: str, crop: int, size: int) -> str:
    """How views of augmentation ``kind`` drawn for ``crop`` are rendered at ``size``: ``window``
    (integer crops at their own size), ``full`` (whole images, resized) or ``box`` (crop + resize).
    Decided from the settings, not the boxes, so that no step waits on the device to find out."""
    if kind == "crop_flip" and size == crop:
        return "window"
    return "full" if kind == "none" else "box"


def render_views(images: torch.Tensor, idx: torch.Tensor, boxes: torch.Tensor, mirrored: torch.Tensor, size: int, mean, std,
                 mode: str = "box", channels_last: bool = False) -> torch.Tensor:
    """Rows ``idx`` of stored uint8 NHWC ``images``, box i cut out of image i, resized to ``size``,
    mirrored where flagged: the normalised float NCHW batch a model sees for those views.
    ``mode``: see :func:`view_mode`."""
    if mode == "window":
        # Windows already at the output size: an integer crop of the uint8 images, no resampling.
        oy, ox = boxes[:, 1].long(), boxes[:, 0].long()
        crop = _crop_per_image if images.device.type == "cpu" else _crop_gather
        return to_float(crop(images, idx.to(images.device), oy, ox, mirrored, size), mean, std, channels_last)
    x = to_float(images[idx], mean, std, channels_last)
    out = resize(x, size) if mode == "full" else crop_resize_boxes(x, boxes, size)
    return torch.where(mirrored[:, None, None, None], out.flip(-1), out)

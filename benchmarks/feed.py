"""One epoch of augmented training batches: stored shards vs decoding JPEGs every epoch.

    python benchmarks/feed.py ../shared/datasets/flower_photos [--stored 244 --crop 224 --batch 256]

Shards side: the split is read once into a uint8 tensor (time reported apart), then every batch
is a random crop + flip + normalisation on the tensor (pipeline.data.augment).
JPEG side: what the Keras example does each epoch, as a torch DataLoader with 2 workers: open,
decode, resize to the stored size, random crop, flip, normalise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import load_config  # noqa: E402
from pipeline.data import augment  # noqa: E402
from pipeline.data.loading import load_split  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class JpegFolder(Dataset):
    def __init__(self, paths, labels, stored, crop):
        self.paths, self.labels = paths, labels
        self.tf = T.Compose([T.Resize((stored, stored)), T.RandomCrop(crop), T.RandomHorizontalFlip(),
                             T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.tf(img.convert("RGB")), self.labels[i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("--stored", type=int, default=244)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)

    import ray

    from pipeline.data.preprocess import preprocess

    ray.init(logging_level="ERROR")
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [f"output_dir={out}", "data.source=folder", f"data.path={args.data_dir}",
                                 f"data.image_size={args.stored}", "data.val_fraction=0.0"])
        result = preprocess(cfg, log=lambda *_: None)
        t = time.perf_counter()
        train = load_split(result["shard_dir"], "train")
        load_s = time.perf_counter() - t
    ray.shutdown()
    n = len(train)

    def shards_epoch():
        perm = torch.randperm(n)
        for b in range(0, n, args.batch):
            idx = perm[b : b + args.batch]
            x = augment.to_float(augment.random_crop_flip(train.images, args.crop, index=idx), MEAN, STD, channels_last=True)
            y = train.labels[idx]
        return x.shape, y.shape

    loader = DataLoader(JpegFolder(train.paths, train.labels.tolist(), args.stored, args.crop),
                        batch_size=args.batch, shuffle=True, num_workers=2, persistent_workers=False)

    def jpeg_epoch():
        for x, y in loader:
            pass
        return x.shape, y.shape

    def timed(fn):
        times = []
        for _ in range(args.epochs):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    shard_s = timed(shards_epoch)
    jpeg_s = timed(jpeg_epoch)
    print(f"images per epoch: {n}, stored {args.stored}px, crop {args.crop}px, batch {args.batch}")
    print(f"shards -> tensor, once      : {load_s:7.2f} s")
    print(f"epoch from shards (augment) : {shard_s:7.2f} s  ({n / shard_s:8.1f} img/s)")
    print(f"epoch decoding JPEGs (DL x2): {jpeg_s:7.2f} s  ({n / jpeg_s:8.1f} img/s)")
    print(f"ratio (JPEG / shards)       : {jpeg_s / shard_s:6.1f}x   (goal >= 10x)")


if __name__ == "__main__":
    main()

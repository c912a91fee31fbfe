"""Ray Data preprocessing vs a single-process PIL loop, side by side on the same files.

    python benchmarks/preprocess.py ../shared/datasets/flower_photos [--size 224]

Both sides decode, convert to RGB and resize every image into one uint8 N x S x S x 3 array;
the Ray side goes through the real stage (shards + manifest) and reads the shards back.
Ray's start-up (~6 s, paid once per process or cluster) is reported apart.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.images import load_image  # noqa: E402
from pipeline.data.loading import load_split  # noqa: E402
from pipeline.data.sources import list_class_folders  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()

    _, files_by_class, _ = list_class_folders(args.data_dir)
    files = [f for fs in files_by_class for f in fs]
    n = len(files)

    t = time.perf_counter()
    loop = np.empty((n, args.size, args.size, 3), np.uint8)
    for i, f in enumerate(files):
        loop[i] = load_image(f, args.size)
    loop_s = time.perf_counter() - t

    import ray

    from pipeline.data.preprocess import preprocess

    t = time.perf_counter()
    ray.init(logging_level="ERROR")
    init_s = time.perf_counter() - t
    runs = []
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [f"output_dir={out}", "data.source=folder", f"data.path={args.data_dir}",
                                 f"data.image_size={args.size}", "data.val_fraction=0.0"])
        for _ in range(2):  # cold: Ray starts worker processes and imports; warm: they are up
            t = time.perf_counter()
            result = preprocess(cfg, force=True, log=lambda *_: None)
            stored = load_split(result["shard_dir"], "train")
            runs.append(time.perf_counter() - t)
            assert len(stored) == n, (len(stored), n)
            assert np.array_equal(stored.images.numpy()[0], loop[files.index(stored.paths[0])])
    cpus = int(ray.cluster_resources().get("CPU", 0))
    print(f"images: {n} at {args.size}px, Ray CPUs: {cpus}")
    print(f"single-process PIL loop      : {loop_s:7.2f} s  ({n / loop_s:6.1f} img/s)")
    for name, secs in (("cold", runs[0]), ("warm", runs[1])):
        print(f"Ray Data stage + read ({name}): {secs:7.2f} s  ({n / secs:6.1f} img/s)   ratio loop/Ray {loop_s / secs:5.2f}x (goal >= 1.5x)")
    print(f"ray.init (not included)  : {init_s:7.2f} s")


if __name__ == "__main__":
    main()

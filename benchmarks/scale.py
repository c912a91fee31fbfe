"""Memory mode vs stream mode on a dataset of 50,000 synthetic images, side by side in one run.

    python benchmarks/scale.py [--images 50000 --size 64 --model resnet10t --epochs 2 --workers 2 --out /tmp/scale]

Peak memory with a part larger than a worker's fixed cost (about 1.4 GB here): larger stored images,
trained on small crops so that an epoch stays short (the crop changes the compute, not what a worker
holds), e.g. ``--images 30000 --size 224 --crop 16 --workers 1 --epochs 1``.

1. Writes Parquet shards in the pipeline's format (pixels drawn per class, not photos: this measures
   the feed, not accuracy) and reuses them on the next run.
2. Bytes read per rank at world sizes 1 and 2: memory mode (``load_split``'s own count of column
   chunks read) and stream mode (rows a rank receives from Ray Data's split, times their size).
3. The teacher stage (a timm model from scratch, ``teacher.mode=full``) on ``--workers`` Ray Train workers,
   once with ``train.data=memory`` and once with ``train.data=stream``: epoch throughput (the last
   epoch's images/s, as the loop reports it) and each worker's peak memory, sampled from outside
   (``WorkerMemory``): RSS, and RSS without the shared-memory object store's pages.

The last line reads ``stream / memory throughput: R``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: pipeline
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # beside this script: synthetic_shards

from pipeline.config import load_config  # noqa: E402
from pipeline.data.loading import load_split, read_manifest  # noqa: E402
from synthetic_shards import write_shards  # noqa: E402


def stream_bytes_per_rank(shard_dir: str, world: int, batch: int) -> list[int]:
    """Bytes of pixels each rank receives in one epoch of stream mode (all ranks read at once)."""
    import torch

    from pipeline.data.streaming import epoch_batches, stream_dataset

    shape = tuple(read_manifest(shard_dir)["image_shape"])
    shards = stream_dataset(shard_dir, "train").streaming_split(world, equal=True) if world > 1 else [
        stream_dataset(shard_dir, "train").iterator()]
    got = [0] * world

    def consume(rank: int) -> None:
        for images, _, _ in epoch_batches(shards[rank], batch, shape, torch.device("cpu"), seed=rank):
            got[rank] += images.numel()

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


class WorkerMemory:
    """Samples the memory of this machine's Ray Train worker processes from outside, every 0.2 s,
    from the start of a run (so memory mode's load is in it) to its end. Per worker: peak VmRSS and
    peak RssAnon + RssFile, i.e. without the pages of Ray's shared-memory object store a worker has
    touched (RssShmem), which stream mode's batches pass through and which ``ru_maxrss`` counts."""

    def __init__(self) -> None:
        self.peaks: dict[int, list[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "WorkerMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if b"RayTrainWorker" not in f.read():
                            continue
                    with open(f"/proc/{pid}/status") as f:
                        kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in (
                            "VmRSS", "RssAnon", "RssFile")}
                except (OSError, ValueError):
                    continue
                peak = self.peaks.setdefault(pid, [0, 0])
                peak[0] = max(peak[0], kb.get("VmRSS", 0) * 1024)
                peak[1] = max(peak[1], (kb.get("RssAnon", 0) + kb.get("RssFile", 0)) * 1024)

    def workers(self, n: int) -> list[list[int]]:
        """[peak RSS, peak RSS without shared memory] of the ``n`` largest workers (one per rank)."""
        return sorted(self.peaks.values(), key=lambda p: -p[0])[:n]


def train(args, shard_dir: str, mode: str) -> dict:
    from pipeline.stages import run_training_stage
    from pipeline.tracking import tracked

    out = os.path.join(args.out, f"run-{mode}")
    cfg = load_config(None, [
        f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", "tracking.experiment=scale",
        f"ray.num_workers={args.workers}", f"train.data={mode}", "train.eval_every=1000", "train.checkpoint_every=1000",
        *([f"train.crop_size={args.crop}"] if args.crop else []),
        f"teacher.model={args.model}", "teacher.pretrained=none", "teacher.mode=full", f"teacher.epochs={args.epochs}",
        f"teacher.batch_size={args.batch}", "teacher.lr=0.002",
    ])
    with tracked(cfg, "teacher") as tracker, WorkerMemory() as memory:
        result = run_training_stage(cfg, "teacher", tracker, shard_dir=shard_dir, force=True, log=lambda *_: None,
                                    show_progress=False)
    last = result["history"][-1]
    return {"images_per_s": last["images_per_s"], "epoch_s": last["epoch_time_s"], "peak": memory.workers(args.workers),
            "train_loss": [h["train_loss"] for h in result["history"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers for the two training runs")
    ap.add_argument("--crop", type=int, default=None, help="train on crops of this size (default: the stored size)")
    ap.add_argument("--out", default="/tmp/pipeline-scale")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    shard_dir = write_shards(os.path.join(args.out, "shards"), args.images, max(1000, args.images // 50), args.size)
    split_mb = args.images * args.size * args.size * 3 / 1e6
    print(f"shards: {args.images} train images at {args.size} px, {split_mb:.0f} MB of pixels ({time.time() - t0:.0f} s)")

    import ray

    from pipeline.cluster import init_ray

    init_ray(load_config(None, [f"output_dir={args.out}"]).ray, args.out)
    print(f"\nbytes read per rank (train split {split_mb:.0f} MB)")
    print(f"{'world':>5} {'memory MB/rank':>16} {'stream MB/rank':>16} {'memory x split/world':>21}")
    for world in (1, 2):
        mem = [load_split(shard_dir, "train", r, world).bytes_read for r in range(world)]
        stream = stream_bytes_per_rank(shard_dir, world, args.batch // world)
        ratio = max(mem) / (split_mb * 1e6 / world)
        print(f"{world:>5} {'/'.join(f'{b / 1e6:.0f}' for b in mem):>16} {'/'.join(f'{b / 1e6:.0f}' for b in stream):>16} {ratio:>21.3f}")

    runs = {mode: train(args, shard_dir, mode) for mode in ("memory", "stream")}
    ray.shutdown()
    crop = f", {args.crop} px crops" if args.crop else ""
    print(f"\nteacher {args.model} from scratch, {args.workers} worker(s), {args.epochs} epochs, batch {args.batch}{crop}; last epoch")
    print(f"{'mode':<8} {'images/s':>9} {'epoch s':>8} {'peak RSS MB':>12} {'without shm MB':>15}  train loss by epoch")
    for mode, r in runs.items():
        rss = "/".join(f"{p[0] / 2**20:.0f}" for p in r["peak"])
        own = "/".join(f"{p[1] / 2**20:.0f}" for p in r["peak"])
        print(f"{mode:<8} {r['images_per_s']:>9.0f} {r['epoch_s']:>8.1f} {rss:>12} {own:>15}  {' '.join(f'{v:.3f}' for v in r['train_loss'])}")
    for i, what in enumerate(("peak RSS", "peak RSS without shared memory")):
        ratio = max(p[i] for p in runs["stream"]["peak"]) / max(p[i] for p in runs["memory"]["peak"])
        print(f"stream / memory {what}: {ratio:.2f}")
    print(f"total {time.time() - t0:.0f} s")
    print(f"stream / memory throughput: {runs['stream']['images_per_s'] / runs['memory']['images_per_s']:.2f}")


if __name__ == "__main__":
    main()

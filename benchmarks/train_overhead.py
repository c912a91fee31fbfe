"""What the training loop costs on top of plain PyTorch, side by side in one run.

    python benchmarks/train_overhead.py [--size 64 --batch 64 --epochs 4 --threads 2]

1. images/s of the Ray TorchTrainer loop (1 worker, DeiT-tiny student, no teacher) against a bare
   PyTorch loop with the same model, batch, augmentation, optimizer and thread count.
   Goal: >= 0.9x. The first epoch of each is warm-up and not counted.
2. One DeiT distillation step (student forward/backward + frozen teacher forward + loss) against a
   student-only step plus a teacher inference step on the same batch. Goal: ratio <= 1.1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.loading import load_split  # noqa: E402
from pipeline.models import build_student, build_teacher  # noqa: E402
from pipeline.data.batches import batch_for_training  # noqa: E402


def bare_loop(cfg, shard_dir, epochs: int) -> float:
    """Images/s of a plain loop: no Ray, no DDP, no scheduler, no metrics."""
    from timm.optim import create_optimizer_v2

    d = cfg.distill
    train = load_split(shard_dir, "train")
    torch.manual_seed(0)
    model, meta = build_student(d.student, "none", 5, cfg.train.crop_size, d.drop_path)
    model.set_distilled_training(True)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=d.weight_decay)
    gen = torch.Generator().manual_seed(0)
    per_epoch = []
    steps = len(train) // d.batch_size
    for _ in range(epochs):
        t = time.perf_counter()
        order = torch.randperm(len(train), generator=gen)
        model.train()
        for s in range(steps):
            idx = order[s * d.batch_size : (s + 1) * d.batch_size]
            x = batch_for_training(train.images, idx, cfg.train, cfg.train.crop_size, meta["mean"], meta["std"], gen, False)
            cls, dist = model(x)
            loss = F.cross_entropy((cls + dist) / 2, train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        per_epoch.append(steps * d.batch_size / (time.perf_counter() - t))
    return sum(per_epoch[1:]) / len(per_epoch[1:])


def step_costs(cfg, shard_dir, repeats: int = 6) -> tuple[float, float, float]:
    """Seconds per distillation step, per student-only step and per teacher forward (medians)."""
    from pipeline import losses

    d = cfg.distill
    train = load_split(shard_dir, "train")
    student, meta = build_student(d.student, "none", 5, cfg.train.crop_size, d.drop_path)
    student.set_distilled_training(True)
    teacher, _ = build_teacher("tf_efficientnet_lite0", "package", 5)
    teacher.eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    idx = torch.arange(d.batch_size)
    x = batch_for_training(train.images, idx, cfg.train, cfg.train.crop_size, meta["mean"], meta["std"], None, False)
    y = train.labels[idx]

    def student_step():
        cls, dist = student(x)
        loss = F.cross_entropy(cls, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def teacher_forward():
        with torch.no_grad():
            teacher(x)

    def distill_step():
        cls, dist = student(x)
        with torch.no_grad():
            t = teacher(x)
        loss = losses.deit_loss(cls, dist, y, t, "soft", 0.5, 1.0)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def median_time(fn):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    return median_time(distill_step), median_time(student_step), median_time(teacher_forward)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import ray
    from pipeline.data.preprocess import preprocess
    from pipeline.data.preprocess import built_shards
    from pipeline.stages import run_training_stage
    from pipeline.tracking import tracked

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [
            f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", "tracking.register_models=false",
            f"data.image_size={args.size + 8}", f"train.crop_size={args.size}", "data.synthetic.images_per_class=128",
            "ray.num_workers=1", f"ray.cpus_per_worker={args.threads}", f"train.threads_per_worker={args.threads}",
            "distill.type=none", f"distill.epochs={args.epochs}", f"distill.batch_size={args.batch}",
        ])
        ray.init(num_cpus=args.threads, logging_level="ERROR")
        preprocess(cfg, log=lambda *_: None)

        shard_dir = built_shards(cfg)
        with tracked(cfg, "benchmark") as tracker:
            result = run_training_stage(cfg, "distill", tracker, log=lambda *_: None)
        hist = result["history"][1:]
        ray_train_ips = sum(h["images_per_s"] for h in hist) / len(hist)
        n_train = load_split(shard_dir, "train").labels.numel()
        ray_whole_ips = sum(n_train // args.batch * args.batch / h["epoch_time_s"] for h in hist) / len(hist)
        ray.shutdown()
        bare_ips = bare_loop(cfg, shard_dir, args.epochs)
        distill_s, student_s, teacher_s = step_costs(cfg, shard_dir)
    print(f"DeiT-tiny student at {args.size}px, batch {args.batch}, {args.threads} threads, epochs {args.epochs} (first not counted)")
    print(f"bare PyTorch loop                : {bare_ips:8.1f} img/s")
    print(f"Ray TorchTrainer loop, training  : {ray_train_ips:8.1f} img/s   ratio {ray_train_ips / bare_ips:5.2f}x (goal >= 0.9x)")
    print(f"Ray TorchTrainer, whole epoch    : {ray_whole_ips:8.1f} img/s   ratio {ray_whole_ips / bare_ips:5.2f}x "
          "(includes validation, report, checkpoint)")
    print(f"distillation step                : {distill_s * 1000:8.1f} ms")
    print(f"student step + teacher forward   : {student_s * 1000:8.1f} + {teacher_s * 1000:.1f} ms")
    print(f"ratio                            : {distill_s / (student_s + teacher_s):5.2f}  (goal <= 1.1)")


if __name__ == "__main__":
    main()

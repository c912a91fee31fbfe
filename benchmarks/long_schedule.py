"""Per-epoch cost of a long function-matching schedule on CPU, split into data+augmentation and model time.

    python benchmarks/long_schedule.py [--images 1020 --stored 160 --crop 128 --batch 128 --epochs 3]

A Flowers102-sized training split (1,020 images stored at 160 px) lives in memory as one uint8 tensor;
each step draws inception crops + flips and a rolled mixup for the whole batch (FunMatchTask's own
input path), then runs the teacher forward and the student forward/backward/update. Goal: data and
augmentation at most 5 % of the epoch. The first epoch is warm-up and not counted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import checkpoints  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import synthetic  # noqa: E402
from pipeline.models import build_teacher  # noqa: E402
from pipeline.plan import plan_stage  # noqa: E402
from pipeline.train.steps import FunMatchTask, TrainBatch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1020)
    ap.add_argument("--stored", type=int, default=160)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--student", default="resnet10t")
    ap.add_argument("--teacher", default="resnet10t")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    k = 5
    images = torch.from_numpy(np.stack([np.asarray(synthetic.draw_flower(i % k, i, args.stored, seed=0)) for i in range(args.images)]))
    labels = torch.arange(args.images) % k  # unused by function matching
    with tempfile.TemporaryDirectory() as tmp:
        teacher, meta = build_teacher(args.teacher, "none", k)
        meta.update(class_names=[str(i) for i in range(k)], num_classes=k, image_size=args.stored, resize_mode="squash",
                    input_size=args.crop, eval_transform="center_crop")
        checkpoints.save(tmp, teacher.state_dict(), meta)
        cfg = load_config(None, ["distill.method=funmatch", f"distill.student={args.student}", f"data.image_size={args.stored}",
                                 f"train.crop_size={args.crop}", "distill.temperature=10", f"distill.teacher={tmp}"])
        plan = plan_stage(cfg, "distill", shard_dir="synthetic-in-memory")
        task = FunMatchTask(cfg, plan, {"num_classes": k, "image_size": args.stored}, torch.device("cpu"))
    model = task.model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=3e-4)
    gen = torch.Generator().manual_seed(0)
    steps = args.images // args.batch
    rows = []
    for epoch in range(args.epochs):
        data_s = model_s = 0.0
        t_epoch = time.perf_counter()
        order = torch.randperm(args.images, generator=gen)
        model.train()
        for s in range(steps):
            idx = order[s * args.batch : (s + 1) * args.batch]
            t = time.perf_counter()
            inputs = task.train_inputs(TrainBatch(images, labels, idx, gen))
            t2 = time.perf_counter()
            loss = task.eval_kl(model(inputs.student), task.teacher.logits(inputs.teacher))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            t3 = time.perf_counter()
            data_s += t2 - t
            model_s += t3 - t2
        rows.append((time.perf_counter() - t_epoch, data_s, model_s))
    epoch_s, data_s, model_s = (sum(r[i] for r in rows[1:]) / len(rows[1:]) for i in range(3))
    print(f"{args.images} images stored at {args.stored}px, crops {args.crop}px, batch {args.batch}, "
          f"student {args.student}, teacher {args.teacher}, {args.threads} threads")
    print(f"seconds per epoch            : {epoch_s:7.2f}")
    print(f"  data + augmentation        : {data_s:7.2f}  ({100 * data_s / epoch_s:4.1f} %, goal <= 5 %)")
    print(f"  model (teacher + student)  : {model_s:7.2f}  ({100 * model_s / epoch_s:4.1f} %)")
    print(f"epochs per hour at this rate : {3600 / epoch_s:7.0f}")


if __name__ == "__main__":
    main()

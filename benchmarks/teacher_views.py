"""What a teacher costs a student's epoch: online, replayed from the label stage, or not at all.

    python benchmarks/teacher_views.py [--photos ../shared/datasets/flower_photos] [--per-class 128]
                                       [--views 2] [--threads 2] [--student resnet10t]
                                       [--method deit|funmatch]

Side by side in one run, on a class-balanced subset of the real photos (stored at 240 px), with a
112 px student and an EfficientNet-Lite2 teacher (package weights, 5-class head) seeing each box at
224 px:

1. a student epoch without a teacher, with the online teacher, and replaying the label stage's
   views; each from the pipeline's own task code (``DeitTask.train_step`` + AdamW), in this process,
   with ``--threads`` torch threads. Goal: replay epoch <= 1.1x the no-teacher epoch.
2. the label stage (Ray Data, ``ray.num_workers`` teacher actors) in views/s against the teacher's
   bare batched inference on the same views (one process, the same total threads). Goal: >= 0.9x.

With ``--method funmatch`` the student learns by function matching instead (KL to the teacher on
mixed-up views, the teacher seeing the student's 112 px tensor, so the label step mixes each view
with its recorded partner); the no-teacher epoch is the same student trained on labels alone.

The last line reads ``replay epoch / no-teacher epoch: R``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import checkpoints  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import augment  # noqa: E402
from pipeline.data.loading import load_split, read_manifest  # noqa: E402
from pipeline.models import build_teacher  # noqa: E402

PHOTOS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "datasets", "flower_photos")


def subset(photos: str, per_class: int, into: str) -> str:
    """The first ``per_class`` photos of every class (sorted names), copied into a tree of its own."""
    for cls in sorted(d for d in os.listdir(photos) if os.path.isdir(os.path.join(photos, d))):
        os.makedirs(os.path.join(into, cls))
        for name in sorted(os.listdir(os.path.join(photos, cls)))[:per_class]:
            shutil.copy(os.path.join(photos, cls, name), os.path.join(into, cls, name))
    return into


def save_teacher(path: str, class_names: list[str]) -> str:
    """Lite2 from its package weights with a fresh head: the right cost, whatever its accuracy."""
    torch.manual_seed(0)
    model, meta = build_teacher("tf_efficientnet_lite2", "package", len(class_names))
    meta = {**meta, "class_names": class_names, "num_classes": len(class_names), "image_size": 240, "resize_mode": "squash",
            "input_size": 224, "eval_transform": "resize", "checkpoint_id": "benchmark-lite2"}
    checkpoints.save(path, model.state_dict(), meta)
    return path


def epoch_seconds(cfg, shard_dir: str, teacher: str | None, views: str | None) -> float:
    """One epoch of the pipeline's DeiT task over the training split (after one warm-up step)."""
    from pipeline.plan import plan_stage
    from pipeline.train.steps import TrainBatch, build_task
    from timm.optim import create_optimizer_v2

    if teacher is None:  # the same student on labels alone
        cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"method": "deit", "type": "none", "teacher_views": 0})})
    elif views is None:
        cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"teacher_views": 0})})
    plan = plan_stage(cfg, "distill", shard_dir).with_teacher_inputs(views)
    train = load_split(shard_dir, "train")
    task = build_task(cfg, plan, read_manifest(shard_dir), torch.device("cpu"))
    task.bind_train_part(train.paths, torch.device("cpu"))
    model = task.model
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    batch = cfg.distill.batch_size
    gen = torch.Generator().manual_seed(0)

    def step(idx):
        out = task.train_step(model, TrainBatch(train.images, train.labels, idx, gen))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    model.train()
    step(torch.arange(batch))
    order = torch.randperm(len(train), generator=gen)
    t0 = time.perf_counter()
    for s in range(len(train) // batch):
        step(order[s * batch : (s + 1) * batch])
    return time.perf_counter() - t0


def bare_inference_views_per_s(shard_dir: str, teacher: str, store: str, batch: int = 32) -> float:
    """The teacher alone on the label stage's own views: render each box at the teacher's size (mixed
    with its partner's for function matching), forward, batched."""
    from pipeline.label import load_views
    from pipeline.models import prefers_channels_last

    views = load_views(store)
    train = load_split(shard_dir, "train")
    rows = torch.tensor([train.paths.index(p) for p in views.paths])
    model, meta = checkpoints.load_model(teacher)
    channels_last = prefers_channels_last(model, torch.device("cpu"))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    n, k = views.boxes.shape[:2]
    size = views.manifest["teacher_input_size"]
    idx = rows.repeat_interleave(k)
    boxes, flips = views.boxes.reshape(-1, 4), views.flips.reshape(-1)
    if views.partners is not None:
        partner = (views.partners * k + torch.arange(k)).reshape(-1)  # flat index of the partner's view k
        lams = views.lams.reshape(-1)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n * k, batch):
            x = augment.render_views(train.images, idx[i : i + batch], boxes[i : i + batch], flips[i : i + batch], size,
                                     meta["mean"], meta["std"], "box", channels_last)
            if views.partners is not None:
                p = partner[i : i + batch]
                x = augment.mix(x, augment.render_views(train.images, idx[p], boxes[p], flips[p], size, meta["mean"], meta["std"],
                                                        "box", channels_last), lams[i : i + batch])
            model(x)
    return n * k / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default=PHOTOS)
    ap.add_argument("--per-class", type=int, default=128, help="photos per class in the subset (train + val)")
    ap.add_argument("--views", type=int, default=2, help="K, views per image in the label stage")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--student", default="resnet10t")
    ap.add_argument("--method", choices=["deit", "funmatch"], default="deit",
                    help="deit: soft KD on the teacher's 224 px view; funmatch: function matching on mixed views")
    ap.add_argument("--label-only", action="store_true",
                    help="measure only the label stage against bare inference (at the protocol's scale: --per-class 600 --views 4)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ray

    from pipeline.data.preprocess import preprocess
    from pipeline.label import label_views, load_views

    with tempfile.TemporaryDirectory() as tmp:
        photos = subset(os.path.abspath(args.photos), args.per_class, os.path.join(tmp, "photos"))
        cfg = load_config(None, [
            f"output_dir={tmp}/out", f"tracking.uri=sqlite:///{tmp}/mlflow.db", "data.source=folder", f"data.path={photos}",
            "data.image_size=240", "data.val_fraction=0.1", "train.crop_size=112", "train.augment=inception",
            "train.inception_scale=[0.25,1.0]", f"distill.student={args.student}", "distill.student_pretrained=none",
            "distill.type=soft", f"distill.method={args.method}", "distill.temperature=2.0", f"distill.teacher_views={args.views}", "distill.batch_size=64", "distill.drop_path=0.0",
            f"ray.num_workers={args.threads}", "ray.cpus_per_worker=1",
        ])
        ray.init(num_cpus=args.threads, logging_level="ERROR", include_dashboard=False)
        shard_dir = preprocess(cfg, log=lambda *_: None)["shard_dir"]
        manifest = read_manifest(shard_dir)
        teacher = save_teacher(os.path.join(tmp, "teacher"), manifest["class_names"])
        cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"teacher": teacher})})
        n_train = manifest["split_sizes"]["train"]
        seen = "112 px, mixed views (function matching)" if args.method == "funmatch" else "224 px"
        print(f"{n_train} training photos at 240 px; student {args.student} at 112 px; teacher Lite2 at {seen}; "
              f"{args.threads} threads; K = {args.views}")

        t0 = time.perf_counter()
        store = label_views(cfg, shard_dir, teacher, "benchmark-lite2", log=lambda *_: None)
        label_s = time.perf_counter() - t0
        ray.shutdown()
        done = load_views(store).manifest
        label_rate = (done["views"] + done["val_images"]) / label_s  # it also labels each validation image once
        bare_rate = bare_inference_views_per_s(shard_dir, teacher, store)
        print(f"label stage (Ray Data, {args.threads} teacher actors, start-up included): {label_rate:.1f} views/s "
              f"({label_s:.0f} s); bare batched inference: {bare_rate:.1f} views/s")
        if args.label_only:
            print(f"label stage / bare inference throughput: {label_rate / bare_rate:.2f}")
            return 0

        alone = epoch_seconds(cfg, shard_dir, None, None)
        online = epoch_seconds(cfg, shard_dir, teacher, None)
        replay = epoch_seconds(cfg, shard_dir, teacher, store)

    print(f"epoch of {n_train} images: no teacher {alone:.1f} s, online teacher {online:.1f} s, replayed views {replay:.1f} s")
    print(f"label stage / bare inference throughput: {label_rate / bare_rate:.2f}")
    print(f"online teacher epoch / no-teacher epoch: {online / alone:.2f}")
    print(f"replay epoch / no-teacher epoch: {replay / alone:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU check: the pipeline's own training loop on one GPU, without Ray or MLflow.

    python benchmarks/gpu_check.py [--device cuda] [--out /tmp/gpu-check]
    python benchmarks/gpu_check.py --smoke --device cpu      # the same code paths, tiny (the test suite runs this)

The GPU machines we are lent have torch, timm and pyarrow but neither Ray nor MLflow, so this drives
``run_loop`` with a hand-made ``LoopContext`` (rank 0 of 1) on shards written straight from
generated pixels (``synthetic_shards.py``). It needs pydantic and PyYAML besides. Three runs:

1. **online**: the DeiT-tiny student (distillation token, soft) with a tf_efficientnet_lite2 teacher
   in the step, 224 px crops of 240 px images, bf16 autocast, channels-last.
2. **views**: the same student replaying 2 teacher views per image, labelled beforehand by the same
   teacher in this process (``pipeline.label`` with ``in_process=True``; the label time is shown).
3. **funmatch**: function matching (the same mixed-up image for teacher and student) with the
   BiT-ResNet50x1 student at 128 px crops of 160 px images, on 1,020 images.

The teacher has random weights (no weights travel to the GPU machine; throughput does not depend
on them). Each row shows the last epoch's images/s as the loop measures it and the training loss of
the first and last epoch; the check fails (exit 1) when a loss did not fall. Goals on an H100/H200:
online >= 5,000 images/s, views >= 10,000.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: pipeline
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # beside this script: synthetic_shards

import torch  # noqa: E402

from pipeline import checkpoints  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.models import build_teacher  # noqa: E402
from pipeline.plan import plan_stage  # noqa: E402
from pipeline.train.loop import LoopContext, run_loop  # noqa: E402
from synthetic_shards import write_shards  # noqa: E402

GOALS = {"online": 5000.0, "views": 10000.0}
CLASSES = 10
# (train images, stored px, crop px, batch, epochs) for the DeiT runs and the function-matching run
FULL = {"deit": (10240, 240, 224, 256, 3), "funmatch": (1020, 160, 128, 256, 3)}
SMOKE = {"deit": (48, 40, 32, 16, 3), "funmatch": (48, 40, 32, 16, 3)}


def save_teacher(path: str, shard_dir: str, input_size: int) -> str:
    """A tf_efficientnet_lite2 teacher checkpoint for these shards (random weights, seeded)."""
    from pipeline.data.loading import read_manifest

    torch.manual_seed(0)
    manifest = read_manifest(shard_dir)
    model, meta = build_teacher("tf_efficientnet_lite2", "none", manifest["num_classes"])
    meta = {**meta, "class_names": manifest["class_names"], "num_classes": manifest["num_classes"],
            "image_size": manifest["image_size"], "resize_mode": manifest["resize_mode"], "input_size": input_size,
            "eval_transform": "resize", "checkpoint_id": f"gpu-check-lite2-{input_size}", "stage": "teacher"}
    checkpoints.save(path, model.state_dict(), meta)
    return path


def fit(cfg, shard_dir: str, device: torch.device, teacher_inputs: str | None = None) -> list[dict]:
    """The distill stage's loop on this process's device; returns its per-epoch reports."""
    reports: list[dict] = []
    plan = plan_stage(cfg, "distill", shard_dir).with_teacher_inputs(teacher_inputs)
    ctx = LoopContext(0, 1, device, lambda metrics, _ckpt: reports.append(dict(metrics)), print_fn=lambda *_: None)
    run_loop(cfg, plan, ctx)
    return [r for r in reports if "train_loss" in r]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="/tmp/gpu-check")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: the code paths, not the speed")
    args = ap.parse_args()
    device = torch.device(args.device)
    sizes = SMOKE if args.smoke else FULL
    gpu = device.type == "cuda"
    if gpu:
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
        torch.backends.cudnn.benchmark = True
    common = [f"output_dir={args.out}", f"ray.use_gpu={str(gpu).lower()}", "ray.num_workers=1",
              f"train.amp={'bf16' if gpu else 'off'}", "train.channels_last=on", "train.eval_every=1000",
              "train.checkpoint_every=1000", "distill.warmup_epochs=0", "distill.scale_lr=false"]
    rows = []

    n, stored, crop, batch, epochs = sizes["deit"]
    deit_dir = write_shards(os.path.join(args.out, f"shards-{n}-{stored}"), n, max(batch, n // 10), stored, CLASSES)
    teacher = save_teacher(os.path.join(args.out, f"teacher-{crop}"), deit_dir, crop)
    deit = common + [f"train.crop_size={crop}", "train.augment=crop_flip", "distill.method=deit",
                     "distill.student=deit_tiny_distilled_patch16_224", "distill.type=soft", f"distill.teacher={teacher}",
                     f"distill.batch_size={batch}", f"distill.epochs={epochs}", "distill.lr=5e-4", "distill.drop_path=0"]
    rows.append(("online", fit(load_config(None, deit), deit_dir, device), ""))

    from pipeline.label import label_views
    from pipeline.plan import teacher_identity

    cfg = load_config(None, deit + ["distill.teacher_views=2"])
    t0 = time.perf_counter()
    views = label_views(cfg, deit_dir, teacher, teacher_identity(teacher), log=lambda *_: None, force=True, in_process=True)
    label_s = time.perf_counter() - t0
    rows.append(("views", fit(cfg, deit_dir, device, views), f"label {2 * n / label_s:.0f} views/s"))

    n, stored, crop, batch, epochs = sizes["funmatch"]
    fm_dir = write_shards(os.path.join(args.out, f"shards-{n}-{stored}"), n, max(batch, n // 10), stored, CLASSES)
    fm_teacher = save_teacher(os.path.join(args.out, f"teacher-{crop}"), fm_dir, crop)
    fm = common + [f"train.crop_size={crop}", "train.augment=inception", "distill.method=funmatch",
                   "distill.teaching=function_matching", "distill.student=resnetv2_50x1_bit", f"distill.teacher={fm_teacher}",
                   f"distill.batch_size={batch}", f"distill.epochs={epochs}", "distill.lr=3e-3", "distill.grad_clip=1.0"]
    rows.append(("funmatch", fit(load_config(None, fm), fm_dir, device), ""))

    print(f"\n{'run':<9} {'images/s':>9} {'epoch s':>8} {'loss first':>11} {'loss last':>10} {'falls':>6} {'goal':>7}  note")
    failed = False
    for name, history, note in rows:
        first, last = history[0]["train_loss"], history[-1]["train_loss"]
        falls = last < first
        failed |= not falls
        goal = f"{GOALS[name]:.0f}" if name in GOALS else "-"
        print(f"{name:<9} {history[-1]['images_per_s']:>9.0f} {history[-1]['epoch_time_s']:>8.2f} {first:>11.4f} {last:>10.4f} "
              f"{'yes' if falls else 'NO':>6} {goal:>7}  {note}")
    if gpu:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print("gpu check: " + ("FAILED, a loss did not fall" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

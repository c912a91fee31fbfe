"""Non-finite numbers: refused in every float key of a config; a loss that turns NaN or infinite
during training stops the stage with an error naming the epoch and step, with nothing published."""

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.data.preprocess import preprocess
from pipeline.plan import plan_stage
from pipeline.train.loop import LoopContext, TrainingDiverged, check_diverged, run_loop


@pytest.mark.parametrize("override", ["teacher.lr=.inf", "distill.temperature=.nan", "teacher.grad_clip=.inf",
                                      "ray.cpus_per_worker=.inf", "teacher.warmup_epochs=.inf", "distill.weight_decay=-.inf"])
def test_non_finite_config_values_are_refused(override):
    with pytest.raises(ConfigError, match="finite number"):
        load_config(None, [override])


def test_diverging_loss_stops_before_any_checkpoint(ray_local, tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "data.synthetic.images_per_class=16", "data.synthetic.image_size=40",
                             "data.image_size=32", "data.val_fraction=0.25", "teacher.epochs=3", "teacher.batch_size=8",
                             "teacher.mode=full", "teacher.lr=1e30", "teacher.warmup_epochs=0", "teacher.scale_lr=false"])
    shard_dir = preprocess(cfg, log=lambda *_: None)["shard_dir"]
    reports = []
    ctx = LoopContext(0, 1, torch.device("cpu"), lambda m, ckpt: reports.append((dict(m), ckpt)), print_fn=lambda *_: None)
    torch.set_num_threads(1)
    run_loop(cfg, plan_stage(cfg, "teacher", shard_dir), ctx)
    metrics, ckpt = reports[-1]
    assert metrics["diverged"] == 1.0 and ckpt is None
    assert all(c is None for _, c in reports)  # the loss went bad in the first epoch: nothing was checkpointed
    with pytest.raises(TrainingDiverged, match=r"teacher: the loss became NaN or infinite in epoch 1, step \d+ .*nothing was published"):
        check_diverged("teacher", metrics, "teacher")


def test_finite_reports_pass():
    check_diverged("distill", {"epoch": 3, "val_top1": 0.5}, "distill")

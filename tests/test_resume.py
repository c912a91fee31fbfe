"""Resume: a run stopped after epoch k continues at k+1 with the state it had."""

import shutil

import pytest
import torch

from pipeline import checkpoints
from pipeline.config import load_config
from pipeline.data.preprocess import preprocess
from pipeline.plan import plan_stage
from pipeline.train.loop import LoopContext, run_loop


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    cfg = load_config(None, [f"output_dir={out}", "data.synthetic.images_per_class=24", "data.synthetic.image_size=40",
                             "data.image_size=32", "data.val_fraction=0.25"])
    return cfg, preprocess(cfg, log=lambda *_: None)["shard_dir"]


def _run(cfg, shard_dir, save_to, resume_dir=None, stop_after=None):
    reported = []

    def report(metrics, ckpt_dir):
        reported.append(dict(metrics))
        if ckpt_dir:
            shutil.rmtree(save_to, ignore_errors=True)
            shutil.copytree(ckpt_dir, save_to)
        if stop_after is not None and metrics["epoch"] == stop_after:
            raise Stop

    ctx = LoopContext(0, 1, torch.device("cpu"), report, resume_dir=resume_dir, print_fn=lambda *_: None)
    try:
        run_loop(cfg, plan_stage(cfg, "teacher", shard_dir), ctx)
    except Stop:
        pass
    return reported


def test_resumed_run_continues_at_k_plus_1_and_matches_an_uninterrupted_run(shards, tmp_path):
    base, shard_dir = shards
    cfg = base.model_copy(update={"teacher": base.teacher.model_copy(update={
        "epochs": 4, "batch_size": 16, "lr": 0.05, "scale_lr": False, "mode": "full", "warmup_epochs": 1.0})})
    torch.set_num_threads(1)
    straight = _run(cfg, shard_dir, tmp_path / "a")
    stopped = _run(cfg, shard_dir, tmp_path / "b", stop_after=2)
    assert [m["epoch"] for m in stopped] == [1, 2]
    state = checkpoints.load_train_state(str(tmp_path / "b"))
    assert state["epoch"] == 1 and state["global_step"] > 0 and state["optimizer"]["state"]  # Adam moments saved
    resumed = _run(cfg, shard_dir, tmp_path / "b", resume_dir=str(tmp_path / "b"))
    assert [m["epoch"] for m in resumed] == [3, 4]
    # same lr schedule position and, with optimizer, scheduler and RNG restored, the same numbers
    for a, b in zip(straight[2:], resumed):
        assert b["lr"] == pytest.approx(a["lr"])
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    final_a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    final_b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.allclose(final_a[k].float(), final_b[k].float(), atol=1e-5) for k in final_a)
    history = checkpoints.read_meta(str(tmp_path / "b"))["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]

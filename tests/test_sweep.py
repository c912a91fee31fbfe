"""Ray Tune sweeps: ASHA stops trials, the best is the best, MLflow holds parent + children, resume."""

import pytest
import torch

from pipeline import checkpoints
from pipeline.config import ConfigError, load_config
from pipeline.models import build_teacher
from pipeline.sweep import validate_space


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory):
    from pipeline.data.preprocess import preprocess
    from pipeline.sweep import run_sweep
    from pipeline.tracking import tracked

    out = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    teacher, meta = build_teacher("resnet10t", "none", 5)
    meta.update(class_names=[str(i) for i in range(5)], num_classes=5, image_size=36, resize_mode="squash", input_size=32,
                eval_transform="resize", mean=[0.5] * 3, std=[0.5] * 3)
    checkpoints.save(str(out / "teacher"), teacher.state_dict(), meta)
    # A grid with known-bad learning rates, one trial at a time, so ASHA's decision is deterministic:
    # the first trial reaches rung 1 unopposed, a trial that barely moves (lr 1e-7) falls below it.
    # Ranked by val_top1, not val_loss: after one epoch at lr 0.01 the loss of a learning trial can
    # still sit above the untouched model's ln(5) (CI saw it), while its accuracy is well above chance.
    space = "{distill.lr: {type: choice, values: [0.01, 0.0000001, 0.005, 0.0000001]}, distill.alpha: {type: choice, values: [0.5]}}"
    cfg = load_config(None, [
        f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", "tracking.experiment=sweeps",
        "data.synthetic.images_per_class=40", "data.synthetic.image_size=40", "data.image_size=36", "data.val_fraction=0.25",
        "train.crop_size=32", "ray.num_workers=1", f"distill.teacher={out / 'teacher'}", "distill.epochs=4",
        "distill.batch_size=16", "distill.scale_lr=false", "distill.drop_path=0.0", "distill.type=none", "distill.student=resnet10t",
        f"tune.space={space}", "tune.search=grid", "tune.num_samples=1", "tune.max_concurrent_trials=1",
        "tune.metric=val_top1", "tune.mode=max", "tune.grace_period=1", "tune.reduction_factor=2",
    ])
    preprocess(cfg, log=lambda *_: None)
    with tracked(cfg, "sweep") as tracker:
        result = run_sweep(cfg, tracker, log=lambda *_: None)
    return {"cfg": cfg, "result": result, "out": out}


def best_lr(trials):
    return max(trials, key=lambda t: t["val_top1"])["distill.lr"]


def test_asha_stops_a_trial_and_the_best_is_the_best(swept):
    trials = swept["result"]["trials"]
    assert len(trials) == 4
    assert any(t["stopped_early"] for t in trials), trials
    assert best_lr(trials) > 1e-6  # a learning trial wins over the ones that barely move
    assert any(not t["stopped_early"] and t["epochs_run"] == 4 for t in trials)
    best = swept["result"]["best"]
    assert best["val_top1"] == max(t["val_top1"] for t in trials)


def test_mlflow_holds_one_parent_and_a_child_per_trial(swept):
    from mlflow.tracking import MlflowClient

    cfg = swept["cfg"]
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("sweeps")
    parent_id = swept["result"]["mlflow"]["parent_run_id"]
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children) == 4
    by_trial = {t["trial_id"]: t for t in swept["result"]["trials"]}
    for child in children:
        trial = by_trial[child.data.tags["trial_id"]]
        assert float(child.data.params["distill.lr"]) == pytest.approx(trial["distill.lr"])
        assert float(child.data.params["distill.alpha"]) == pytest.approx(trial["distill.alpha"])
        assert child.info.status == ("KILLED" if trial["stopped_early"] else "FINISHED")
    best = [c for c in children if c.data.tags.get("best_trial") == "true"]
    assert [c.data.tags["trial_id"] for c in best] == [swept["result"]["best"]["trial_id"]]
    assert {"trials.md", "trials.csv", "metric_vs_params.png"} <= {a.path for a in client.list_artifacts(parent_id)}
    assert client.search_model_versions("name='sweeps-student'")


def test_resume_does_not_rerun_finished_trials(swept):
    from mlflow.tracking import MlflowClient

    from pipeline.sweep import run_sweep
    from pipeline.tracking import tracked

    cfg = swept["cfg"]
    with tracked(cfg, "sweep") as tracker:
        again = run_sweep(cfg, tracker, resume=True, log=lambda *_: None)
    assert sorted(t["trial_id"] for t in again["trials"]) == sorted(t["trial_id"] for t in swept["result"]["trials"])
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("sweeps")
    parent_id = swept["result"]["mlflow"]["parent_run_id"]
    assert again["mlflow"]["parent_run_id"] == parent_id
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children) == 4  # no trial ran again


def test_a_trial_with_the_demo_scaling_runs_on_two_cpus(swept):
    """configs/demo.yaml asks 2 workers x 1 CPU; on the suite's 2-CPU cluster the trial's own
    reservation used to make that 2.01 CPUs, and the sweep waited forever for its first trial."""
    from pipeline.config import PipelineConfig, to_dict
    from pipeline.sweep import run_sweep
    from pipeline.tracking import tracked

    demo = load_config("configs/demo.yaml")
    assert (demo.ray.num_workers, demo.ray.cpus_per_worker) == (2, 1.0)
    tree = to_dict(swept["cfg"])
    tree["ray"] = to_dict(demo.ray)
    tree["distill"]["epochs"] = 1
    tree["tune"].update(space={"distill.lr": {"type": "choice", "values": [0.01]}}, scheduler="none")
    cfg = PipelineConfig.model_validate(tree)
    with tracked(cfg, "sweep") as tracker:
        result = run_sweep(cfg, tracker, log=lambda *_: None)
    assert [t["epochs_run"] for t in result["trials"]] == [1]


@pytest.mark.parametrize(
    "space, message",
    [
        ("{distill.lrr: {type: uniform, low: 0.1, high: 0.2}}", "unknown key"),
        ("{distill.lr: {type: uniform, low: 0.2, high: 0.1}}", "empty range"),
        ("{distill.alpha: {type: uniform, low: 0.5, high: 3.0}}", "less than or equal to 1"),
        ("{distill.student: {type: uniform, low: 1.0, high: 2.0}}", "distill.student"),
        ("{distill.lr: {type: choice, values: []}}", "non-empty"),
        ("{data.image_size: {type: choice, values: [32, 64]}}", "only train"),
    ],
)
def test_invalid_search_space_fails_before_any_trial(space, message):
    with pytest.raises(ConfigError, match=message):
        validate_space(load_config(None, [f"tune.space={space}"]))


def test_a_second_sweep_waits_for_the_first_then_finds_it_done(swept):
    """Two invocations of one sweep take turns: the second waits on the sweep's lock while the
    first holds it, then (as `run` does) reuses the finished sweep instead of running it again."""
    import threading

    from pipeline import storage
    from pipeline.data.preprocess import built_shards
    from pipeline.plan import plan_stage
    from pipeline.sweep import run_sweep, sweep_name
    from pipeline.tracking import Tracker

    cfg = swept["cfg"]
    plan = plan_stage(cfg, cfg.tune.stage, built_shards(cfg))
    lock = swept["out"] / ".locks" / f"{sweep_name(cfg, plan.shard_dir, plan.teacher)}.lock"
    said, got = [], {}
    second = threading.Thread(target=lambda: got.update(run_sweep(cfg, Tracker(cfg, "run"), resume=True, reuse=True, log=said.append)))
    with storage.build_lock(str(lock)):  # the first invocation, still running its sweep
        second.start()
        for _ in range(300):
            if said:
                break
            second.join(timeout=0.1)
        assert second.is_alive() and len(said) == 1 and "another run is running this sweep" in said[0], said
    second.join(timeout=120)
    assert got.get("skipped") is True and got["best"]["trial_id"] == swept["result"]["best"]["trial_id"]
    assert "sweep: up to date" in said[-1]


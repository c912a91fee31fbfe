"""The quality protocol (benchmarks/quality.py) end to end on tiny synthetic data: its code paths,
not its numbers (those come from the real photos, see README)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _quality_module():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_wilson_interval_brackets_the_proportion():
    q = _quality_module()
    low, high = q.wilson_interval(250, 309)
    assert low < 250 / 309 < high
    assert 0.04 < (high - low) / 2 < 0.05  # about +-4.4 points at 81 % of 309 images
    assert q.wilson_interval(0, 10)[0] == 0.0 and q.wilson_interval(10, 10)[1] == 1.0


def test_mcnemar_counts_only_the_images_the_two_models_disagree_on():
    q = _quality_module()
    assert q.mcnemar_p(0, 0) == 1.0 and q.mcnemar_p(5, 5) == 1.0
    assert q.mcnemar_p(10, 0) == pytest.approx(2 / 1024) and q.mcnemar_p(0, 10) == q.mcnemar_p(10, 0)
    assert q.mcnemar_p(12, 8) == pytest.approx(0.5034, abs=1e-4)  # +4 images of 20 discordant: chance
    assert q.mcnemar_p(30, 12) < 0.01
    right = {"paths": ["a", "b", "c", "d"], "correct": torch.tensor([True, True, False, False])}
    other = {"paths": ["a", "b", "c", "d"], "correct": torch.tensor([True, False, True, True])}
    assert q.paired(right, other) == {"only_distilled_right": 1, "only_alone_right": 2, "p_value": 1.0}
    assert q.paired(right, {**other, "paths": ["a", "b", "c", "e"]}) is None


def test_protocol_trains_teacher_student_pairs_and_writes_quality_json(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.evaluate import evaluate_folder

    q = _quality_module()
    out, source = tmp_path / "q", tmp_path / "synthetic"
    overrides = ["data.source=synthetic", "data.synthetic.num_classes=3", "data.synthetic.images_per_class=12",
                 "data.synthetic.image_size=48", "data.image_size=48", "data.val_fraction=0.25", "train.crop_size=32",
                 "teacher.crop_size=40", "teacher.model=tf_efficientnet_lite0", "teacher.epochs=1", "teacher.batch_size=16",
                 "distill.epochs=2", "distill.batch_size=16", "distill.teacher_views=2", "tracking.experiment=quality-test"]
    students = ["--students", "resnet10t,lite0_scratch"]
    assert q.main(["--out", str(out), "--photos", str(source), *students, *overrides]) == 0
    entries = json.loads((out / "quality.json").read_text())
    assert [(e["role"], e["distilled"], e["pretrained"], e["init"]) for e in entries] == [
        ("teacher", False, True, "ImageNet"), ("resnet10t-alone", False, False, "scratch"),
        ("resnet10t-distilled", True, False, "scratch"), ("lite0_scratch-alone", False, False, "scratch"),
        ("lite0_scratch-distilled", True, False, "teacher weights")]
    for e in entries:
        assert set(e) >= {"role", "arch", "distilled", "pretrained", "val_top1", "model"}
        low, high = e["val_top1_ci95"]
        assert 0.0 <= low <= e["val_top1"] <= high <= 1.0
        # the published model is what `python -m pipeline evaluate --model` loads, and it scores the same
        report = evaluate_folder(e["model"], str(source))
        assert report["count"] == 36 and 0.0 <= report["top1"] <= 1.0
        # the score of the best epoch (2 ranks, BatchNorm) is the published model's own
        stage = json.loads((Path(e["model"]).parent / "result.json").read_text())
        best = stage["history"][stage["best_epoch"] - 1]
        assert stage["metrics"]["val_top1"] == pytest.approx(best["val_top1"], abs=1e-6)
    assert entries[0]["arch"] == "tf_efficientnet_lite0" and entries[1]["arch"] == "resnet10t"
    assert entries[2]["val_agreement"] is not None and entries[0]["val_agreement"] is None
    assert "points over resnet10t-alone (right only when distilled:" in (out / "quality.md").read_text()
    label_line = "Label step (teacher views, shared by every distilled student):"
    assert label_line in (out / "quality.md").read_text()
    # the paired counts are the two accuracies' difference, image by image
    for distilled, alone in ((entries[2], entries[1]), (entries[4], entries[3])):
        pair = distilled["paired_vs_alone"]
        net = pair["only_distilled_right"] - pair["only_alone_right"]
        assert net / distilled["val_count"] == pytest.approx(distilled["val_top1"] - alone["val_top1"], abs=1e-6)
        assert 0.0 < pair["p_value"] <= 1.0
    assert "paired_vs_alone" not in entries[1]
    assert "| lite0_scratch-distilled | tf_efficientnet_lite0 | teacher weights | yes |" in (out / "quality.md").read_text()
    # MLflow: one run per model, named by what it is (the students by their distill.name); the
    # distilled one says which views it replayed
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("quality-test")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"teacher tf_efficientnet_lite0", "resnet10t-alone", "resnet10t-distilled", "report"} <= set(runs)
    assert runs["lite0_scratch-distilled"].data.tags.get("student_init") == "teacher"
    assert "student_init" not in runs["lite0_scratch-alone"].data.tags
    assert runs["resnet10t-distilled"].data.tags.get("teacher_views") == "2"
    assert "teacher_views" not in runs["resnet10t-alone"].data.tags
    assert runs["resnet10t-alone"].data.params["distill.type"] == "none"
    assert "distill.type" not in runs["teacher tf_efficientnet_lite0"].data.params
    artifacts = {a.path for a in client.list_artifacts(runs["report"].info.run_id)}
    assert {"quality.json", "quality.md"} <= artifacts
    # a rerun reuses every stage (same fingerprints) and gives the same table
    before = {e["role"]: e["val_top1"] for e in entries}
    views = sorted(out.glob("shards/*/teacher_views/*/manifest.json"))
    assert len(views) == 1  # one label pass, shared by the distilled students
    assert q.main(["--out", str(out), "--photos", str(source), *students, *overrides]) == 0
    again = {e["role"]: e["val_top1"] for e in json.loads((out / "quality.json").read_text())}
    assert again == pytest.approx(before) and sorted(out.glob("shards/*/teacher_views/*/manifest.json")) == views
    # the reused store still reports what its build took
    built = json.loads(views[0].read_text())["seconds"]
    assert f"{label_line} {built:.0f} s to build." in (out / "quality.md").read_text()


def test_package_weights_make_a_pretrained_lite0_student():
    from pipeline.models import build_student
    from pipeline.weights import load_package_weights

    model, meta = build_student("tf_efficientnet_lite0", "package", 5, 112, 0.0)
    reference = load_package_weights("tf_efficientnet_lite0")
    assert torch.equal(model.conv_stem.weight, reference["conv_stem.weight"])
    assert model.get_classifier().out_features == 5 and meta["mean"] == [0.5, 0.5, 0.5]

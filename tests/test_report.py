"""The comparison report on real shards, real checkpoints and a real MLflow store, without Ray."""

from __future__ import annotations

import argparse
import csv
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import checkpoints, cluster
from pipeline.config import load_config
from pipeline.data import preprocess as prep
from pipeline.data.loading import load_split
from pipeline.data.sources import SPLITS
from pipeline.evaluate import model_inputs
from pipeline.models import build_student, build_teacher, count_parameters
from pipeline.report import ReportError, add_arguments, build_report, load_run_model, run_with_config

EXPERIMENT = "report-test"
DEIT = "deit_tiny_distilled_patch16_224"


def _write_shards_without_ray(listing, cfg, target):
    """The preprocess stage's Ray Data job done in-process: the same UDF writes the same Parquet files."""
    records = prep.seeded_records(listing, cfg.data.seed)
    batch = {key: np.array([r[key] for r in records], dtype=object) for key in ("path", "split")}
    batch.update({key: np.array([r[key] for r in records], dtype=np.int64) for key in ("label", "position")})
    out = prep.decode_and_write(batch, cfg.data.image_size, cfg.data.resize_mode, target)
    counts = {s: {c: 0 for c in listing.class_names} for s in SPLITS}
    for label, split in zip(out["label"], out["split"]):
        counts[split][listing.class_names[int(label)]] += 1
    return [], counts


def _meta(base: dict, manifest: dict, stage: str, ray_run: str) -> dict:
    """What the training loop adds to build_teacher/build_student's meta (pipeline/train/loop.py)."""
    return {**base, "stage": stage, "class_names": manifest["class_names"], "num_classes": manifest["num_classes"],
            "image_size": manifest["image_size"], "resize_mode": manifest["resize_mode"], "input_size": 32,
            "eval_transform": "resize", "checkpoint_id": f"{ray_run}/checkpoint_000002"}


def _independent_top1(model, meta, val) -> float:
    with torch.no_grad():
        pred = model.eval()(model_inputs(val.images, meta)).argmax(-1)
    return int((pred == val.labels).sum()) / len(val.labels)  # exact, as the evaluator counts


def _argmax(model, meta, val) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(model_inputs(val.images, meta)).argmax(-1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shards, checkpoints and an MLflow experiment holding the runs a few pipeline invocations leave."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import Tracker

    out = tmp_path_factory.mktemp("report")
    # One thread: the test machine's CPUs are shared, and oversubscribed OpenMP threads crawl.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    uri = f"sqlite:///{out}/mlflow.db"
    cfg = load_config(None, [f"output_dir={out}", f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}",
                             "tracking.register_models=false", "data.synthetic.num_classes=3",
                             "data.synthetic.images_per_class=16", "data.synthetic.image_size=40", "data.image_size=32",
                             "data.val_fraction=0.25"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cluster, "init_ray", lambda *a, **k: None)
        mp.setattr(prep, "_write_shards", _write_shards_without_ray)
        shard_dir = prep.preprocess(cfg, log=lambda *_: None)["shard_dir"]
    manifest = prep.storage.read_json(os.path.join(shard_dir, "manifest.json"))
    val = load_split(shard_dir, "val")
    assert len(val) >= 8

    models = {}

    def checkpoint(name, model, base, stage):
        meta = _meta(base, manifest, stage, f"ray-{name}")
        path = str(out / "ckpt" / name)
        checkpoints.save(path, model.state_dict(), meta)
        models[name] = (model.eval(), meta, path)
        return path

    torch.manual_seed(0)
    teacher, tmeta = build_teacher("resnet10t", "none", 3)
    checkpoint("teacher", teacher, tmeta, "teacher")
    torch.manual_seed(1)
    old, ometa = build_teacher("resnet10t", "none", 3)
    checkpoint("old-teacher", old, ometa, "teacher")
    copy, cmeta = build_teacher("resnet10t", "none", 3)
    copy.load_state_dict(teacher.state_dict())  # the baseline is the teacher's twin: agreement exactly 1
    checkpoint("baseline", copy, cmeta, "distill")
    torch.manual_seed(2)
    deit, dmeta = build_student(DEIT, "none", 3, img_size=32, drop_path=0.0)
    checkpoint("deit-soft", deit, dmeta, "distill")
    torch.manual_seed(3)
    trial, trmeta = build_student("resnet10t", "none", 3, img_size=32, drop_path=0.0)
    checkpoint("trial", trial, trmeta, "distill")
    torch.manual_seed(4)
    logged, lmeta = build_student("resnet10t", "none", 3, img_size=32, drop_path=0.0)
    lmeta = _meta(lmeta, manifest, "distill", "ray-funmatch")
    models["funmatch"] = (logged.eval(), lmeta, None)

    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=str(out / "artifacts"))
    t0 = int(time.time() * 1000) - 100_000
    ids = {}

    def run(key, role, stage, ckpt, start, status="FINISHED", recorded=0.5, **extra):
        tags = {"stage": stage, "role": role, "method": "finetune" if stage == "teacher" else "deit",
                "best_checkpoint": ckpt, "shard_dir": shard_dir, "ray_run": f"ray-{key}", **extra}
        rid = client.create_run(exp_id, start_time=t0 + start, tags=tags, run_name=stage).info.run_id
        client.log_metric(rid, "final_val_top1", recorded)
        if key == "funmatch":  # no checkpoint directory: the report must fall back to the logged model
            tracker = Tracker(cfg, "test")
            tracker.log_model(rid, logged, lmeta, model_inputs(val.images[:2], lmeta), None)
        client.set_terminated(rid, status, end_time=t0 + start + 50)
        ids[key] = rid

    run("old-teacher", "teacher", "teacher", models["old-teacher"][2], 0, recorded=0.11)
    run("teacher", "teacher", "teacher", models["teacher"][2], 1000, recorded=0.42)
    run("failed-teacher", "teacher", "teacher", str(out / "nowhere"), 2000, status="FAILED")
    run("baseline", "baseline", "distill", models["baseline"][2], 3000)
    run("deit-soft", "deit-soft", "distill", models["deit-soft"][2], 4000, recorded=0.33)
    # A newer sweep trial of a published role is not the published model...
    run("trial-soft", "deit-soft", "distill", models["trial"][2], 5000, sweep="sweep-distill-x", trial_id="t1")
    # ...but a role that exists only as trials is represented by its best trial.
    run("trial", "deit-hard", "distill", models["trial"][2], 6000, sweep="sweep-distill-x", trial_id="t2", best_trial="true")
    run("trial-worse", "deit-hard", "distill", models["trial"][2], 7000, sweep="sweep-distill-x", trial_id="t3")
    run("funmatch", "funmatch-function_matching", "distill", str(out / "distill" / "gone" / "best"), 8000)

    result = build_report(uri, EXPERIMENT, str(out), latency_runs=3, throughput_runs=2, threads=1, log=lambda *_: None)
    yield {"out": out, "uri": uri, "cfg": cfg, "val": val, "models": models, "ids": ids, "result": result,
            "rows": {r["role"]: r for r in result["rows"]}, "client": client, "exp_id": exp_id}
    torch.set_num_threads(threads)


def test_latest_finished_published_run_per_role(world):
    rows, ids = world["rows"], world["ids"]
    assert list(rows) == ["teacher", "baseline", "deit-soft", "deit-hard", "funmatch-function_matching"]
    assert rows["teacher"]["run_id"] == ids["teacher"]  # not the older one, not the FAILED newer one
    assert rows["deit-soft"]["run_id"] == ids["deit-soft"]  # not the newer sweep trial
    assert rows["deit-hard"]["run_id"] == ids["trial"]  # the best trial, though an older one
    assert rows["deit-hard"]["sweep_trial"] and any("sweep trial t2" in n for n in rows["deit-hard"]["notes"])
    assert rows["funmatch-function_matching"]["run_id"] == ids["funmatch"]
    assert world["result"]["skipped"] == []


def test_accuracy_params_size_and_agreement(world):
    rows, models, val = world["rows"], world["models"], world["val"]
    for role, key in [("teacher", "teacher"), ("baseline", "baseline"), ("deit-soft", "deit-soft"), ("deit-hard", "trial"),
                      ("funmatch-function_matching", "funmatch")]:
        model, meta, path = models[key]
        row = rows[role]
        assert row["arch"] == meta["arch"]
        assert row["val_top1"] == pytest.approx(_independent_top1(model, meta, val), abs=1e-9), role
        assert row["val_count"] == len(val)
        assert row["params"] == count_parameters(model)
        assert row["latency_ms"] > 0 and row["images_per_s"] > 0
        if path:
            size = os.path.getsize(os.path.join(path, checkpoints.MODEL_FILE))
            assert row["size_bytes"] == size and row["size_mb"] == round(size / 1e6, 3)
            assert row["model_source"] == path
        else:
            assert row["model_source"] == f"runs:/{world['ids']['funmatch']}/model"
            assert row["size_source"] == "serialized state_dict" and row["size_bytes"] > 4 * row["params"]
    assert rows["teacher"]["val_top1_recorded"] == pytest.approx(0.42)
    assert rows["deit-soft"]["val_top1_recorded"] == pytest.approx(0.33)
    assert rows["teacher"]["val_agreement"] is None
    assert rows["baseline"]["val_agreement"] == 1.0
    teacher_pred = _argmax(*models["teacher"][:2], val)
    for role, key in [("deit-soft", "deit-soft"), ("funmatch-function_matching", "funmatch")]:
        expected = float((_argmax(*models[key][:2], val) == teacher_pred).float().mean())
        assert rows[role]["val_agreement"] == pytest.approx(expected, abs=1e-9)
    assert "val_top1_cls" in rows["deit-soft"] and "val_top1_dist" in rows["deit-soft"]


def test_files_markdown_csv_json_and_plots(world):
    import json

    files, rows = world["result"]["files"], world["result"]["rows"]
    assert world["result"]["report_dir"] == str(world["out"] / "report")
    with open(files["csv"], newline="") as f:
        table = list(csv.reader(f))
    header, body = table[0], table[1:]
    assert header[0] == "role" and header[-1] == "run_id" and len(body) == len(rows)
    with open(files["markdown"]) as f:
        md_lines = [line for line in f.read().splitlines() if line.startswith("|")]
    md_rows = [[c.strip() for c in line.strip("|").split("|")] for line in md_lines[2:]]
    assert len(md_lines[0].strip("|").split("|")) == len(header)
    assert md_rows == [[c or "—" for c in r] for r in body]
    by_role = {r[0]: dict(zip(header, r)) for r in body}
    assert by_role["baseline"]["val_agreement"] == "1.0000" and by_role["teacher"]["val_agreement"] == ""
    assert float(by_role["teacher"]["val_top1"]) == pytest.approx(world["rows"]["teacher"]["val_top1"], abs=1e-4)
    with open(files["json"]) as f:
        report = json.load(f)
    assert report["settings"]["threads"] == 1 and report["mlflow_report_run_id"] == world["result"]["mlflow"]["run_id"]
    assert [r["role"] for r in report["rows"]] == [r["role"] for r in rows]
    assert len(files["plots"]) == 2
    for png in files["plots"]:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as img:
            img.verify()


def test_mlflow_report_run(world):
    client, rows = world["client"], world["rows"]
    run_id = world["result"]["mlflow"]["run_id"]
    assert run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "report"
    assert run.info.experiment_id == world["exp_id"]
    assert run.data.tags["pipeline.invocation"] == "report"
    m = run.data.metrics
    assert m["teacher_val_top1"] == pytest.approx(rows["teacher"]["val_top1"])
    assert m["baseline_val_agreement"] == 1.0 and "teacher_val_agreement" not in m
    assert m["deit-soft_latency_ms"] == pytest.approx(rows["deit-soft"]["latency_ms"])
    assert m["funmatch-function_matching_params"] == rows["funmatch-function_matching"]["params"]
    assert run.data.params["threads"] == "1" and run.data.params["teacher_run_id"] == world["ids"]["teacher"]
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {"report.md", "report.csv", "report.json", "accuracy_vs_latency.png", "accuracy_agreement.png"}


def test_cli_helpers_use_config_defaults_and_print(world, tmp_path, capsys):
    client = world["client"]
    exp = client.create_experiment("cli", artifact_location=str(tmp_path / "a"))  # one model: a fast second report
    rid = client.create_run(exp, tags={"stage": "teacher", "role": "teacher", "best_checkpoint": world["models"]["teacher"][2],
                                       "shard_dir": world["rows"]["teacher"]["shard_dir"]}).info.run_id
    client.set_terminated(rid, "FINISHED")
    parser = add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--latency-runs", "2", "--throughput-runs", "1", "--threads", "1", "--no-mlflow",
                              f"tracking.uri={world['uri']}", "tracking.experiment=cli", f"output_dir={tmp_path}"])
    result = run_with_config(load_config(getattr(args, "config", None), args.overrides), args)
    printed = capsys.readouterr().out
    assert result["report_dir"] == str(tmp_path / "report") and os.path.isfile(tmp_path / "report" / "report.md")
    assert [r["run_id"] for r in result["rows"]] == [rid] and result["settings"]["threads"] == 1
    assert result["mlflow"]["run_id"] is None and len(client.search_runs([exp])) == 1  # --no-mlflow: no report run
    assert "| teacher | resnet10t |" in printed and str(tmp_path / "report") in printed


def test_missing_experiment_or_no_finished_runs_is_a_clear_error(world, tmp_path):
    client = world["client"]
    with pytest.raises(ReportError, match="does not exist.*pipeline run"):
        build_report(world["uri"], "never-created", str(tmp_path), log=lambda *_: None)
    exp = client.create_experiment("only-failures", artifact_location=str(tmp_path / "a"))
    rid = client.create_run(exp, tags={"stage": "teacher", "role": "teacher"}).info.run_id
    client.set_terminated(rid, "FAILED")
    client.create_run(exp, tags={"pipeline.invocation": "run"})  # a parent run, still RUNNING
    with pytest.raises(ReportError, match="no FINISHED teacher/distill run"):
        build_report(world["uri"], "only-failures", str(tmp_path), log=lambda *_: None)
    assert not os.path.exists(tmp_path / "report")


def test_overwritten_checkpoint_without_logged_model_is_used_with_a_note(world):
    _, _, path = world["models"]["deit-soft"]
    run = SimpleNamespace(info=SimpleNamespace(run_id="0" * 32),
                          data=SimpleNamespace(tags={"best_checkpoint": path, "ray_run": "ray-some-later-run"}, metrics={}))
    model, meta, info = load_run_model(run, world["uri"])
    assert meta["arch"] == DEIT and info["source"] == path
    assert any("now holds Ray run ray-deit-soft" in n for n in info["notes"])
    assert any("no logged model either" in n for n in info["notes"])


def test_unloadable_model_and_unreachable_tracking_keep_the_rest(world, tmp_path, monkeypatch):
    """A run whose model is gone is left out with its reason; a failing MLflow loses no file."""
    import json

    from mlflow.tracking import MlflowClient

    import pipeline.tracking

    client = world["client"]
    exp = client.create_experiment("partial", artifact_location=str(tmp_path / "a"))
    shard_dir = world["rows"]["teacher"]["shard_dir"]
    for role, ckpt in [("teacher", world["models"]["teacher"][2]), ("baseline", str(tmp_path / "gone"))]:
        rid = client.create_run(exp, tags={"stage": "teacher" if role == "teacher" else "distill", "role": role,
                                           "best_checkpoint": ckpt, "shard_dir": shard_dir}).info.run_id
        client.set_terminated(rid, "FINISHED")

    def refuse(*args, **kwargs):
        raise ConnectionError("tracking server down")

    monkeypatch.setattr(MlflowClient, "create_run", refuse)
    monkeypatch.setattr(pipeline.tracking.time, "sleep", lambda s: None)  # attempt's back-off
    with pytest.warns(UserWarning) as caught:
        result = build_report(world["uri"], "partial", str(tmp_path), latency_runs=1, throughput_runs=1, threads=1,
                              log=lambda *_: None)
    messages = " ".join(str(w.message) for w in caught)
    assert "baseline" in messages and "could not create the report run" in messages
    assert [r["role"] for r in result["rows"]] == ["teacher"]
    assert [s["role"] for s in result["skipped"]] == ["baseline"]
    assert "missing or incomplete" in result["skipped"][0]["reason"]
    assert result["mlflow"]["run_id"] is None
    for path in [result["files"]["markdown"], result["files"]["csv"], result["files"]["json"], *result["files"]["plots"]]:
        assert os.path.getsize(path) > 0
    with open(result["files"]["json"]) as f:
        assert json.load(f)["mlflow_report_run_id"] is None
    with open(result["files"]["markdown"]) as f:
        assert "**baseline**" in f.read()

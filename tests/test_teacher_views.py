"""Teacher views (the label step and their replay), the partial teacher, KD for single-head students."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from pipeline import checkpoints, losses
from pipeline.config import load_config
from pipeline.data import augment
from pipeline.label import label_views, load_views
from pipeline.models import build_teacher
from pipeline.plan import plan_stage
from pipeline.train.steps import DeitTask, TeacherTask, TrainBatch, build_task


def _task(cfg, stage, manifest, teacher=None, teacher_inputs=None):
    """The task the loop would build for ``stage`` (the shard directory is not read here)."""
    if teacher:
        cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"teacher": teacher})})
    plan = plan_stage(cfg, stage, "unused-shards").with_teacher_inputs(teacher_inputs)
    return build_task(cfg, plan, manifest, torch.device("cpu"))

CLASSES = 3


def _save_teacher(path, seed=0, input_size=40):
    torch.manual_seed(seed)
    model, meta = build_teacher("resnet10t", "none", CLASSES)
    meta = {**meta, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "class_names": ["a", "b", "c"], "num_classes": CLASSES,
            "image_size": 48, "resize_mode": "squash", "input_size": input_size, "eval_transform": "resize",
            "checkpoint_id": f"teacher-{seed}"}
    checkpoints.save(str(path), model.state_dict(), meta)
    return str(path)


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    from pipeline.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("views")
    overrides = [f"output_dir={out}", f"data.synthetic.num_classes={CLASSES}", "data.synthetic.images_per_class=8",
                 "data.synthetic.image_size=48", "data.image_size=48", "data.val_fraction=0.25"]
    cfg = load_config(None, overrides)
    return {"dir": preprocess(cfg, log=lambda *_: None)["shard_dir"], "overrides": overrides, "out": out}


def _cfg(shards, *extra):
    return load_config(None, shards["overrides"] + ["train.crop_size=24", "train.augment=inception",
                                                    "distill.student=resnet10t", *extra])


def test_render_views_integer_windows_are_exact_crops():
    images = torch.randint(0, 256, (4, 20, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    boxes, flips = augment.sample_views(4, 20, 20, "crop_flip", 12, generator=gen)
    assert torch.all(boxes[:, 2] - boxes[:, 0] == 12)
    assert augment.view_mode("crop_flip", 12, 12) == "window"
    x = augment.render_views(images, torch.arange(4), boxes, flips, 12, [0.0] * 3, [1.0] * 3, "window")
    for i in range(4):
        x1, y1 = int(boxes[i, 0]), int(boxes[i, 1])
        window = images[i, y1 : y1 + 12, x1 : x1 + 12].permute(2, 0, 1).float() / 255
        assert torch.allclose(x[i], window.flip(-1) if flips[i] else window, atol=1e-6)


def test_label_step_stores_what_the_teacher_says_on_each_view(shards, tmp_path, monkeypatch):
    from pipeline import console

    counted = []

    class Recorder:  # stands in for the console's progress display
        def __init__(self, label, total, unit):
            counted.append(total)

        def advance(self, n):
            counted.append(n)

        def close(self):
            pass

    monkeypatch.setattr(console, "CountProgress", Recorder)
    teacher = _save_teacher(tmp_path / "t")
    cfg = _cfg(shards, "distill.teacher_views=3", "distill.teacher_input_size=40")
    path = label_views(cfg, shards["dir"], teacher, "teacher-0", log=lambda *_: None)
    store = load_views(path)
    n = len(store.paths)
    # the actors' row counts reach the driver's progress display: every view and validation image once
    assert counted[0] == 3 * n + len(store.val_paths) == sum(counted[1:])
    assert store.logits.shape == (n, 3, CLASSES) and store.logits.dtype == torch.float16
    assert store.boxes.shape == (n, 3, 4)
    # views differ across k and across images
    assert not torch.equal(store.boxes[:, 0], store.boxes[:, 1])
    assert len({tuple(b.tolist()) for b in store.boxes[:, 0]}) > n // 2
    # re-running the teacher on replayed views (at its own size) reproduces the stored output
    from pipeline.data.loading import load_split

    train = load_split(shards["dir"], "train")
    assert sorted(train.paths) == store.paths  # the store is in path order, the shards in storage order
    images = train.images[[train.paths.index(p) for p in store.paths[:5]]]
    model, meta = checkpoints.load_model(teacher)
    idx = torch.arange(5)
    for k in range(3):
        x = augment.render_views(images, idx, store.boxes[idx, k], store.flips[idx, k], 40, meta["mean"], meta["std"])
        assert augment.view_mode("inception", 24, 40) == "box"
        with torch.no_grad():
            again = model(x)
        assert torch.allclose(again, store.logits[idx, k].float(), atol=2e-2, rtol=1e-2)


def test_a_replaying_student_reports_agreement_from_the_stored_validation_outputs(shards, tmp_path):
    """The label step also stores the teacher's output on each validation image (the student's
    evaluation input at the teacher's size), so a student without a teacher in memory still reports
    val_teacher_top1 and val_agreement, the same as with the online teacher."""
    from pipeline.config import stage_train
    from pipeline.data.loading import load_split
    from pipeline.train.loop import evaluate

    teacher = _save_teacher(tmp_path / "t")
    cfg = _cfg(shards, "distill.teacher_views=2", "distill.teacher_input_size=40")
    path = label_views(cfg, shards["dir"], teacher, "teacher-0", log=lambda *_: None)
    store = load_views(path)
    val = load_split(shards["dir"], "val")
    assert sorted(val.paths) == store.val_paths and store.val_logits.shape == (len(val), CLASSES)
    manifest = {"num_classes": CLASSES, "image_size": 48}
    online_cfg = _cfg(shards, "distill.teacher_views=0", "distill.teacher_input_size=40")
    replay, online = _task(cfg, "distill", manifest, teacher, path), _task(online_cfg, "distill", manifest, teacher)
    assert replay.teacher is None and online.teacher is not None
    online.model.load_state_dict(replay.model.state_dict())
    order = list(reversed(range(len(val))))  # a worker's rows need not be in the store's order
    part = type(val)(val.images[order], val.labels[order], [val.paths[i] for i in order])
    tcfg = stage_train(cfg, "distill")
    scores = {}
    for name, task in (("replay", replay), ("online", online)):
        task.bind_val_part(part.paths, torch.device("cpu"))
        task.model.eval()
        scores[name] = evaluate(task, task.model, part, tcfg, 24, CLASSES, world=1, batch=5)
    assert {"val_teacher_top1", "val_agreement"} <= set(scores["replay"])
    tolerance = 1.0 / len(val) + 1e-9  # fp16 storage may flip one near-tie
    for key in ("val_teacher_top1", "val_agreement"):
        assert scores["replay"][key] == pytest.approx(scores["online"][key], abs=tolerance), key
    assert scores["replay"]["val_top1"] == scores["online"]["val_top1"]
    rows = torch.tensor([0, 2])
    expected = store.val_logits[[store.val_paths.index(part.paths[r]) for r in rows.tolist()]].float()
    assert torch.equal(replay.eval_outputs(replay.model, torch.zeros(2, 3, 24, 24), rows)["teacher"], expected)


def test_views_are_reused_and_rebuilt_when_teacher_or_settings_change(shards, tmp_path):
    teacher = _save_teacher(tmp_path / "t")
    quiet = lambda *_: None  # noqa: E731
    cfg = _cfg(shards, "distill.teacher_views=2")
    first = label_views(cfg, shards["dir"], teacher, "teacher-0", log=quiet)
    stamp = os.stat(os.path.join(first, "manifest.json")).st_mtime_ns
    assert label_views(cfg, shards["dir"], teacher, "teacher-0", log=quiet) == first
    assert os.stat(os.path.join(first, "manifest.json")).st_mtime_ns == stamp  # reused, not recomputed
    other_k = label_views(_cfg(shards, "distill.teacher_views=3"), shards["dir"], teacher, "teacher-0", log=quiet)
    other_aug = label_views(_cfg(shards, "distill.teacher_views=2", "train.inception_scale=[0.5,1.0]"), shards["dir"], teacher,
                            "teacher-0", log=quiet)
    retrained = _save_teacher(tmp_path / "t2", seed=1)
    other_teacher = label_views(cfg, shards["dir"], retrained, "teacher-1", log=quiet)
    assert len({first, other_k, other_aug, other_teacher}) == 4
    assert not torch.allclose(load_views(first).logits.float(), load_views(other_teacher).logits.float())


def test_student_replays_view_e_mod_k_without_a_teacher(shards, tmp_path):
    teacher = _save_teacher(tmp_path / "t")
    cfg = _cfg(shards, "distill.teacher_views=2", "distill.type=soft", "distill.alpha=1.0")
    path = label_views(cfg, shards["dir"], teacher, "teacher-0", log=lambda *_: None)
    store = load_views(path)
    from pipeline.data.loading import load_split

    train = load_split(shards["dir"], "train")
    manifest = {"num_classes": CLASSES, "image_size": 48}
    task = _task(cfg, "distill", manifest, teacher, path)
    assert isinstance(task, DeitTask) and task.teacher is None and task.views is not None
    order = list(reversed(range(len(train))))  # a worker's rows need not be in the store's order
    task.bind_train_part([train.paths[i] for i in order], torch.device("cpu"))
    seen = {}
    task.model.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    images, labels = train.images[order], train.labels[order]
    task.model.eval()  # batch statistics of two images would differ between the step and the reference
    for epoch in (0, 1, 2):
        task.start_epoch(epoch)
        out = task.train_step(task.model, TrainBatch(images, labels, torch.tensor([0, 3]), None))
        k, rows = epoch % 2, torch.tensor([order[0], order[3]])
        at = torch.tensor([store.paths.index(train.paths[r]) for r in rows.tolist()])  # the same images in the store
        expected = augment.render_views(train.images, rows, store.boxes[at, k], store.flips[at, k], 24,
                                        task.mean, task.std)
        assert torch.allclose(seen["x"], expected, atol=1e-5)
        # alpha = 1: the loss is the KL to the stored logits of that view alone
        ref = losses.soft_kl(task.model(expected).detach(), store.logits[at, k].float(), 1.0)
        assert out["loss_dist"].item() == pytest.approx(ref.item(), rel=1e-3, abs=1e-4)


def test_a_student_without_distillation_token_gets_hintons_kd(tmp_path):
    teacher = _save_teacher(tmp_path / "t", input_size=24)
    cfg = load_config(None, ["data.image_size=32", "train.crop_size=24", "distill.student=resnet10t", "distill.type=soft",
                             "distill.alpha=0.3", "distill.temperature=2.0", "distill.label_smoothing=0.0"])
    task = _task(cfg, "distill", {"num_classes": CLASSES, "image_size": 32}, teacher)
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    task.model.eval()  # deterministic forward for the reference
    inputs = {}
    task.model.register_forward_pre_hook(lambda m, args: inputs.__setitem__("s", args[0].detach().clone()))
    out = task.train_step(task.model, TrainBatch(images, labels, torch.arange(6), torch.Generator().manual_seed(2)))
    s = task.model(inputs["s"]).detach()
    t = task.teacher.logits(inputs["s"])
    expected = 0.7 * F.cross_entropy(s, labels) + 0.3 * losses.soft_kl(s, t, 2.0)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_partial_teacher_trains_only_its_last_block_groups():
    cfg = load_config(None, ["teacher.model=tf_efficientnet_lite0", "teacher.mode=partial", "teacher.train_blocks=2"])
    task = _task(cfg, "teacher", {"num_classes": CLASSES, "image_size": 32})
    assert isinstance(task, TeacherTask)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
                 for n, p in task.model.named_parameters() if p.requires_grad}
    # Lite0's coarse groups: stem, blocks.0 .. blocks.6 (+ conv_head/bn2 with the last), classifier
    assert trainable == {"blocks.5", "blocks.6", "conv_head", "bn2", "classifier"}
    task.set_train_mode(task.model)
    assert not task.model.bn1.training and not task.model.blocks[0][0].bn1.training
    assert task.model.blocks[6][0].bn1.training
    groups = task.optimizer_target(task.model)
    assert [g["lr_scale"] for g in groups] == [cfg.teacher.backbone_lr_scale, 1.0]
    head = load_config(None, ["teacher.model=tf_efficientnet_lite0", "teacher.mode=head"])
    head_task = _task(head, "teacher", {"num_classes": CLASSES, "image_size": 32})
    assert {n for n, p in head_task.model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}


def test_views_do_not_depend_on_how_the_work_is_split():
    from pipeline.label import draw_views

    paths = [f"c{i % 3}/img{i}.jpg" for i in range(12)]
    args = (48, 48, "inception", 24, (0.25, 1.0), 7, 3)
    boxes, flips = draw_views(paths, *args)
    assert boxes.shape == (12, 3, 4) and flips.shape == (12, 3)
    # two actors, each with its own rows in its own order, draw the same views for every image
    odd, even = draw_views(paths[1::2][::-1], *args), draw_views(paths[::2], *args)
    assert torch.equal(odd[0], boxes[1::2].flip(0)) and torch.equal(even[0], boxes[::2])
    assert torch.equal(odd[1], flips[1::2].flip(0))
    assert not torch.equal(boxes[:, 0], boxes[:, 1]) and len({tuple(b.tolist()) for b in boxes[:, 0]}) == 12
    assert not torch.equal(draw_views(paths, 48, 48, "inception", 24, (0.25, 1.0), 8, 3)[0], boxes)  # another seed


def test_top_k_outputs_keep_the_teachers_leading_classes():
    from pipeline.label import FULL_LOGITS_MAX_CLASSES, decode_outputs, encode_outputs
    import pyarrow as pa

    few = torch.randn(4, 5)
    small = decode_outputs(pa.table(encode_outputs(few, topk=2)), 5)
    assert torch.allclose(small.float(), few, atol=1e-2)  # up to 128 classes: all logits, fp16
    logits = torch.randn(6, FULL_LOGITS_MAX_CLASSES + 72) * 3
    columns = encode_outputs(logits, topk=5)
    assert set(columns) == {"topk_index", "topk_logit"}
    back = decode_outputs(pa.table(columns), logits.shape[1]).float()
    top = torch.topk(logits, 5, dim=1)
    assert torch.equal(torch.topk(back, 5, dim=1).indices, top.indices)
    assert torch.allclose(back.gather(1, top.indices), top.values, atol=2e-2)
    # the replayed target is the teacher's distribution renormalised over its top 5
    renormalised = torch.softmax(top.values, dim=1)
    assert torch.allclose(torch.softmax(back, dim=1).gather(1, top.indices), renormalised, atol=3e-3)  # fp16 logits


def test_top_k_outputs_stay_compact_until_a_batch_indexes_them():
    from pipeline.label import TopkLogits, decode_outputs, encode_outputs
    import pyarrow as pa

    classes, k_views = 1000, 3
    logits = torch.randn(4 * k_views, classes) * 3
    store = decode_outputs(pa.table(encode_outputs(logits, topk=10)), classes).view(4, k_views, classes)
    assert isinstance(store, TopkLogits) and store.shape == (4, k_views, classes)
    assert store.values.numel() == 4 * k_views * 10  # never N x K x C in memory
    dense = logits.view(4, k_views, classes)
    rows = torch.tensor([2, 0])
    batch = store[rows][:, 1].float()  # what a replaying step takes: view 1 of two images
    assert batch.shape == (2, classes)
    top = torch.topk(dense[rows, 1], 10, dim=1)
    assert torch.allclose(batch.gather(1, top.indices), top.values, atol=2e-2)
    assert (batch.max(dim=1).values - batch.min(dim=1).values > 40).all()  # unlisted classes far below
    none = decode_outputs(pa.table(encode_outputs(logits[:0], topk=10)), classes).view(0, k_views, classes)
    assert none.shape == (0, k_views, classes)  # a worker with no rows of its own


def test_a_partial_or_damaged_store_is_refused_then_rebuilt_by_force(shards, tmp_path):
    from pipeline.data.sources import DataError

    teacher = _save_teacher(tmp_path / "t")
    quiet = lambda *_: None  # noqa: E731
    cfg = _cfg(shards, "distill.teacher_views=2", "train.seed=5")
    path = label_views(cfg, shards["dir"], teacher, "teacher-0", log=quiet)
    good = load_views(path)
    parts = sorted(p for p in os.listdir(path) if p.endswith(".parquet"))
    with open(os.path.join(path, parts[0]), "r+b") as f:  # a damaged file
        f.truncate(40)
    with pytest.raises(DataError, match="damaged.*label --force"):
        label_views(cfg, shards["dir"], teacher, "teacher-0", log=quiet)
    rebuilt = label_views(cfg, shards["dir"], teacher, "teacher-0", log=quiet, force=True)
    assert torch.equal(load_views(rebuilt).boxes, good.boxes)  # the same seeded views, complete again
    os.remove(os.path.join(path, sorted(p for p in os.listdir(path) if p.endswith(".parquet"))[0]))
    with pytest.raises(DataError, match="lacks 1 of its"):
        load_views(path)
    os.remove(os.path.join(path, "manifest.json"))  # a build that never finished
    with pytest.raises(DataError, match="incomplete"):
        load_views(path)
    lines = []
    label_views(cfg, shards["dir"], teacher, "teacher-0", log=lines.append)  # not reused: built again
    assert torch.equal(load_views(path).logits, good.logits)
    # the last line counts what the progress bar counts: every training view and validation image
    m = load_views(path).manifest
    done = m["views"] + m["val_images"]
    assert any(f"{done} views labelled ({m['views']} training, {m['val_images']} validation)" in line for line in lines)


def test_workers_parts_of_the_store_cover_the_training_split_once(shards, tmp_path, monkeypatch):
    from pipeline import label
    from pipeline.data.loading import load_split
    from pipeline.train.steps import TeacherViews

    teacher = _save_teacher(tmp_path / "t")
    cfg = _cfg(shards, "distill.teacher_views=2")
    path = label_views(cfg, shards["dir"], teacher, "teacher-0", log=lambda *_: None)
    store, covered = load_views(path), []
    # the manifest maps each file to the rows it holds: the training files tile the split
    spans = sorted((first, last) for split, first, last in store.manifest["file_rows"].values() if split == "train")
    assert spans[0][0] == 0 and spans[-1][1] == len(store.paths) and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert sorted(store.manifest["file_rows"]) == sorted(store.manifest["files"])
    read_rows, opened = label.read_rows, []
    monkeypatch.setattr(label, "read_rows", lambda p, files, wanted: opened.append(files) or read_rows(p, files, wanted))
    train_files = {f for f, (split, *_) in store.manifest["file_rows"].items() if split == "train"}
    read_by_rank = []
    for rank in range(2):
        part = load_split(shards["dir"], "train", rank, 2)
        views = TeacherViews(path)
        views.bind(part.paths, torch.device("cpu"), part.rows)
        # a worker that says its range opens only the files overlapping it, and the validation files
        read = {os.path.basename(f) for f in opened[-1]}
        assert read - train_files == set(store.manifest["files"]) - train_files
        read_by_rank.append(read & train_files)
        rows = torch.tensor([store.paths.index(p) for p in part.paths])
        assert torch.equal(views.part[0], store.boxes[rows]) and torch.equal(views.part[2], store.logits[rows])
        # a worker reads only its own images' rows (and every validation row), from the files
        # holding its range when it says which range that is
        for own in (load_views(path, part.paths), load_views(path, part.paths, part.rows)):
            assert sorted(own.paths) == sorted(part.paths) and len(own.paths) < len(store.paths)
            assert own.val_paths == store.val_paths and torch.equal(own.val_logits, store.val_logits)
        covered += part.paths
    assert sorted(covered) == store.paths
    assert len(train_files) > 2 and all(len(r) < len(train_files) for r in read_by_rank)
    assert read_by_rank[0] | read_by_rank[1] == train_files and len(read_by_rank[0] & read_by_rank[1]) <= 1


def test_a_worker_reads_only_the_view_files_that_hold_its_rows():
    from pipeline.label import files_for_rows

    manifest = {"files": ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "part-00003.parquet"],
                "file_rows": {"part-00000.parquet": ["train", 0, 100], "part-00001.parquet": ["train", 100, 200],
                              "part-00002.parquet": ["train", 200, 300], "part-00003.parquet": ["val", 0, 30]}}
    assert files_for_rows(manifest, (0, 150)) == ["part-00000.parquet", "part-00001.parquet", "part-00003.parquet"]
    assert files_for_rows(manifest, (150, 300)) == ["part-00001.parquet", "part-00002.parquet", "part-00003.parquet"]
    assert files_for_rows(manifest, (100, 200)) == ["part-00001.parquet", "part-00003.parquet"]  # bounds are [start, stop)
    assert files_for_rows(manifest, (0, 0)) == ["part-00003.parquet"]  # validation only
    # a file the map does not know, or a store written before the map, may hold any row
    del manifest["file_rows"]["part-00002.parquet"]
    assert files_for_rows(manifest, (0, 50)) == ["part-00000.parquet", "part-00002.parquet", "part-00003.parquet"]
    manifest["file_rows"]["part-00002.parquet"] = ["train", None, "300"]  # unreadable: read it, do not crash
    assert files_for_rows(manifest, (0, 50)) == ["part-00000.parquet", "part-00002.parquet", "part-00003.parquet"]
    assert files_for_rows({"files": manifest["files"]}, (0, 50)) == manifest["files"]


def test_the_label_command_logs_a_stage_run_and_reuses_its_store(shards, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.cli import main as cli_main

    teacher = _save_teacher(tmp_path / "t")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["label", *shards["overrides"], "train.crop_size=24", "train.augment=inception", "distill.student=resnet10t",
            f"distill.teacher={teacher}", "distill.teacher_views=2", "train.seed=11", f"tracking.uri={uri}",
            "tracking.experiment=label-test", "ray.num_workers=1", "ray.cpus_per_worker=0.9"]
    assert cli_main(args) == 0
    assert cli_main(args) == 0  # the second time the store is reused
    result = json.loads((shards["out"] / "label" / "result.json").read_text())
    assert result["num_views"] == 2 and result["views"] == 2 * result["images"] == 2 * len(load_views(result["store"]).paths)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("label-test")
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'label'")
    assert run.data.params["label.num_views"] == "2" and "teacher-0" in run.data.params["label.teacher"]
    assert run.data.metrics["views"] == result["views"] and run.data.metrics["views_per_s"] > 0
    assert run.data.tags["teacher_views_key"] == os.path.basename(result["store"])
    assert cli_main(["label", *shards["overrides"], "distill.teacher_views=0", f"tracking.uri={uri}"]) == 2


def test_streamed_batches_replay_the_views_of_their_own_images_reading_each_file_once(shards, tmp_path, monkeypatch):
    """Stream mode binds the task to the whole split and indexes it by each streamed row's number;
    the views are read file by file, each when a batch first needs a row of it."""
    from pipeline import label
    from pipeline.data.loading import load_split
    from pipeline.data.streaming import epoch_batches, split_paths, stream_dataset
    from pipeline.train.steps import TeacherViews

    teacher = _save_teacher(tmp_path / "t")
    path = label_views(_cfg(shards, "distill.teacher_views=2"), shards["dir"], teacher, "teacher-0", log=lambda *_: None)
    store, views = load_views(path), TeacherViews(path)
    train_files = sorted(f for f, (split, *_) in store.manifest["file_rows"].items() if split == "train")
    read_rows, opened = label.read_rows, []
    monkeypatch.setattr(label, "read_rows", lambda p, files, wanted: opened.append(files) or read_rows(p, files, wanted))
    paths = split_paths(shards["dir"], "train")
    views.bind(paths, torch.device("cpu"), streamed=True)
    assert views.by_file is not None and views.part is None and opened == []  # nothing read before a batch asks
    whole = load_split(shards["dir"], "train")
    seen = []
    for images, labels, rows in epoch_batches(stream_dataset(shards["dir"], "train").iterator(), 4, tuple(whole.images.shape[1:]),
                                              torch.device("cpu"), seed=0):
        batch = TrainBatch(images, labels, torch.arange(len(rows)), None, rows=rows)
        for k in (1, 0):
            boxes, flips, logits = views.view(batch.part_rows, k)
            mine = torch.tensor([store.paths.index(paths[r]) for r in rows.tolist()])
            assert torch.equal(boxes, store.boxes[mine, k]) and torch.equal(flips, store.flips[mine, k])
            assert torch.equal(logits, store.logits[mine, k].float())
        assert torch.equal(images, whole.images[rows])
        seen += rows.tolist()
    assert len(seen) == len(set(seen)) == len(whole) // 4 * 4
    # one training file per read: each file holding a streamed row (the epoch's full batches leave
    # some rows out), read once for the epoch and both views; never a validation file
    holding = sorted({f for r in seen for f in train_files if store.manifest["file_rows"][f][1] <= r < store.manifest["file_rows"][f][2]})
    assert all(len(files) == 1 for files in opened) and len(holding) > 2
    assert sorted(os.path.basename(files[0]) for files in opened) == holding
    # only the most recently used files are kept, but never fewer than one call needs
    views.by_file.keep = 1
    first_and_last = torch.tensor([0, len(paths) - 1])
    boxes, _, logits = views.by_file.view(first_and_last, 0)
    mine = torch.tensor([store.paths.index(paths[r]) for r in first_and_last.tolist()])
    assert torch.equal(boxes, store.boxes[mine, 0]) and torch.equal(logits, store.logits[mine, 0].float())
    assert len(views.by_file.cache) == 2
    reads = len(opened)
    views.view(torch.tensor([len(paths) - 1]), 0)  # kept: read no more, and the other file dropped
    assert len(opened) == reads and len(views.by_file.cache) == 1
    views.view(torch.tensor([0]), 0)  # dropped: read again
    assert len(opened) == reads + 1 and len(views.by_file.cache) == 1
    with pytest.raises(ValueError, match="outside the training split"):
        views.view(torch.tensor([-1]), 0)


def test_stream_mode_reads_the_whole_store_where_it_cannot_read_it_by_file(shards, tmp_path):
    """Stores without a usable row map, or with mixup partners, are read whole (as before); a store
    that lacks a file is refused when bound, before any training."""
    from pipeline.data.sources import DataError
    from pipeline.data.streaming import split_paths
    from pipeline.train.steps import TeacherViews
    from pipeline.train.view_files import ViewsByFile

    teacher = _save_teacher(tmp_path / "t")
    path = label_views(_cfg(shards, "distill.teacher_views=2"), shards["dir"], teacher, "teacher-0", log=lambda *_: None)
    manifest, paths = load_views(path).manifest, split_paths(shards["dir"], "train")
    assert ViewsByFile.for_store(path, manifest, paths) is not None
    train = sorted((f for f, e in manifest["file_rows"].items() if e[0] == "train"), key=lambda f: manifest["file_rows"][f][1])
    holes = {**manifest, "file_rows": {f: e for f, e in manifest["file_rows"].items() if f != train[1]}}
    shifted = {**manifest, "file_rows": {**manifest["file_rows"], train[1]: ["train", 1, manifest["file_rows"][train[1]][2]]}}
    for unusable in ({k: v for k, v in manifest.items() if k != "file_rows"}, holes, shifted,
                     {**manifest, "mixup_pairs": {"world": 1}}, {**manifest, "images": len(paths) + 1}):
        assert ViewsByFile.for_store(path, unusable, paths) is None
    copy = tmp_path / "old-store"
    shutil.copytree(path, copy)
    (copy / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "file_rows"}))
    views = TeacherViews(str(copy))
    views.bind(paths, torch.device("cpu"), streamed=True)
    assert views.by_file is None and len(views.part[0]) == len(paths)  # read whole, as before the map
    damaged = tmp_path / "damaged-store"
    shutil.copytree(path, damaged)
    os.remove(damaged / train[0])
    with pytest.raises(DataError, match="lacks 1 of its"):
        TeacherViews(str(damaged)).bind(paths, torch.device("cpu"), streamed=True)


def _funmatch_cfg(shards, *extra):
    return _cfg(shards, "distill.method=funmatch", "distill.teaching=function_matching", "distill.temperature=2.0", *extra)


def test_function_matching_views_pair_images_inside_one_workers_chunk_and_replay_exactly(shards, tmp_path, monkeypatch):
    """Each view k of image i is mixed with view k of a partner from the same chunk of rows, inside
    one training worker's range; the teacher's stored output is on exactly that mixed tensor, and
    the replaying student gets the same tensor and the KL to that output."""
    from pipeline import label
    from pipeline.data.loading import load_split, rank_range
    from pipeline.train.steps import FunMatchTask

    monkeypatch.setattr(label, "PAIR_CHUNK", 4)
    teacher = _save_teacher(tmp_path / "t", input_size=40)  # function matching shows the teacher the student's tensor
    cfg = _funmatch_cfg(shards, "distill.teacher_views=3", "ray.num_workers=2")
    path = label_views(cfg, shards["dir"], teacher, "teacher-0", log=lambda *_: None)
    store = load_views(path)
    assert store.manifest["mixup_pairs"] == {"world": 2, "chunk": 4, "fold": False}
    whole = load_split(shards["dir"], "train")
    n = len(whole)
    position = {p: i for i, p in enumerate(whole.paths)}  # storage order, which the workers' ranges follow

    def chunk_of(p):
        pos = position[p]
        rank = next(r for r in range(2) if rank_range(n, r, 2)[0] <= pos < rank_range(n, r, 2)[1])
        return rank, (pos - rank_range(n, rank, 2)[0]) // 4

    mixed_with_another = 0
    for i, p in enumerate(store.paths):
        for k in range(3):
            q = store.paths[store.partners[i, k]]
            assert chunk_of(q) == chunk_of(p)
            mixed_with_another += q != p
    assert mixed_with_another > 2 * n  # only a chunk of one image mixes an image with itself
    # within a chunk and view, every image is some image's partner exactly once (a cycle)
    for k in range(3):
        assert sorted(store.partners[:, k].tolist()) == list(range(n))
    assert 0 <= store.lams.min() and store.lams.max() <= 1 and store.lams.std() > 0.1
    assert not torch.equal(store.partners[:, 0], store.partners[:, 1])

    # the teacher's stored output is its output on the mixed views
    model, meta = checkpoints.load_model(teacher)
    at = torch.tensor([position[p] for p in store.paths])  # store row -> row of `whole`
    for k in range(3):
        own = augment.render_views(whole.images, at, store.boxes[:, k], store.flips[:, k], 24, meta["mean"], meta["std"])
        partner = store.partners[:, k]
        other = augment.render_views(whole.images, at[partner], store.boxes[partner, k], store.flips[partner, k], 24,
                                     meta["mean"], meta["std"])
        with torch.no_grad():
            again = model(augment.mix(own, other, store.lams[:, k]))
        assert torch.allclose(again, store.logits[:, k].float(), atol=2e-2, rtol=1e-2)

    # rank 1's worker replays its part: the same mixed tensor, the KL at T to the stored output
    part = load_split(shards["dir"], "train", 1, 2)
    task = _task(cfg, "distill", {"num_classes": CLASSES, "image_size": 48}, teacher, path)
    assert isinstance(task, FunMatchTask) and task.teacher is None
    task.bind_train_part(part.paths, torch.device("cpu"))
    seen = {}
    task.model.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    task.model.eval()
    task.start_epoch(4)  # view 4 mod 3 = 1
    rows = torch.tensor([0, 2, 5])
    out = task.train_step(task.model, TrainBatch(part.images, part.labels, rows, None))
    srow = torch.tensor([store.paths.index(part.paths[r]) for r in rows.tolist()])
    prow = store.partners[srow, 1]
    expected = augment.mix(
        augment.render_views(whole.images, at[srow], store.boxes[srow, 1], store.flips[srow, 1], 24, task.mean, task.std),
        augment.render_views(whole.images, at[prow], store.boxes[prow, 1], store.flips[prow, 1], 24, task.mean, task.std),
        store.lams[srow, 1])
    assert torch.allclose(seen["x"], expected, atol=1e-5)
    ref = losses.soft_kl(task.model(expected).detach(), store.logits[srow, 1].float(), 2.0, True)
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-3, abs=1e-4)

    # a worker of another split of the rows lacks some partners: refused, saying why
    with pytest.raises(ValueError, match="paired for 2 training worker"):
        _task(cfg, "distill", {"num_classes": CLASSES, "image_size": 48}, teacher, path).bind_train_part(
            load_split(shards["dir"], "train", 1, 3).paths, torch.device("cpu"))


def test_function_matching_views_are_keyed_by_the_worker_count_and_refused_where_they_cannot_replay(shards, tmp_path):
    from pipeline.config import ConfigError
    from pipeline.label import views_key

    two, three = _funmatch_cfg(shards, "distill.teacher_views=2", "ray.num_workers=2"), _funmatch_cfg(shards, "distill.teacher_views=2", "ray.num_workers=3")
    assert views_key(two, shards["dir"], "t") != views_key(three, shards["dir"], "t")
    deit_two, deit_three = _cfg(shards, "distill.teacher_views=2", "ray.num_workers=2"), _cfg(shards, "distill.teacher_views=2", "ray.num_workers=3")
    assert views_key(deit_two, shards["dir"], "t") == views_key(deit_three, shards["dir"], "t")  # DeiT views are per image
    with pytest.raises(ConfigError, match="stream mode"):
        plan_stage(_funmatch_cfg(shards, "distill.teacher_views=2", "train.data=stream"), "distill", "unused-shards")
    with pytest.raises(ConfigError, match="independent_noise needs the online teacher"):
        plan_stage(_funmatch_cfg(shards, "distill.teacher_views=2", "distill.teaching=independent_noise"), "distill", "unused-shards")
    # consistent teaching replays single views (no partners): any worker count
    assert views_key(_funmatch_cfg(shards, "distill.teacher_views=2", "distill.teaching=consistent", "ray.num_workers=3"),
                     shards["dir"], "t") == views_key(
        _funmatch_cfg(shards, "distill.teacher_views=2", "distill.teaching=consistent", "ray.num_workers=2"), shards["dir"], "t")

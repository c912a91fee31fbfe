"""Output storage is checked before any work: unwritable, full, or invisible to other nodes."""

import shutil
from collections import namedtuple

import pytest

from pipeline import preflight, storage
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, RayConfig, base_dir, load_config


def _cli(capsys, *args):
    code = cli_main(list(args))
    return code, capsys.readouterr().err


def test_unwritable_output_dir_is_reported_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, err = _cli(capsys, "run", f"output_dir={blocker}/out", f"tracking.uri=sqlite:///{tmp_path}/m.db")
    assert code == 2
    assert "is not writable" in err and str(blocker) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing started: no store, no shards


def test_full_output_location_is_reported_before_any_work(tmp_path, capsys, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))  # 1 MiB left
    code, err = _cli(capsys, "teacher", f"output_dir={tmp_path}/out", f"tracking.uri=sqlite:///{tmp_path}/m.db")
    assert code == 2
    assert "0.00 GiB free" in err and "output_min_free_gb=1.0" in err
    assert not (tmp_path / "m.db").exists()
    # the threshold is the user's to lower
    preflight.check_output_location(load_config(None, [f"output_dir={tmp_path}/out", "output_min_free_gb=0"]))


def test_writable_output_dir_passes_and_leaves_no_trace(tmp_path):
    preflight.check_output_location(load_config(None, [f"output_dir={tmp_path}/out/deeper"]))
    assert list(tmp_path.iterdir()) == []  # probed in the nearest existing parent, nothing created
    (tmp_path / "kept").mkdir()
    preflight.check_output_location(load_config(None, [f"output_dir={tmp_path}/kept"]))
    assert list((tmp_path / "kept").iterdir()) == []


def test_the_probe_never_removes_what_another_run_writes_into_a_new_output_dir(tmp_path, monkeypatch):
    """Two runs started on the same new output_dir: while this one probes, the other creates the
    directory and takes its lock there; the probe must leave both alone."""
    out = tmp_path / "out"
    write_text = storage.write_text

    def another_run_starts_meanwhile(path, text):
        (out / ".locks").mkdir(parents=True, exist_ok=True)
        (out / ".locks" / "preprocess-0123.lock").write_text("")
        write_text(path, text)

    monkeypatch.setattr(storage, "write_text", another_run_starts_meanwhile)
    preflight.check_output_location(load_config(None, [f"output_dir={out}"]))
    assert [p.name for p in (out / ".locks").iterdir()] == ["preprocess-0123.lock"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and the probe file is gone


def test_an_output_dir_that_is_a_dangling_link_is_refused_before_any_work(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match="is not writable"):
        preflight.check_output_location(load_config(None, [f"output_dir={tmp_path}/out"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


MOUNTS = """/dev/vda / ext4 rw 0 0
server:/export /mnt/shared nfs4 rw 0 0
tmpfs /mnt/shared/scratch tmpfs rw 0 0
"""


def test_filesystem_type_uses_the_longest_matching_mount_point(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    assert preflight.filesystem_type("/mnt/shared/run1", str(mounts)) == "nfs4"
    assert preflight.filesystem_type("/mnt/shared/scratch/x", str(mounts)) == "tmpfs"
    assert preflight.filesystem_type("/mnt/sharedother", str(mounts)) == "ext4"
    assert preflight.is_shared("/mnt/shared/run1", RayConfig(), str(mounts)) == (True, "a nfs4 network filesystem")
    assert preflight.is_shared("/home/me/out", RayConfig(), str(mounts))[0] is False


def test_multi_node_run_on_a_local_disk_is_refused_with_the_way_out(tmp_path):
    with pytest.raises(ConfigError) as err:
        preflight.check_shared_storage(str(tmp_path), RayConfig(), nodes=3, local_gpus=0)
    msg = str(err.value)
    assert "3 nodes" in msg and "NFS" in msg and "ray.shared_storage=true" in msg
    preflight.check_shared_storage(str(tmp_path), RayConfig(), nodes=1, local_gpus=0)  # one node: local is fine
    preflight.check_shared_storage("s3://bucket/prefix", RayConfig(), nodes=3, local_gpus=0)  # object store: shared
    preflight.check_shared_storage(str(tmp_path), RayConfig(shared_storage=True), nodes=3, local_gpus=0)  # the user vouches
    with pytest.raises(ConfigError):
        preflight.check_shared_storage("s3://bucket/prefix", RayConfig(shared_storage=False), nodes=2, local_gpus=0)
    # An autoscaling cluster: the GPU-less head is alone now, GPU workers will join for this run.
    with pytest.raises(ConfigError, match="GPU-less"):
        preflight.check_shared_storage(str(tmp_path), RayConfig(use_gpu=True), nodes=1, local_gpus=0)
    preflight.check_shared_storage(str(tmp_path), RayConfig(use_gpu=True), nodes=1, local_gpus=1)  # a GPU box alone


def test_the_cluster_shape_probe_sees_this_single_node_cluster(ray_local):
    assert preflight.cluster_shape() == (1, 0)


def test_relative_paths_inside_a_ray_job_copy_never_land_in_the_copy(tmp_path, monkeypatch):
    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1234"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("PIPELINE_BASE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(None, ["output_dir=outputs/demo", "tracking.uri=sqlite:///mlflow.db"])
    assert cfg.output_dir == str(tmp_path / "home" / "flower-distill" / "outputs" / "demo")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/home/flower-distill/mlflow.db"
    monkeypatch.setenv("PIPELINE_BASE_DIR", str(tmp_path / "project"))
    assert base_dir() == str(tmp_path / "project")
    assert load_config(None, ["output_dir=out"]).output_dir == str(tmp_path / "project" / "out")


def test_an_object_store_output_is_probed_and_left_clean(object_store):
    out = object_store("preflight")
    preflight.check_output_location(load_config(None, [f"output_dir={out}"]))
    assert storage.list_files(out) == []


def test_an_unreachable_object_store_is_reported_before_any_work(tmp_path, capsys):
    dead = "s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http"  # nothing listens on port 9
    code, err = _cli(capsys, "teacher", f"output_dir={dead}", f"tracking.uri=sqlite:///{tmp_path}/m.db")
    assert code == 2 and "is not writable" in err and "Could not connect" in err
    assert not (tmp_path / "m.db").exists()  # refused before the tracking store was touched

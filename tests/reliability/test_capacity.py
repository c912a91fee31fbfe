"""A scaling request the cluster cannot place fails in seconds, saying what was asked and what exists."""

import time

import pytest

from pipeline.config import ConfigError, RayConfig
from pipeline.preflight import check_capacity, placeable_workers


def test_workers_do_not_span_nodes():
    assert placeable_workers([{"CPU": 2}, {"CPU": 2}], 1.0, 0) == 4
    assert placeable_workers([{"CPU": 2}, {"CPU": 2}], 3.0, 0) == 0  # 4 CPUs in all, but no node has 3
    assert placeable_workers([{"CPU": 16, "GPU": 1}, {"CPU": 8}], 1.0, 1.0) == 1


def test_strict_placement_strategies_count_nodes_not_cpus():
    nodes = [{"CPU": 2}, {"CPU": 1}]
    assert placeable_workers(nodes, 1.0, 0, "STRICT_SPREAD") == 2  # one per node
    assert placeable_workers(nodes, 1.0, 0, "STRICT_PACK") == 2  # all on the larger node
    assert placeable_workers(nodes, 1.0, 0, "SPREAD") == 3
    with pytest.raises(ConfigError, match=r"3 worker\(s\) x 1 CPU \(STRICT_SPREAD: one node each\).*room for 2"):
        check_capacity(RayConfig(num_workers=3, placement_strategy="STRICT_SPREAD"), nodes=nodes)


def test_too_many_workers_fail_with_what_was_asked_and_what_exists():
    with pytest.raises(ConfigError, match=r"asked 4 worker\(s\) x 1 CPU; it has 2 CPU \(room for 2\)\. Lower ray.num_workers"):
        check_capacity(RayConfig(num_workers=4), nodes=[{"CPU": 2.0}])


def test_a_reservation_beside_the_workers_counts():
    check_capacity(RayConfig(num_workers=2), nodes=[{"CPU": 2.0}])
    with pytest.raises(ConfigError, match="beside 0.5 CPU already reserved"):
        check_capacity(RayConfig(num_workers=2), reserved_cpu=0.5, nodes=[{"CPU": 2.0}])


def test_gpu_request_on_a_cpu_cluster_names_gpus():
    with pytest.raises(ConfigError, match=r"1 GPU.*0 GPU"):
        check_capacity(RayConfig(num_workers=1, use_gpu=True), nodes=[{"CPU": 8.0}])


def test_teacher_with_more_workers_than_cpus_fails_in_seconds(ray_local, tmp_path, capsys):
    """The suite's cluster has 2 CPUs; 4 workers of 1 CPU used to wait for a placement group forever."""
    from pipeline.cli import main as cli_main

    common = [f"output_dir={tmp_path}", "data.synthetic.images_per_class=8", "data.val_fraction=0.25", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    assert cli_main(["preprocess", *common]) == 0
    t0 = time.perf_counter()
    # The suite joins its cluster (which could autoscale, so the default would wait 10 min): say 0.
    code = cli_main(["teacher", *common, "ray.num_workers=4", "ray.capacity_wait_s=0"])
    assert code == 2 and time.perf_counter() - t0 < 60
    assert "cannot place the training workers: asked 4 worker(s) x 1 CPU" in capsys.readouterr().err


def test_wait_default_depends_on_who_started_ray(monkeypatch):
    from pipeline import cluster

    monkeypatch.setattr(cluster, "_STARTED_HERE", True)
    assert cluster.capacity_wait_s(RayConfig()) == 0.0
    monkeypatch.setattr(cluster, "_STARTED_HERE", False)
    assert cluster.capacity_wait_s(RayConfig()) == cluster.JOINED_CLUSTER_WAIT_S
    assert cluster.capacity_wait_s(RayConfig(capacity_wait_s=5.0)) == 5.0

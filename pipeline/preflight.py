"""Checks that run before any work starts: is the output location writable, has it room, and can
every node of the cluster see it?

Failing here costs a second; failing after an hour of training (a full disk at the first checkpoint,
a worker on another node writing checkpoints the driver never sees) costs the hour.
"""

from __future__ import annotations

import os
import shutil
import uuid

from pipeline import storage
from pipeline.config import ConfigError, PipelineConfig, RayConfig

# Filesystem types (as /proc/mounts names them) whose files every node that mounts them sees.
NETWORK_FILESYSTEMS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs", "ceph", "cephfs", "wekafs",
    "panfs", "orangefs", "9p", "afs", "fuse.glusterfs", "fuse.ceph", "fuse.s3fs", "fuse.gcsfuse", "fuse.goofys",
    "fuse.juicefs", "fuse.mountpoint-s3", "fuse.sshfs", "fuse.rclone", "fuse.alluxio-fuse",
}


def check_output_location(cfg: PipelineConfig) -> None:
    """Refuse an output location that cannot be written or has less than ``output_min_free_gb`` free.

    An object-store URI (``s3://``, ``gs://``) is probed by writing and deleting a small object, which
    also catches missing credentials and a wrong endpoint before any work starts.
    """
    out = cfg.output_dir
    probe = storage.join(out, f".write-test-{uuid.uuid4().hex[:8]}")
    created = None if storage.is_uri(out) else _first_missing(os.path.abspath(out))
    try:
        fs, path = storage.resolve(out)
        storage.write_text(probe, "ok")
        fs.delete_file(storage.resolve(probe)[1])
        if created:  # leave no trace: a config that fails later must not leave empty directories behind
            shutil.rmtree(created, ignore_errors=True)
    except Exception as exc:
        raise ConfigError(f"output_dir {out!r} is not writable ({type(exc).__name__}: {str(exc)[:200]}). "
                          "Choose a directory you can write to (output_dir=...) or fix its permissions.") from None
    if storage.is_uri(out):
        return  # object stores report no free space; quotas there fail loudly on write
    free_gb = shutil.disk_usage(os.path.dirname(created) if created else path).free / 2**30
    if free_gb < cfg.output_min_free_gb:
        raise ConfigError(f"output_dir {out!r} has {free_gb:.2f} GiB free, less than output_min_free_gb="
                          f"{cfg.output_min_free_gb}: shards and checkpoints would fill the disk mid-run. "
                          "Free some space, point output_dir elsewhere, or lower output_min_free_gb.")


def _first_missing(path: str) -> str | None:
    """The outermost directory of ``path`` that does not exist yet (None if ``path`` exists)."""
    missing = None
    while path and not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
        if path == missing:
            break
    return missing


def filesystem_type(path: str, mounts_file: str = "/proc/mounts") -> str | None:
    """The type of the filesystem holding ``path`` (longest matching mount point), or None if unknown."""
    path = os.path.realpath(path)
    try:
        with open(mounts_file) as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    best, best_type = "", None
    for point, fstype in mounts:
        point = point.replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fstype
    return best_type


def is_shared(output_dir: str, ray_cfg: RayConfig, mounts_file: str = "/proc/mounts") -> tuple[bool, str]:
    """Whether every node sees ``output_dir``, and why we think so."""
    if ray_cfg.shared_storage is not None:
        return ray_cfg.shared_storage, f"ray.shared_storage={str(ray_cfg.shared_storage).lower()}"
    if storage.is_uri(output_dir):
        return True, "an object-store URI"
    fstype = filesystem_type(output_dir, mounts_file)
    if fstype in NETWORK_FILESYSTEMS:
        return True, f"a {fstype} network filesystem"
    return False, f"a local {fstype or 'unknown'} filesystem"


def cluster_shape() -> tuple[int, float]:
    """(alive nodes in the connected Ray cluster, GPUs on the driver's own node)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    local_gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in alive if n.get("NodeID") == here)
    return len(alive), local_gpus


def check_shared_storage(output_dir: str, ray_cfg: RayConfig, nodes: int | None = None, local_gpus: float | None = None) -> None:
    """Refuse a run that will span nodes when ``output_dir`` lives on one node's own disk.

    Workers on other nodes would write shards and checkpoints to their own disks, where the driver
    (which publishes the best model) and the next stage would never find them. A run spans nodes when
    the cluster has several now, or when it wants GPUs that the driver's node lacks: an autoscaling
    cluster (cluster.yaml) starts with a GPU-less head alone and adds GPU workers on demand.
    """
    if nodes is None or local_gpus is None:
        nodes, local_gpus = cluster_shape()
    if nodes <= 1 and not (ray_cfg.use_gpu and local_gpus < 1):
        return
    shared, why = is_shared(output_dir, ray_cfg)
    if not shared:
        where = f"the Ray cluster has {nodes} nodes" if nodes > 1 else "the GPU workers will run on other nodes than this GPU-less one"
        raise ConfigError(
            f"output_dir {output_dir!r} is on {why}, but {where}: workers elsewhere would write "
            "shards and checkpoints to their own disks, out of reach of the driver and the next stage. Use an object-store "
            "URI (output_dir=s3://bucket/prefix) or a path on NFS/EFS mounted at the same place on every node "
            "(cluster.yaml mounts EFS at /mnt/shared); if this path is "
            "shared in a way we cannot detect, set ray.shared_storage=true.")

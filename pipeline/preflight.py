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
    # A missing output_dir is not created for the probe: the probe goes into its nearest existing
    # parent, where creating the directory would need the same permission. Creating it and removing
    # it afterwards raced with a second run started on the same new directory, whose lock file and
    # shards the removal then deleted.
    missing = None if storage.is_uri(out) else _first_missing(os.path.abspath(out))
    where = os.path.dirname(missing) if missing else out
    probe = storage.join(where, f".write-test-{uuid.uuid4().hex[:8]}")
    try:
        fs, path = storage.resolve(where)
        storage.write_text(probe, "ok")
        fs.delete_file(storage.resolve(probe)[1])
    except Exception as exc:
        raise ConfigError(f"output_dir {out!r} is not writable ({type(exc).__name__}: {str(exc)[:200]}). "
                          "Choose a directory you can write to (output_dir=...) or fix its permissions.") from None
    if storage.is_uri(out):
        return  # object stores report no free space; quotas there fail loudly on write
    free_gb = shutil.disk_usage(path).free / 2**30
    if free_gb < cfg.output_min_free_gb:
        raise ConfigError(f"output_dir {out!r} has {free_gb:.2f} GiB free, less than output_min_free_gb="
                          f"{cfg.output_min_free_gb}: shards and checkpoints would fill the disk mid-run. "
                          "Free some space, point output_dir elsewhere, or lower output_min_free_gb.")


def _first_missing(path: str) -> str | None:
    """The outermost directory of ``path`` that does not exist yet (None if ``path`` exists)."""
    missing = None
    while path and not os.path.lexists(path):  # a dangling link exists: the probe must fail on it, not beside it
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


def placeable_workers(nodes: list[dict[str, float]], cpus: float, gpus: float, strategy: str = "PACK") -> int:
    """How many workers needing ``cpus`` CPUs and ``gpus`` GPUs each the nodes could hold at once
    (a worker lives on one node, so a node's leftovers do not add up across nodes), under Ray's
    placement ``strategy``: STRICT_SPREAD puts at most one worker on a node, STRICT_PACK all on one."""
    fits = []
    for res in nodes:
        fit = int(res.get("CPU", 0.0) / cpus + 1e-9) if cpus > 0 else 10**9
        if gpus > 0:
            fit = min(fit, int(res.get("GPU", 0.0) / gpus + 1e-9))
        fits.append(fit)
    if strategy == "STRICT_SPREAD":
        return sum(1 for f in fits if f > 0)
    if strategy == "STRICT_PACK":
        return max(fits, default=0)
    return sum(fits)


def check_capacity(ray_cfg: RayConfig, reserved_cpu: float = 0.0, nodes: list[dict[str, float]] | None = None) -> None:
    """Fail in seconds when the cluster can never place the training workers, instead of letting
    Ray Train wait forever for a placement group. ``reserved_cpu``: CPUs a caller holds on the
    same cluster while the workers run (a sweep trial's own reservation). An autoscaling cluster
    may grow: the check waits ``ray.capacity_wait_s`` (see :func:`pipeline.cluster.capacity_wait_s`),
    saying so, before failing."""
    import time

    import ray

    from pipeline.cluster import capacity_wait_s

    wait = capacity_wait_s(ray_cfg) if nodes is None else 0.0
    gpus = 1.0 if ray_cfg.use_gpu else 0.0
    deadline = time.monotonic() + wait
    said = False
    while True:
        alive = nodes if nodes is not None else [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if reserved_cpu:  # conservatively taken from the largest node
            alive = sorted(({**n} for n in alive), key=lambda n: -n.get("CPU", 0.0))
            if alive:
                alive[0]["CPU"] = max(0.0, alive[0].get("CPU", 0.0) - reserved_cpu)
        fits = placeable_workers(alive, ray_cfg.cpus_per_worker, gpus, ray_cfg.placement_strategy)
        if fits >= ray_cfg.num_workers:
            return
        if nodes is not None or time.monotonic() >= deadline:
            break
        if not said:
            print(f"waiting up to {wait:.0f} s for the cluster to grow: {ray_cfg.num_workers} worker(s) "
                  f"asked, room for {fits} now (ray.capacity_wait_s)", flush=True)
            said = True
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    have = ", ".join(f"{n.get('CPU', 0):g} CPU" + (f" + {n.get('GPU', 0):g} GPU" if gpus else "") for n in alive) or "no nodes"
    want = f"{ray_cfg.num_workers} worker(s) x {ray_cfg.cpus_per_worker:g} CPU" + (" + 1 GPU" if gpus else "")
    if ray_cfg.placement_strategy.startswith("STRICT"):
        want += f" ({ray_cfg.placement_strategy}: {'one node each' if ray_cfg.placement_strategy == 'STRICT_SPREAD' else 'all on one node'})"
    raise ConfigError(
        f"the Ray cluster cannot place the training workers: asked {want}"
        + (f" beside {reserved_cpu:g} CPU already reserved" if reserved_cpu else "")
        + f"; it has {have} (room for {fits}). Lower ray.num_workers or ray.cpus_per_worker"
        + (", or set ray.capacity_wait_s for a cluster that autoscales" if not wait else f" (waited {wait:.0f} s)"))

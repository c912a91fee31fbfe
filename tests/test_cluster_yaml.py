"""cluster.yaml: accepted by Ray's own cluster-config validation, and shaped the way we rely on.

Ray's checks run offline: ``prepare_config`` merges the AWS defaults (a file shipped with Ray) and
``validate_config`` applies ``ray/autoscaler/ray-schema.json`` with jsonschema, as ``ray up`` does
before it talks to AWS. The AWS step after that (instance-type lookup, IAM, key pair, subnets)
needs credentials and the network, so it is not exercised here.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

# (vCPUs, GPUs) of instance types a worker type may use; declared resources must not exceed them.
KNOWN_INSTANCES = {
    "g4dn.xlarge": (4, 1), "g4dn.12xlarge": (48, 4),
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1), "g5.8xlarge": (32, 1),
    "g5.12xlarge": (48, 4), "g5.16xlarge": (64, 1), "g5.24xlarge": (96, 4), "g5.48xlarge": (192, 8),
    "g6.xlarge": (4, 1), "g6.12xlarge": (48, 4), "g6e.xlarge": (4, 1), "g6e.12xlarge": (48, 4),
    "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
}
GPU_FAMILY = re.compile(r"^(g\d|gr\d|p\d)", re.IGNORECASE)


@pytest.fixture()
def raw() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def ray_validate(config: dict) -> dict:
    """What `ray up` does before contacting the cloud: fill defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def worker_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def commands(config: dict, key: str) -> list[str]:
    return list(config.get(key) or [])


def all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in commands(config, k)]


def rsync_excluded(relpath: str, patterns: list[str]) -> bool:
    """Would `rsync --exclude PATTERN` (one per pattern) skip this path, relative to the mount root?"""
    parts = relpath.split("/")
    for pattern in patterns:
        dir_only = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        if pattern.startswith("/"):  # anchored at the root of the transfer
            n = pattern.count("/")
            if len(parts) >= n + (1 if dir_only else 0) and fnmatch.fnmatchcase("/".join(parts[:n]), pattern[1:]):
                return True
            continue
        n = pattern.count("/") + 1  # unanchored: matches the trailing components of any path prefix
        for end in range(n, len(parts) + 1):
            if dir_only and end == len(parts):
                break
            if fnmatch.fnmatchcase("/".join(parts[end - n:end]), pattern):
                return True
    return False


# --- Ray's own validation -------------------------------------------------------------------------

def test_ray_schema_accepts_the_file_as_written(raw):
    with open(RAY_SCHEMA) as f:
        schema = json.load(f)
    jsonschema.validate(raw, schema)


def test_ray_up_validation_accepts_it_offline(raw):
    prepared = ray_validate(raw)
    # prepare_config merged the common setup into the head's and workers' lists and filled limits.
    assert prepared["head_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]
    assert prepared["worker_setup_commands"][: len(raw["setup_commands"])] == raw["setup_commands"]
    assert prepared["available_node_types"][raw["head_node_type"]]["max_workers"] == 0
    # Our explicit node types replace the AWS defaults instead of being merged with them.
    assert set(prepared["available_node_types"]) == set(raw["available_node_types"])


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.__setitem__("available_node_type", c.pop("available_node_types")), id="top-level-typo"),
        pytest.param(lambda c: c["available_node_types"]["head"].__setitem__("min_worker", 0), id="node-type-typo"),
        pytest.param(lambda c: next(iter(worker_types(c).values()))["resources"].__setitem__("GPU", "1"), id="gpu-as-string"),
        pytest.param(lambda c: c["provider"].__setitem__("cache_stopped_nodes", "no"), id="bool-as-string"),
    ],
)
def test_ray_validation_rejects_a_broken_copy(raw, mutate):
    broken = copy.deepcopy(raw)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(broken)


def test_head_node_type_must_exist(raw):
    broken = copy.deepcopy(raw)
    broken["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_validate(broken)


# --- Node types -----------------------------------------------------------------------------------

def test_head_is_a_cpu_node(raw):
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    instance = head["node_config"]["InstanceType"]
    # Ray detects resources from the instance type; a GPU type would give the head GPUs anyway.
    assert not GPU_FAMILY.match(instance), f"head instance {instance} is a GPU type"
    assert head.get("max_workers", 0) == 0


def test_gpu_workers_autoscale_from_zero(raw):
    gpu_types = {n: t for n, t in worker_types(raw).items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker type offers GPUs"
    for name, t in gpu_types.items():
        assert t.get("min_workers", 0) == 0 < t["max_workers"], f"{name} does not scale from 0"
        assert t["max_workers"] <= raw["max_workers"]
        instance = t["node_config"]["InstanceType"]
        assert GPU_FAMILY.match(instance), f"{name}: {instance} has no GPU"
        if instance in KNOWN_INSTANCES:
            cpus, gpus = KNOWN_INSTANCES[instance]
            assert t["resources"]["GPU"] == gpus, f"{name}: {instance} has {gpus} GPUs"
            assert t["resources"].get("CPU", cpus) <= cpus, f"{name}: {instance} has {cpus} vCPUs"
    assert raw["idle_timeout_minutes"] > 0
    assert raw["provider"]["type"] == "aws"
    assert raw["auth"]["ssh_user"] == "ubuntu"


def test_every_node_type_names_an_image(raw):
    for name, t in raw["available_node_types"].items():
        assert str(t["node_config"].get("ImageId", "")).startswith("ami-"), f"{name}: Ray's default AMI is outdated"


# --- Code on the nodes ----------------------------------------------------------------------------

def test_setup_installs_the_project_with_constraints(raw):
    installs = [c for c in commands(raw, "setup_commands") if "pip install" in c and "-e" in c]
    assert len(installs) == 1, installs
    install = installs[0]
    assert re.search(r"pip install\b.*\s-c constraints\.txt\b", install), install
    assert "'.[weights]'" in install
    workdir = re.search(r"cd (\S+) &&", install).group(1)
    for needed in ("pyproject.toml", "constraints.txt", "pipeline"):
        assert f"{workdir}/{needed}" in raw["file_mounts"], f"{needed} is not mounted in {workdir}"
    # The cluster's Ray must be the one that runs `ray up` and `ray job submit`.
    pinned = re.search(r"ray\[[^\]]*\]==([\w.]+)", install)
    assert pinned and pinned.group(1) == ray.__version__, f"pin ray=={ray.__version__} in setup_commands"


def test_file_mounts_exist_and_leave_out_local_state(raw):
    mounts = raw["file_mounts"]
    heavy = [ROOT / ".venv", ROOT / "outputs", ROOT / "mlruns", ROOT / "mlflow.db", ROOT / ".git"]
    for remote, local in mounts.items():
        if local.startswith("~"):
            continue
        path = (ROOT / local).resolve()
        assert path.exists(), f"{local} (mounted at {remote}) does not exist: `ray up` would fail"
        for h in heavy:  # Ray hashes every mounted file on each `ray up`, excludes or not
            assert not (h == path or path in h.parents), f"{local} contains {h.name}"
    excludes = raw["rsync_exclude"]
    for name in (".venv", "outputs", "mlruns", "mlflow.db", ".git", "__pycache__"):
        assert rsync_excluded(f"{name}/x", excludes) or rsync_excluded(name, excludes), f"{name} is not excluded"
    # ...and no exclude pattern drops code or configs the nodes need (e.g. "data" = pipeline/data).
    for local in mounts.values():
        path = ROOT / local
        if local.startswith("~") or not path.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for fn in filenames:
                rel = os.path.relpath(os.path.join(dirpath, fn), path).replace(os.sep, "/")
                if fn.endswith((".py", ".yaml", ".yml", ".json", ".toml", ".txt")):
                    assert not rsync_excluded(rel, excludes), f"rsync_exclude drops {local}/{rel}"


# --- MLflow and the network -----------------------------------------------------------------------

def test_mlflow_server_listens_on_the_private_ip_only(raw):
    head = commands(raw, "head_start_ray_commands")
    servers = [c for c in head if "mlflow server" in c]
    assert len(servers) == 1, servers
    server = servers[0]
    assert "0.0.0.0" not in server and "--host ::" not in server
    assert re.search(r"--host \$HEAD_IP\b", server), server
    assert "ray.util.get_node_ip_address()" in " ".join(head)
    allowed = re.search(r'--allowed-hosts "([^"]+)"', server).group(1).split(",")
    assert "*" not in allowed and allowed[0] == "$HEAD_IP:5000", allowed
    assert "--disable-security-middleware" not in server
    store = re.search(r"--backend-store-uri sqlite:///\$HOME/(mlflow/\S+)", server)
    assert store, server
    # `ray rsync-down cluster.yaml '~/mlflow/' ...` applies rsync_exclude too: the store must survive it.
    assert not rsync_excluded(store.group(1).split("/", 1)[1], raw["rsync_exclude"]), store.group(1)
    assert "--serve-artifacts" in server and "--artifacts-destination $HOME/mlflow/artifacts" in server
    assert "nohup" in server and "> ~/mlflow/server.log 2>&1 &" in server
    # The `ray attach -p 5000` tunnel reaches the head's loopback: a relay bound there only.
    relays = [c for c in head if "socat" in c]
    assert relays and all("bind=127.0.0.1" in c for c in relays)
    # Jobs and workers find the server through MLFLOW_TRACKING_URI set when Ray starts.
    head_start = [c for c in head if "ray start --head" in c]
    assert head_start and "MLFLOW_TRACKING_URI=http://$(cat ~/mlflow/host):5000" in head_start[0]
    worker_start = [c for c in commands(raw, "worker_start_ray_commands") if "ray start" in c]
    assert worker_start and "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker_start[0]


def test_ray_keeps_token_auth_and_a_private_dashboard(raw):
    text = json.dumps(raw)
    assert not re.search(r"RAY_AUTH_MODE\s*=\s*['\"]?disabled", text, re.IGNORECASE)
    assert "0.0.0.0" not in " ".join(all_commands(raw))
    head = [c for c in commands(raw, "head_start_ray_commands") if "ray start" in c]
    workers = [c for c in commands(raw, "worker_start_ray_commands") if "ray start" in c]
    assert len(head) == 1 and len(workers) == 1
    for cmd in head + workers:
        token = cmd.find("export RAY_AUTH_MODE=token")
        assert 0 <= token < cmd.index("ray start"), f"token auth not switched on before: {cmd}"
    assert "--dashboard-host=127.0.0.1" in head[0]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head[0] and "--port=6379" in head[0]
    assert "--address=$RAY_HEAD_IP:6379" in workers[0]
    assert commands(raw, "head_start_ray_commands")[0].strip() == "ray stop"
    assert commands(raw, "worker_start_ray_commands")[0].strip() == "ray stop"
    # The token every node checks against is the one `ray get-auth-token` keeps on this machine.
    assert raw["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_no_extra_ports_open_to_the_world(raw):
    rules = raw["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        if rule.get("IpProtocol") == "-1" or rule.get("FromPort", -1) == -1:  # all traffic
            ports = set(range(65536))
        else:
            ports = set(range(rule["FromPort"], rule.get("ToPort", rule["FromPort"]) + 1))
        assert not (public and ports & {5000, 6379, 8265}), rule


def test_every_node_mounts_the_shared_output_storage_the_pipeline_recognises(raw):
    from pipeline.preflight import NETWORK_FILESYSTEMS

    mounts = [c for c in commands(raw, "setup_commands") if "mount -t" in c]
    assert len(mounts) == 1 and "/mnt/shared" in mounts[0]
    fstype = re.search(r"mount -t (\S+)", mounts[0]).group(1)
    assert fstype in NETWORK_FILESYSTEMS  # so the multi-node preflight accepts output_dir=/mnt/shared/...
    assert "output_dir=/mnt/shared/" in CLUSTER_YAML.read_text()

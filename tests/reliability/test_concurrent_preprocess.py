"""Two preprocess runs of the same dataset into the same output_dir at once: one builds, the other
waits and reuses; no run deletes the other's work, and one complete copy is left."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_two_concurrent_preprocess_runs_leave_one_complete_copy(ray_cluster, tmp_path):
    from pipeline.data import synthetic

    photos = synthetic.generate(tmp_path / "photos", 5, 60, 64, seed=0)  # a finished tree, as real photos are
    args = [sys.executable, "-m", "pipeline", "preprocess", f"output_dir={tmp_path / 'out'}", "data.source=folder",
            f"data.path={photos}", "data.image_size=48", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"]}
    runs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [r.communicate(timeout=600)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outputs
    built = [o for o in outputs if "with Ray Data ->" in o]
    assert len(built) == 1, outputs  # the other one waited and reused the copy
    shards = tmp_path / "out" / "shards"
    copies = [d for d in shards.iterdir() if d.is_dir()]
    assert len(copies) == 1 and not [d for d in shards.iterdir() if ".partial-" in d.name]
    manifest = json.loads((copies[0] / "manifest.json").read_text())
    listed = [f for files in manifest["files"].values() for f in files]
    assert listed and all((copies[0] / f).is_file() for f in listed)
    assert sum(manifest["split_sizes"].values()) == 5 * 60

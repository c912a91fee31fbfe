"""benchmarks/gpu_check.py on CPU at tiny sizes: the GPU check's code paths (the real loop online,
with replayed views, function matching) run without Ray or MLflow, as on the GPU machines."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs the script with ray and mlflow made unimportable, as they are on the GPU machines.
RUNNER = """
import importlib.abc, runpy, sys

class NoRayNoMlflow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow"):
            raise ImportError(f"{name} is not installed on the GPU machines")
        return None

sys.meta_path.insert(0, NoRayNoMlflow())
sys.argv = ["gpu_check.py", "--smoke", "--device", "cpu", "--out", sys.argv[1]]
runpy.run_path(%r, run_name="__main__")
""" % str(ROOT / "benchmarks" / "gpu_check.py")


def test_gpu_check_runs_its_three_loops_without_ray_or_mlflow(tmp_path):
    done = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["online"], ["views"], ["funmatch"])}
    assert set(rows) == {"online", "views", "funmatch"}, done.stdout
    for name, cols in rows.items():
        assert float(cols[1]) > 0 and cols[5] == "yes", (name, cols)  # images/s measured; the loss fell
    assert "label" in " ".join(rows["views"][7:]) and "gpu check: passed" in done.stdout
    views = list((tmp_path / "shards-48-40" / "teacher_views").glob("*/manifest.json"))
    assert len(views) == 1  # the replayed run used a store labelled in this process

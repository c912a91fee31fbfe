"""The code keeps the shape the contributors' guide promises: short functions, and lower layers
that never import upper ones (config and storage are leaves, data knows no model, evaluation does
not import training)."""

import ast
import pathlib

import pytest

PIPELINE = pathlib.Path(__file__).resolve().parents[1] / "pipeline"
MAX_FUNCTION_LINES = 80


def _modules():
    for path in sorted(PIPELINE.rglob("*.py")):
        yield path, ast.parse(path.read_text())


def _imports(tree) -> set[str]:
    """Every pipeline module a module imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("pipeline"))
    return names


def test_no_function_is_longer_than_the_limit():
    long = [f"{path.relative_to(PIPELINE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in _modules() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "functions over the limit: " + "; ".join(long)


@pytest.mark.parametrize("module, forbidden", [
    ("storage", ("pipeline.config", "pipeline.data", "pipeline.train", "pipeline.models", "pipeline.stages")),
    ("data/batches", ("pipeline.train", "pipeline.models", "pipeline.stages", "pipeline.tracking")),
    ("data/loading", ("pipeline.train", "pipeline.models", "pipeline.stages")),
    ("data/augment", ("pipeline.train", "pipeline.models", "pipeline.stages")),
    ("evaluate", ("pipeline.train", "pipeline.stages", "pipeline.sweep")),
    ("plan", ("pipeline.train", "pipeline.stages", "pipeline.cli")),
])
def test_lower_layers_do_not_import_upper_ones(module, forbidden):
    imported = _imports(ast.parse((PIPELINE / f"{module}.py").read_text()))
    bad = sorted(name for name in imported if name.startswith(forbidden))
    assert not bad, f"pipeline/{module}.py imports {bad}"


@pytest.mark.parametrize("module", ["config", "storage"])
def test_config_and_storage_are_leaves(module):
    imported = _imports(ast.parse((PIPELINE / f"{module}.py").read_text()))
    assert not imported, f"pipeline/{module}.py imports {sorted(imported)}"


def test_ray_data_read_functions_load_without_torch():
    """Ray Data runs them in processes of their own: importing torch there cost ~300 MB per read task."""
    import subprocess
    import sys

    code = "import sys, pipeline.data.row_groups; print(sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PIPELINE.parent, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr

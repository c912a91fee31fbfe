"""``evaluate`` and ``predict`` on a bad model directory or bad input: exit 2 and one line that says
what is wrong, never a traceback."""

import json

import pytest
import torch

from pipeline import checkpoints
from pipeline.cli import main as cli_main
from pipeline.models import build_student
from tests.conftest import write_image


def _publish(directory, class_names=("a", "b", "c")):
    model, meta = build_student("resnet10t", "none", 3, 32, 0.0)
    meta = {**meta, "class_names": list(class_names), "num_classes": 3, "input_size": 32, "image_size": 32,
            "resize_mode": "squash", "eval_transform": "resize", "stage": "distill"}
    checkpoints.save(str(directory), model.state_dict(), meta)
    return directory


def _tamper(directory, change):
    path = directory / checkpoints.META_FILE
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


@pytest.fixture
def image(tmp_path):
    return str(write_image(tmp_path / "x.png", seed=3))


def _run(argv, capsys):
    code = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_good_model_predicts(tmp_path, image, capsys):
    model = _publish(tmp_path / "m")
    assert cli_main(["predict", "--json", "--model", str(model), image]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["top"][0]["class"] in ("a", "b", "c")


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / checkpoints.META_FILE).write_text("{not json"), "is not valid JSON"),
    (lambda d: _tamper(d, lambda m: m.update(arch="no_such_net_v9")), "cannot rebuild 'no_such_net_v9'"),
    (lambda d: _tamper(d, lambda m: m.pop("create_kwargs")), "lacks 'create_kwargs'"),
    (lambda d: _tamper(d, lambda m: m.update(class_names=["a", "b"])), "names 2 classes but the model has 3 outputs"),
    (lambda d: _tamper(d, lambda m: m["create_kwargs"].update(num_classes=4)), "model.pt does not fit"),
    (lambda d: (d / checkpoints.MODEL_FILE).write_bytes(b"garbage"), "refusing to load"),
])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_damaged_model_directory_is_one_line_exit_2(tmp_path, image, capsys, damage, reason, command):
    model = _publish(tmp_path / "m")
    damage(model)
    tail = [image] if command == "predict" else ["--data", str(tmp_path)]
    code, err = _run([command, "--model", str(model), *tail], capsys)
    assert code == 2
    assert len(err) == 1 and reason in err[0], err


def test_predict_on_a_missing_image_exits_2_and_keeps_the_others(tmp_path, image, capsys):
    model = _publish(tmp_path / "m")
    code = cli_main(["predict", "--json", "--model", str(model), image, str(tmp_path / "missing.jpg")])
    captured = capsys.readouterr()
    assert code == 2
    out = json.loads(captured.out)
    assert "top" in out[0] and "error" in out[1]
    assert "missing.jpg" in captured.err


def test_models_uri_uses_the_given_tracking_store(tmp_path, image, capsys):
    code, err = _run(["predict", "--model", "models:/absent/1", "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}", image], capsys)
    err = [line for line in err if line.startswith("error:")]  # MLflow logs its new, empty database too
    assert code == 2 and len(err) == 1
    assert "cannot fetch models:/absent/1" in err[0] and "x.db" in err[0]

"""Config YAML that would mislead or exhaust memory: duplicate keys, alias bombs, unbounded echoes."""

import time

import pytest

from pipeline.config import MAX_YAML_NODES, ConfigError, load_config

BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
                 + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)])


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_duplicate_key_names_the_key_and_both_lines(tmp_path):
    path = _write(tmp_path, "teacher:\n  lr: 0.1\ndata:\n  image_size: 32\nteacher:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"key 'teacher' is given twice \(lines 1 and 5\)"):
        load_config(path)


def test_nested_duplicate_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'lr' is given twice \(lines 2 and 3\)"):
        load_config(_write(tmp_path, "teacher:\n  lr: 0.1\n  lr: 0.2\n"))


@pytest.mark.parametrize("where", ["data:\n  path: *a8\n", "tune:\n  space:\n    lr: {type: choice, values: *a8}\n"])
def test_alias_bomb_is_refused_quickly_before_validation(tmp_path, where):
    path = _write(tmp_path, BOMB + "\n" + where)
    assert len(path.read_bytes()) < 1000
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"aliases expand to more than {MAX_YAML_NODES} values") as err:
        load_config(path)
    assert time.perf_counter() - t0 < 5 and len(str(err.value)) < 500


def test_modest_aliases_and_merge_keys_still_work(tmp_path):
    cfg = load_config(_write(tmp_path, "teacher: &opt\n  lr: 0.002\n  epochs: 2\ndistill:\n  <<: *opt\n  epochs: 3\n"))
    assert cfg.teacher.lr == cfg.distill.lr == 0.002 and (cfg.teacher.epochs, cfg.distill.epochs) == (2, 3)


def test_wrong_type_error_echoes_a_bounded_value():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.path=[" + ",".join(["longlonglongvalue"] * 5000) + "]"])
    assert "data.path: Input should be a valid string" in str(err.value)
    assert len(str(err.value).splitlines()[-1]) < 200


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("2E+2", 200.0), ("5e-05", 5e-5)])
def test_exponent_floats_without_a_dot_are_numbers(text, value):
    assert load_config(None, [f"teacher.weight_decay={text}"]).teacher.weight_decay == value

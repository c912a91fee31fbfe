from pathlib import Path

import pytest

from pipeline.config import ConfigError, PipelineConfig, flatten, load_config, parse_override, to_dict

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_are_the_synthetic_demo():
    cfg = load_config()
    assert cfg.data.source == "synthetic"
    assert cfg.ray.num_workers >= 1


@pytest.mark.parametrize("preset", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_preset_validates(preset):
    assert isinstance(load_config(preset), PipelineConfig)


def test_overrides_are_typed_yaml_values():
    cfg = load_config(None, ["data.image_size=96", "data.val_fraction=0.25", "ray.address=null", "ray.use_gpu=true"])
    assert cfg.data.image_size == 96 and cfg.data.val_fraction == 0.25
    assert cfg.ray.address is None and cfg.ray.use_gpu is True


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.imag_size=64"])
    text = str(err.value)
    assert "data.imag_size: unknown key" in text
    assert "did you mean 'data.image_size'" in text


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match=r"datta: unknown key \(did you mean 'data'\?\)"):
        load_config(None, ["datta.source=folder"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.image_size=big"])
    assert "data.image_size" in str(err.value) and "'big'" in str(err.value) and "integer" in str(err.value)


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="ray.num_workers"):
        load_config(None, ["ray.num_workers=true"])


def test_out_of_range_and_enum_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.val_fraction=1.5", "data.source=imagenet"])
    text = str(err.value)
    assert "data.val_fraction" in text and "less than 1" in text and "1.5" in text
    assert "data.source" in text and "'tf_flowers'" in text and "'imagenet'" in text


def test_fractions_must_leave_training_data():
    with pytest.raises(ConfigError, match="val_fraction \\+ test_fraction must be < 1"):
        load_config(None, ["data.val_fraction=0.6", "data.test_fraction=0.4"])


def test_folder_source_needs_path():
    with pytest.raises(ConfigError, match="needs data.path"):
        load_config(None, ["data.source=folder"])


def test_malformed_override_and_value_used_as_section():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("data.image_size")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["output_dir=x", "output_dir.sub=1"])


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_preset_then_overrides_win(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data:\n  image_size: 32\n  seed: 7\n")
    cfg = load_config(preset, ["data.seed=8"])
    assert cfg.data.image_size == 32 and cfg.data.seed == 8


def test_flatten():
    flat = flatten(to_dict(load_config()))
    assert flat["data.synthetic.num_classes"] == 5
    assert "tracking.experiment" in flat


def test_bare_on_and_off_mean_the_words_not_yaml_booleans(tmp_path):
    cfg = load_config(None, ["train.amp=off", "train.channels_last=on"])
    assert (cfg.train.amp, cfg.train.channels_last) == ("off", "on")
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: off\n  channels_last: off\n")
    assert (load_config(str(path), []).train.amp, load_config(str(path), []).train.channels_last) == ("off", "off")

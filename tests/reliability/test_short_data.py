"""Data too small or changed after preprocessing: one class, a class without a validation image,
shard files deleted behind the manifest's back. Each is a clear error naming what and where."""

import pytest

from pipeline.config import load_config
from pipeline.data.sources import DataError, resolve_source
from tests.conftest import write_image


def _tree(root, sizes):
    for c, n in enumerate(sizes):
        for i in range(n):
            write_image(root / f"class{c}" / f"{i}.png", seed=10 * c + i)
    return root


def _listing(tmp_path, root, *extra):
    cfg = load_config(None, [f"output_dir={tmp_path}", "data.source=folder", f"data.path={root}", *extra])
    return resolve_source(cfg.data, cfg.output_dir)


def test_one_class_is_refused(tmp_path):
    with pytest.raises(DataError, match="has 1 class .*at least 2 class folders"):
        _listing(tmp_path, _tree(tmp_path / "t", [10]))


def test_a_class_without_validation_image_names_the_class_and_the_key(tmp_path):
    with pytest.raises(DataError, match=r"class 'class1' gets no validation image: data.val_fraction=0.1 of its 5 image\(s\) "
                                        r"rounds down to 0; raise data.val_fraction to at least 0.20"):
        _listing(tmp_path, _tree(tmp_path / "t", [10, 5]))
    assert len(_listing(tmp_path, tmp_path / "t", "data.val_fraction=0.2").items) == 15


def test_no_validation_split_when_asked_for_none(tmp_path):
    """val_fraction=0 is a request, not a rounding accident: every image goes to training."""
    listing = _listing(tmp_path, _tree(tmp_path / "t", [10, 5]), "data.val_fraction=0")
    assert {i.split for i in listing.items} == {"train"} and len(listing.items) == 15


def test_preprocess_warns_when_the_validation_split_is_empty(ray_local, tmp_path):
    from pipeline.data.preprocess import preprocess

    said = []
    cfg = load_config(None, [f"output_dir={tmp_path}", "data.synthetic.images_per_class=6", "data.synthetic.image_size=32",
                             "data.image_size=16", "data.val_fraction=0"])
    result = preprocess(cfg, log=said.append)
    assert result["split_sizes"]["val"] == 0
    assert any("warning: the validation split is empty" in line for line in said), said


def test_a_class_with_one_image_needs_more_images(tmp_path):
    with pytest.raises(DataError, match="class 'class1' gets no validation image.*add images to it"):
        _listing(tmp_path, _tree(tmp_path / "t", [10, 1]))


def test_deleted_shard_files_are_named(ray_local, tmp_path):
    from pipeline.data.loading import load_split
    from pipeline.data.preprocess import preprocess

    cfg = load_config(None, [f"output_dir={tmp_path}", "data.synthetic.images_per_class=40", "data.val_fraction=0.25",
                             "data.synthetic.image_size=32", "data.image_size=32"])
    out = preprocess(cfg, log=lambda *_: None)
    shard_dir = out["shard_dir"]
    train_files = sorted((tmp_path / shard_dir.split(str(tmp_path) + "/")[-1] / "train").glob("*.parquet"))
    assert len(train_files) >= 2
    full = len(load_split(shard_dir, "train"))
    train_files[0].unlink()
    with pytest.raises(DataError, match=rf"1 of the {len(train_files)} train shard files in manifest.json are missing "
                                        rf"\(train/{train_files[0].name}\); rebuild them with `python -m pipeline preprocess --force`"):
        load_split(shard_dir, "train")
    assert full == 150

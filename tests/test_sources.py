"""Source layouts, the split rule, bad files, archives and downloads (no Ray needed)."""

import io
import tarfile
from pathlib import Path

import os

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.data import images, synthetic
from pipeline.data.sources import DataError, resolve_source, split_per_class
from tests.conftest import write_image


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", *overrides]).data


# ----------------------------------------------------------------------------- split rule


def test_split_matches_the_keras_rule_by_hand():
    files = [[f"/d/a/{i}.jpg" for i in range(20)], [f"/d/b/{i}.jpg" for i in range(11)]]
    items = split_per_class(files, 0.1, 0.0, seed=42)
    # the Keras example, spelled out: one generator, per class sorted -> shuffle -> first int(n*0.1) to val
    rng = np.random.default_rng(42)
    expected_val = []
    for cls in files:
        arr = np.array(sorted(cls))
        rng.shuffle(arr)
        expected_val += list(arr[: int(len(arr) * 0.1)])
    assert sorted(i.path for i in items if i.split == "val") == sorted(expected_val)
    assert sum(i.split == "val" for i in items if "/a/" in i.path) == 2
    assert sum(i.split == "val" for i in items if "/b/" in i.path) == 1


def test_split_is_disjoint_stratified_deterministic():
    files = [[f"c{c}/{i}" for i in range(50)] for c in range(4)]
    a = split_per_class(files, 0.2, 0.1, seed=1)
    b = split_per_class(list(reversed([list(reversed(f)) for f in files]))[::-1], 0.2, 0.1, seed=1)
    assert [(i.path, i.split) for i in a] == [(i.path, i.split) for i in b]  # input order does not matter
    assert len({i.path for i in a}) == 200  # every file exactly once
    for c in range(4):
        splits = [i.split for i in a if i.label == c]
        assert splits.count("val") == 10 and splits.count("test") == 5 and splits.count("train") == 35
    c = split_per_class(files, 0.2, 0.1, seed=2)
    val = lambda items: {i.path for i in items if i.split == "val"}  # noqa: E731
    assert val(a) != val(c)  # the seed matters


# ----------------------------------------------------------------------------- layouts


def test_folder_tree_lists_images_and_ignores_other_files(tmp_path, folder_tree):
    listing = resolve_source(_cfg(tmp_path, "data.source=folder", f"data.path={folder_tree}", "data.val_fraction=0.2"))
    assert listing.class_names == ["astilbe", "bellflower", "crocus"]
    assert len(listing.items) == 30
    assert {Path(p).name for p in listing.ignored} == {"README.txt", "notes.md"}
    assert listing.counts()["val"] == {"astilbe": 2, "bellflower": 2, "crocus": 2}


def _make_tgz(tmp_path, members: dict[str, bytes]) -> Path:
    path = tmp_path / "flower_photos.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _png_bytes(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_tf_flowers_from_tgz_and_from_url(tmp_path):
    members = {f"flower_photos/{c}/{i}.jpg": _png_bytes(i) for c in ("daisy", "roses") for i in range(5)}
    members["flower_photos/LICENSE.txt"] = b"CC-BY"
    tgz = _make_tgz(tmp_path, members)
    listing = resolve_source(_cfg(tmp_path, "data.source=tf_flowers", f"data.path={tgz}", "data.val_fraction=0.2"))
    assert listing.class_names == ["daisy", "roses"] and len(listing.items) == 10
    assert listing.root.endswith("flower_photos")
    # the same archive through a URL goes through the download path (cache + checksum)
    listing2 = resolve_source(_cfg(tmp_path / "u", "data.source=tf_flowers", f"data.path={tgz.as_uri()}", "data.val_fraction=0.2"))
    assert len(listing2.items) == 10
    assert (tmp_path / "u" / "cache" / "downloads" / "flower_photos.tgz").is_file()


def test_flowers102_official_layout(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "f102"
    n = 12
    labels = np.array([1 + (i % 3) for i in range(n)])  # classes 1..3
    for i in range(1, n + 1):
        write_image(root / "jpg" / f"image_{i:05d}.jpg", seed=i, fmt="JPEG")
    savemat(root / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(root / "setid.mat", {"trnid": np.array([[1, 2, 3, 4, 5, 6]]), "valid": np.array([[7, 8, 9]]), "tstid": np.array([[10, 11, 12]])})
    listing = resolve_source(_cfg(tmp_path, "data.source=flowers102", f"data.path={root}"))
    by_split = {s: [i for i in listing.items if i.split == s] for s in ("train", "val", "test")}
    assert [len(by_split[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    assert {i.label for i in listing.items} == {0, 1, 2}  # 1..3 mapped to 0..2
    item7 = next(i for i in listing.items if i.path.endswith("image_00007.jpg"))
    assert item7.split == "val" and item7.label == labels[6] - 1
    (root / "setid.mat").unlink()
    with pytest.raises(DataError, match="setid.mat is missing"):
        resolve_source(_cfg(tmp_path, "data.source=flowers102", f"data.path={root}"))


def test_synthetic_is_deterministic_and_reused(tmp_path):
    a = synthetic.draw_flower(2, 7, 48, seed=3)
    b = synthetic.draw_flower(2, 7, 48, seed=3)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(synthetic.draw_flower(2, 8, 48, seed=3)))
    cfg = _cfg(tmp_path, f"data.path={tmp_path / 'syn'}", "data.synthetic.num_classes=3", "data.synthetic.images_per_class=6", "data.synthetic.image_size=40",
               "data.val_fraction=0.2")
    listing = resolve_source(cfg)
    assert len(listing.items) == 18 and len(listing.class_names) == 3
    stamp = (tmp_path / "syn" / listing.class_names[0] / "00000.png").stat().st_mtime_ns
    resolve_source(cfg)
    assert (tmp_path / "syn" / listing.class_names[0] / "00000.png").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no class folders"),
        (lambda root: ((root / "a").mkdir(parents=True), (root / "a" / "x.txt").write_text("x")), "holds no images"),
    ],
    ids=["missing", "no-classes", "empty-class"],
)
def test_bad_folders_are_clear_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        resolve_source(_cfg(tmp_path, "data.source=folder", f"data.path={root}"))


def test_resize_modes(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white left quarter
    squash = np.asarray(images.resize(img, 20, "squash"))
    crop = np.asarray(images.resize(img, 20, "short_side_crop"))
    assert squash.shape == crop.shape == (20, 20, 3)
    assert squash[:, :4].mean() > 200  # squash keeps the white strip at the left edge
    assert crop.mean() < 10  # the centre crop of a 40x20 image drops the left quarter


def test_a_fresh_copy_of_the_same_photos_has_the_same_fingerprint(tmp_path, folder_tree, monkeypatch):
    """Shards are reused when the photos are the same, however they were copied (mtimes differ)."""
    import shutil

    from pipeline.data import sources

    def fp(root):
        return resolve_source(_cfg(tmp_path, "data.source=folder", f"data.path={root}", "data.val_fraction=0.2")).fingerprint()

    copy = tmp_path / "copy" / "tree"
    shutil.copytree(folder_tree, copy, copy_function=shutil.copyfile)  # no metadata: new mtimes
    assert fp(copy) == fp(folder_tree)
    victim = copy / "crocus" / "img_03.jpg"
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF  # same size, other bytes
    victim.write_bytes(bytes(data))
    assert fp(copy) != fp(folder_tree)
    # beyond the content budget, size + mtime stand in for the bytes: the same-size edit with its
    # old mtime put back goes unseen there, which is why small trees are hashed by content
    monkeypatch.setattr(sources, "CONTENT_HASH_LIMIT", 0)
    before = fp(copy)
    stat = victim.stat()
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fp(copy) == before
